"""Chapter 10's lab: prefill/decode disaggregation against a colocated deployment of the same GPUs.

Controls: model, GPU, the two pools (instances and TP each: the GPU count is their sum), the KV link
(NVLink in the node, InfiniBand 400 Gb/s, Ethernet 100 Gb/s), layer-pipelined transfer or not, where
the first token comes from (the prefill, as DistServe counts; the decode, as vLLM's proxy does), the
token budget, a workload preset at a request rate, and the SLO (TTFT and TPOT targets at a
percentile). The colocated deployment has the same GPUs as DP replicas of the decode pool's TP and
the same engine arguments.

The view: goodput (and per GPU), whether the SLO holds, TTFT/TPOT/ITL percentiles side by side, the
KV handoff (bytes, decode admission wait, transfer time, its share of the end-to-end latency), and
the verdict in words (`minivllm.sim.disagg_eval.pd_verdict`): P/D helps, only costs, or ties. The
figure: the TTFT and ITL distributions of both deployments and where a disaggregated request's time
goes. A setting the simulator refuses is the lab's message and its control goes back.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, replace
from functools import lru_cache

import ipywidgets as widgets
import numpy as np
from matplotlib.figure import Figure

from minivllm.lab.base import WIDE, LabError
from minivllm.lab.batching import metrics_html
from minivllm.lab.experiment import SettingsLab, SimExperiment, SLOSettings, knob_grid, slo_controls, unjudged
from minivllm.sim import HARDWARE, MODELS, Simulator, get_hardware, get_model, request_timelines
from minivllm.sim.disagg import FIRST_TOKEN_SIDES, DisaggConfig, DisaggResult, DisaggSimulator, PoolConfig
from minivllm.sim.disagg_eval import (DisaggSummary, PDVerdict, best_split, colocated_config,
                                      colocated_vs_disaggregated, pd_verdict, summarize_disagg)
from minivllm.sim.evaluation import RunSummary, summarize_run
from minivllm.sim.kv_transfer import LINK_NAMES
from minivllm.sim.presets import TUNING_PRESETS
from minivllm.sim.simulator import SimConfig, SimResult
from minivllm.sim.workload import Workload

# an offline batch has no latency targets to separate, so the lab offers the presets with a rate
PRESETS = tuple(name for name, p in TUNING_PRESETS.items() if np.isfinite(p.request_rate))


@dataclass(frozen=True)
class DisaggSettings(SLOSettings):
    model: str = "Llama-3.1-8B"
    hardware: str = "H100-SXM"
    prefill_instances: int = 2
    prefill_tp: int = 1
    decode_instances: int = 2
    decode_tp: int = 1
    link: str = "infiniband"
    layer_pipelined: bool = False
    first_token: str = "prefill"
    max_num_batched_tokens: int = 2048
    max_model_len: int = 16384
    preset: str = "rag"
    request_rate: float = 22.0
    num_requests: int = 300
    seed: int = 0
    ttft_slo_ms: float = 1000.0
    tpot_slo_ms: float = 15.0
    slo_percentile: float = 90.0

    @property
    def engine_args(self) -> dict:
        return {"max_num_batched_tokens": self.max_num_batched_tokens, "max_model_len": self.max_model_len}

    def workload(self) -> Workload:
        if self.preset not in PRESETS:
            raise LabError(f"preset={self.preset!r} must be one of {PRESETS} (an offline batch has no latency "
                           "targets for P/D to separate)")
        return TUNING_PRESETS[self.preset].workload(self.num_requests, self.request_rate, self.seed)

    def disagg_config(self) -> DisaggConfig:
        model, hardware = get_model(self.model), get_hardware(self.hardware)
        return DisaggConfig(model, hardware, PoolConfig(self.prefill_instances, self.prefill_tp, **self.engine_args),
                            PoolConfig(self.decode_instances, self.decode_tp, **self.engine_args), link=self.link,
                            layer_pipelined=self.layer_pipelined, first_token=self.first_token)

    def colocated_config(self) -> SimConfig:
        return colocated_config(self.disagg_config())


JUDGING = ("ttft_slo_ms", "tpot_slo_ms", "slo_percentile")  # changing these re-reads the last runs


@dataclass(frozen=True)
class DisaggRun:
    settings: DisaggSettings
    colocated_result: SimResult
    disagg_result: DisaggResult
    colocated: RunSummary
    disaggregated: DisaggSummary
    verdict: PDVerdict


@lru_cache(maxsize=2)
def _simulated(settings: DisaggSettings) -> tuple[SimResult, DisaggResult]:
    requests = settings.workload().generate()
    disagg = DisaggSimulator(settings.disagg_config()).run(requests)  # its refusals name the pool
    return Simulator(settings.colocated_config()).run(requests), disagg


def simulate(settings: DisaggSettings) -> DisaggRun:
    """Both deployments on the settings' workload (reusing the last runs when only the SLO changed);
    a setting the simulator refuses raises its ValueError."""
    slo = settings.slo  # checks the targets before the simulations
    colocated, disagg = _simulated(unjudged(settings, JUDGING))
    col = summarize_run(colocated, slo, settings.request_rate)
    dis = summarize_disagg(disagg, slo, settings.request_rate)
    return DisaggRun(settings, colocated, disagg, col, dis, pd_verdict(col, dis))


class DisaggLab(SettingsLab):
    """Two pools, a link, a workload and an SLO in; both deployments' latencies, goodput, the KV
    handoff and the verdict out."""

    def __init__(self, settings: DisaggSettings | None = None):
        self.state = SimExperiment(simulate, settings or DisaggSettings())
        s = self.state.settings
        self.model = widgets.Dropdown(options=list(MODELS), value=s.model, description="model", **WIDE)
        self.hardware = widgets.Dropdown(options=list(HARDWARE), value=s.hardware, description="GPU", **WIDE)
        self.prefill_instances, self.prefill_tp, self.decode_instances, self.decode_tp = (
            widgets.BoundedIntText(value=getattr(s, n), min=1, max=64, description=d, **WIDE)
            for n, d in (("prefill_instances", "prefill instances"), ("prefill_tp", "prefill TP"),
                         ("decode_instances", "decode instances"), ("decode_tp", "decode TP")))
        self.link = widgets.Dropdown(options=LINK_NAMES, value=s.link, description="KV link", **WIDE)
        self.pipelined = widgets.Checkbox(value=s.layer_pipelined, description="layer-pipelined transfer", **WIDE)
        self.first_token = widgets.Dropdown(options=FIRST_TOKEN_SIDES, value=s.first_token,
                                            description="first token from", **WIDE)
        self.budget = widgets.SelectionSlider(options=[2 ** k for k in range(7, 16)], value=s.max_num_batched_tokens,
                                              description="max_num_batched_tokens", **WIDE)
        self.preset = widgets.Dropdown(options=PRESETS, value=s.preset, description="workload", **WIDE)
        self.rate = widgets.FloatLogSlider(value=s.request_rate, base=2, min=-2, max=9, step=0.25,
                                           description="req/s", **WIDE)
        self.ttft, self.tpot, self.percentile = slo_controls(s)
        self.knobs = {"model": self.model, "hardware": self.hardware, "prefill_instances": self.prefill_instances,
                      "prefill_tp": self.prefill_tp, "decode_instances": self.decode_instances,
                      "decode_tp": self.decode_tp, "link": self.link, "layer_pipelined": self.pipelined,
                      "first_token": self.first_token, "max_num_batched_tokens": self.budget, "preset": self.preset,
                      "request_rate": self.rate, "ttft_slo_ms": self.ttft, "tpot_slo_ms": self.tpot,
                      "slo_percentile": self.percentile}
        super().__init__(figure=True)
        self.widget.children = (knob_grid(list(self.knobs.values())), *self.widget.children[1:])

    # ---- view ----------------------------------------------------------------------------------
    def render(self) -> str:
        run = self.state.run
        s, col, dis = run.settings, run.colocated, run.disaggregated
        cfg = run.disagg_result.config
        colocated_layout = run.colocated_result.config.layout
        pipelined = "layer-pipelined" if s.layer_pipelined else "after the prefill"
        head = (f"<p><b>{s.num_requests} requests</b>, <i>{html.escape(TUNING_PRESETS[s.preset].description)}</i>, "
                f"{s.request_rate:g} req/s. {s.model} on <b>{cfg.num_gpus} x {s.hardware}</b>: disaggregated as a "
                f"prefill pool of {cfg.prefill} and a decode pool of {cfg.decode}, KV over "
                f"{html.escape(str(run.disagg_result.link))}, sent {pipelined}, first token from the {s.first_token}; "
                f"colocated as {colocated_layout}. max_num_batched_tokens {s.max_num_batched_tokens}.</p>")
        slo = col.slo
        rows = []
        for label, summary in (("colocated", col), ("disaggregated", dis.run)):
            m = summary.metrics
            met = "<b style='color:#2a7a2a'>met</b>" if summary.slo_met else "<b style='color:#a40000'>missed</b>"
            rows.append(f"<tr><td>{label}</td><td>{summary.goodput:.2f} req/s ({summary.goodput_per_gpu:.2f} per "
                        f"GPU)</td><td>{met}</td><td>{slo.value(m, 'ttft') * 1e3:,.0f} ms</td>"
                        f"<td>{slo.value(m, 'tpot') * 1e3:.1f} ms</td><td>{m.itl.p99 * 1e3:.1f} ms</td>"
                        f"<td>{m.num_preemptions}</td></tr>")
        p = f"p{slo.percentile:g}"
        table = (f"<table><tr><th></th><th>goodput</th><th>SLO ({html.escape(str(slo))})</th><th>{p} TTFT</th>"
                 f"<th>{p} TPOT</th><th>p99 ITL</th><th>preemptions</th></tr>{''.join(rows)}</table>")
        handoff = (f"<p>KV handoff: {len(run.disagg_result.transfers)} transfers of "
                   f"{dis.mean_transfer_bytes / 1e6:,.1f} MB on average; decode admission waited "
                   f"{dis.mean_admission_wait * 1e3:,.2f} ms, the transfer took {dis.mean_transfer_time * 1e3:,.2f} ms "
                   f"on average: <b>{dis.transfer_share:.1%} of the end-to-end latency</b>.</p>")
        verdict = f"<p class='minivllm-verdict'><b>{html.escape(run.verdict.sentence)}</b></p>"
        note = ("<p style='font-size:smaller'>Goodput: requests meeting both targets per second. The SLO holds at "
                "a percentile p when the p-th percentile of TTFT and of TPOT are within their targets.</p>")
        return head + table + handoff + verdict + note + metrics_html(
            {"colocated": col.metrics, "disaggregated": dis.run.metrics})

    def figure(self):
        run = self.state.run
        col = request_timelines(run.colocated_result.trace, run.colocated_result.arrival_times)
        dis = request_timelines(run.disagg_result.trace, run.disagg_result.arrival_times)
        fig = Figure(figsize=(13, 3.4))
        a, b, c = fig.subplots(1, 3)
        for label, timelines in (("colocated", col), ("disaggregated", dis)):
            _cdf(a, [1e3 * t.ttft for t in timelines], label)
            _cdf(b, [1e3 * x for t in timelines for x in t.itls], label)
        a.axvline(run.settings.ttft_slo_ms, color="black", ls="--", lw=0.8, label="TTFT target")
        a.set(title="TTFT distribution", xlabel="TTFT (ms, log scale)", ylabel="share of requests", xscale="log")
        b.set(title="Inter-token latency distribution", xlabel="ITL (ms, log scale)", ylabel="share of gaps",
              xscale="log")
        a.legend(fontsize=8)
        b.legend(fontsize=8)
        draw_time_split(c, run)
        fig.tight_layout()
        return fig

    def rate_sweep_figure(self, rates: list[float] | None = None, num_requests: int = 200, workers: int | None = None):
        """Goodput against the request rate, colocated and disaggregated (``rates`` default to a
        quarter up to twice the lab's rate). Returns the matplotlib Figure."""
        s = replace(self.state.settings, num_requests=num_requests)
        rates = rates or [s.request_rate * f for f in (0.25, 0.5, 1.0, 1.5, 2.0)]
        comparisons = colocated_vs_disaggregated(s.disagg_config(), lambda r: replace(s, request_rate=r).workload(),
                                                 rates, s.slo, workers=workers)
        fig = Figure(figsize=(6, 3.6))
        ax = fig.subplots()
        for label in ("colocated", "disaggregated"):
            points = [(c.request_rate, getattr(c, label).goodput) for c in comparisons
                      if hasattr(getattr(c, label), "goodput")]
            ax.plot([r for r, _ in points], [g for _, g in points], "o-", label=label)
        ax.set(title=f"Goodput against load ({s.slo})", xlabel="offered rate (req/s)", ylabel="goodput (req/s)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig

    def split_figure(self, rates: list[float] | None = None, num_requests: int = 200, workers: int | None = None):
        """The prefill:decode ratio search on the lab's GPU count (`best_split`): each split's best
        goodput per GPU over ``rates`` (default: half, one and a half times the lab's rate), the
        colocated deployment beside them. Returns the matplotlib Figure."""
        s = replace(self.state.settings, num_requests=num_requests)
        cfg = s.disagg_config()
        rates = rates or [s.request_rate * f for f in (0.5, 1.0, 1.5)]
        result = best_split(cfg.model, cfg.hardware, cfg.num_gpus, lambda r: replace(s, request_rate=r).workload(),
                            rates, s.slo, prefill_tp=s.prefill_tp, decode_tp=s.decode_tp, link=s.link,
                            layer_pipelined=s.layer_pipelined, first_token=s.first_token,
                            colocated_tp=colocated_config(cfg).layout.tp, workers=workers, **s.engine_args)
        # by prefill GPUs ("2P:6D" before "10P:6D"), the colocated deployment last
        scores = sorted(result.scores, key=lambda x: (x.label == "colocated",
                                                      0 if x.label == "colocated" else int(x.label.split("P")[0])))
        fig = Figure(figsize=(6, 3.6))
        ax = fig.subplots()
        bars = ax.bar([x.label for x in scores], [x.goodput_per_gpu for x in scores],
                      color=["#999999" if x.label == "colocated" else "#1f77b4" for x in scores])
        best = result.best
        bars[[x.label for x in scores].index(best.label)].set_edgecolor("black")
        swept = ", ".join(f"{r:g}" for r in result.rates)
        ax.set(title=f"Best goodput per GPU over {swept} req/s (best: {best.label})",
               xlabel="split of the GPUs (prefill P : decode D)", ylabel="goodput per GPU (req/s)")
        fig.tight_layout()
        return fig


def _cdf(ax, values: list[float], label: str) -> None:
    v = np.sort(np.asarray(values, dtype=float))
    if len(v):
        ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)


def draw_time_split(ax, run: DisaggRun) -> None:
    """Where a disaggregated request's time goes, on average: queue and prefill (its TTFT), the KV
    handoff (decode admission wait, then the transfer) and the decode; the colocated request beside it."""
    dis = run.disaggregated
    ttft, e2e = dis.run.metrics.ttft.mean, dis.run.metrics.e2e.mean
    handoff = dis.mean_admission_wait + dis.mean_transfer_time
    if run.settings.first_token == "decode":  # the handoff comes before the first token
        first, decode = max(ttft - handoff, 0.0), e2e - ttft
    else:
        first, decode = ttft, max(e2e - ttft - handoff, 0.0)
    parts = [("queue and prefill", first, "#1f77b4"), ("decode admission", dis.mean_admission_wait, "#d62728"),
             ("KV transfer", dis.mean_transfer_time, "#ff7f0e"), ("decode", decode, "#2ca02c")]
    left = 0.0
    for label, seconds, color in parts:
        ax.barh("disaggregated", seconds * 1e3, left=left * 1e3, color=color, label=label)
        left += seconds
    col = run.colocated.metrics
    ax.barh("colocated", col.ttft.mean * 1e3, color="#1f77b4")
    ax.barh("colocated", (col.e2e.mean - col.ttft.mean) * 1e3, left=col.ttft.mean * 1e3, color="#2ca02c")
    ax.set(title=f"Mean request time (handoff {dis.transfer_share:.1%} of E2E)", xlabel="ms")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=4)
