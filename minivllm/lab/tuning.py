"""Chapter 09's lab: tune a deployment in the simulator.

Every knob of a vLLM deployment that the simulator models is a control: model, GPU, TP/PP/DP (the GPU
count is their product), the dtype of the weights and of the KV cache, ``gpu_memory_utilization``,
``max_model_len``, ``max_num_seqs``, ``max_num_batched_tokens``, chunked prefill, prefix caching,
CUDA graphs or eager, speculative decoding (method, k, acceptance rate), a workload preset
(`minivllm.sim.presets`) at a request rate, the SLO (TTFT and TPOT targets at a percentile) and a
GPU's hourly price. The view: throughput, goodput, TTFT/TPOT/ITL p50 and p99, preemptions, the share
of memory-bound steps, cost per million output tokens, and a verdict naming the binding constraint
and the knob that moves it (`minivllm.sim.evaluation` defines each). A setting the simulator refuses
(the weights do not fit, ``max_model_len`` over the KV cache, TP not dividing the heads) is the
widget's message and its control goes back.

`TuningLab.frontier_figure` draws throughput against p99 TPOT and TTFT as the rate rises, for this
configuration and a few variants of it (`minivllm.sim.tuner.frontier`).
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, replace
from functools import lru_cache

import ipywidgets as widgets
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from minivllm.lab.base import WIDE, LabError
from minivllm.lab.batching import metrics_html
from minivllm.lab.chunking import draw_kv, draw_tokens_per_step
from minivllm.lab.experiment import SettingsLab, SimExperiment, SLOSettings, knob_grid, slo_controls, unjudged
from minivllm.sim import HARDWARE, MODELS, ParallelLayout, SimConfig, SimResult, Simulator, get_hardware, get_model
from minivllm.sim.evaluation import RunSummary, Verdict, summarize_run, verdict
from minivllm.sim.presets import TUNING_PRESETS
from minivllm.sim.speculation import SimSpeculation
from minivllm.sim.tuner import FrontierCurve, frontier
from minivllm.sim.workload import Workload

SPEC_METHODS = ("off", "ngram", "draft_model")


@dataclass(frozen=True)
class TuningSettings(SLOSettings):
    # deployment
    model: str = "Llama-3.1-8B"
    hardware: str = "H100-SXM"
    tp: int = 1
    pp: int = 1
    dp: int = 1
    dtype: str = "bf16"  # the weights'
    kv_cache_dtype: str = "auto"  # "auto": the weights' dtype
    gpu_memory_utilization: float = 0.9
    # engine
    max_model_len: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True
    # speculative decoding
    spec_method: str = "off"
    num_speculative_tokens: int = 3
    acceptance_rate: float = 0.7
    # workload and what it is judged by
    preset: str = "chat"
    request_rate: float | None = None  # None: the preset's
    num_requests: int = 1000
    seed: int = 0
    ttft_slo_ms: float = 500.0  # the lab always has both targets; PercentileSLO takes None for none
    tpot_slo_ms: float = 50.0
    slo_percentile: float = 99.0
    gpu_price_per_hour: float = 2.5  # per GPU, in dollars (or any currency)

    @property
    def rate(self) -> float:
        return TUNING_PRESETS[self.preset].request_rate if self.request_rate is None else self.request_rate

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(tp=self.tp, pp=self.pp, dp=self.dp)

    def workload(self) -> Workload:
        if self.preset not in TUNING_PRESETS:
            raise LabError(f"preset={self.preset!r} is unknown; known: {', '.join(TUNING_PRESETS)}")
        return TUNING_PRESETS[self.preset].workload(self.num_requests, self.rate, self.seed)

    def speculation(self) -> SimSpeculation | None:
        if self.spec_method not in SPEC_METHODS:
            raise LabError(f"spec_method={self.spec_method!r} must be one of {SPEC_METHODS}")
        if self.spec_method == "off":
            return None
        return SimSpeculation(self.spec_method, self.num_speculative_tokens, self.acceptance_rate)

    def sim_config(self) -> SimConfig:
        return SimConfig(get_model(self.model), get_hardware(self.hardware), self.dtype, layout=self.layout,
                         kv_cache_dtype=self.kv_cache_dtype, cuda_graphs=self.cuda_graphs,
                         speculative=self.speculation(), max_model_len=self.max_model_len,
                         max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                         enable_chunked_prefill=self.enable_chunked_prefill,
                         enable_prefix_caching=self.enable_prefix_caching,
                         gpu_memory_utilization=self.gpu_memory_utilization)


# what only judges a run: changing it re-reads the last simulation instead of running a new one
JUDGING = ("ttft_slo_ms", "tpot_slo_ms", "slo_percentile", "gpu_price_per_hour")


@dataclass(frozen=True)
class TuningRun:
    settings: TuningSettings
    result: SimResult
    summary: RunSummary
    verdict: Verdict

    @property
    def cost_per_million_tokens(self) -> float:
        return self.summary.cost_per_million_tokens(self.settings.gpu_price_per_hour)


@lru_cache(maxsize=2)
def _simulated(settings: TuningSettings) -> SimResult:
    return Simulator(settings.sim_config()).run(settings.workload().generate())


def simulate(settings: TuningSettings) -> TuningRun:
    """Run the settings (reusing the last simulation when only the SLO or the price changed); a
    setting the simulator refuses raises its ValueError."""
    if not settings.gpu_price_per_hour >= 0:
        raise LabError(f"gpu_price_per_hour={settings.gpu_price_per_hour!r} must be >= 0")
    slo = settings.slo  # checks the targets before the simulation
    result = _simulated(unjudged(settings, JUDGING))
    summary = summarize_run(result, slo, settings.rate)
    return TuningRun(settings, result, summary, verdict(summary, max_num_seqs=settings.max_num_seqs,
                                                        max_num_batched_tokens=settings.max_num_batched_tokens))


def draw_frontier(ax, curves: list[FrontierCurve], metric: str, target: float | None) -> None:
    """Output throughput against the p99 of ``metric`` ("ttft" or "tpot"), one line per curve, each
    point labelled with its offered rate; the SLO target as a dashed line."""
    for curve in curves:
        pts = curve.points
        x = [1e3 * (p.ttft_p99 if metric == "ttft" else p.tpot_p99) for p in pts]
        y = [p.output_throughput for p in pts]
        line, = ax.plot(x, y, "o-", label=curve.label)
        for xi, yi, p in zip(x, y, pts):
            ax.annotate(f"{p.request_rate:g}", (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7,
                        color=line.get_color())
    if target is not None:
        ax.axvline(target * 1e3, color="black", ls="--", lw=0.8, label="SLO target")
    ax.set_xscale("log")
    # plain numbers (20, 30), minor ticks labelled only over a narrow range
    ax.xaxis.set_major_formatter(LogFormatter())
    ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    ax.set_xlabel(f"p99 {metric.upper()} (ms, log scale)")
    ax.set_ylabel("output throughput (tok/s)")
    ax.legend(fontsize=8)


class TuningLab(SettingsLab):
    """Every knob of a deployment; the metrics, the cost and the verdict of its simulated run."""

    def __init__(self, settings: TuningSettings | None = None):
        self.state = SimExperiment(simulate, settings or TuningSettings())
        s = self.state.settings
        self.model = widgets.Dropdown(options=list(MODELS), value=s.model, description="model", **WIDE)
        self.hardware = widgets.Dropdown(options=list(HARDWARE), value=s.hardware, description="GPU", **WIDE)
        self.tp, self.pp, self.dp = (widgets.BoundedIntText(value=getattr(s, n), min=1, max=64, description=n.upper(),
                                                            **WIDE) for n in ("tp", "pp", "dp"))
        self.dtype = widgets.Dropdown(options=["bf16", "fp16", "fp8"], value=s.dtype, description="weights dtype",
                                      **WIDE)
        self.kv_cache_dtype = widgets.Dropdown(options=["auto", "bf16", "fp16", "fp8"], value=s.kv_cache_dtype,
                                               description="kv_cache_dtype", **WIDE)
        self.memory = widgets.FloatSlider(value=s.gpu_memory_utilization, min=0.5, max=0.98, step=0.01,
                                          description="gpu_memory_utilization", **WIDE)
        self.max_model_len = widgets.SelectionSlider(options=[2 ** k for k in range(10, 18)], value=s.max_model_len,
                                                     description="max_model_len", **WIDE)
        self.max_num_seqs = widgets.SelectionSlider(options=[2 ** k for k in range(0, 11)], value=s.max_num_seqs,
                                                    description="max_num_seqs", **WIDE)
        self.budget = widgets.SelectionSlider(options=[2 ** k for k in range(7, 16)], value=s.max_num_batched_tokens,
                                              description="max_num_batched_tokens", **WIDE)
        self.chunked = widgets.Checkbox(value=s.enable_chunked_prefill, description="chunked prefill", **WIDE)
        self.prefix = widgets.Checkbox(value=s.enable_prefix_caching, description="prefix caching", **WIDE)
        self.cuda_graphs = widgets.Checkbox(value=s.cuda_graphs, description="CUDA graphs (off: eager)", **WIDE)
        self.spec_method = widgets.Dropdown(options=SPEC_METHODS, value=s.spec_method, description="speculative",
                                            **WIDE)
        self.spec_k = widgets.IntSlider(value=s.num_speculative_tokens, min=1, max=8, description="k (drafts)",
                                        **WIDE)
        self.acceptance = widgets.FloatSlider(value=s.acceptance_rate, min=0.0, max=0.95, step=0.05,
                                              description="acceptance rate", **WIDE)
        self.preset = widgets.Dropdown(options=list(TUNING_PRESETS), value=s.preset, description="workload", **WIDE)
        self.rate = widgets.FloatLogSlider(value=_finite(s.rate), base=2, min=-2, max=8, step=0.25,
                                           description="req/s", **WIDE)
        self.ttft, self.tpot, self.percentile = slo_controls(s)
        self.price = widgets.BoundedFloatText(value=s.gpu_price_per_hour, min=0.0, max=1000.0, step=0.1,
                                              description="$ per GPU-hour", **WIDE)
        self.knobs = {"model": self.model, "hardware": self.hardware, "tp": self.tp, "pp": self.pp, "dp": self.dp,
                      "dtype": self.dtype, "kv_cache_dtype": self.kv_cache_dtype,
                      "gpu_memory_utilization": self.memory, "max_model_len": self.max_model_len,
                      "max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.budget,
                      "enable_chunked_prefill": self.chunked, "enable_prefix_caching": self.prefix,
                      "cuda_graphs": self.cuda_graphs, "spec_method": self.spec_method,
                      "num_speculative_tokens": self.spec_k, "acceptance_rate": self.acceptance,
                      "preset": self.preset, "request_rate": self.rate, "ttft_slo_ms": self.ttft,
                      "tpot_slo_ms": self.tpot, "slo_percentile": self.percentile, "gpu_price_per_hour": self.price}
        super().__init__(figure=True)
        groups = {"Deployment": ["model", "hardware", "tp", "pp", "dp", "dtype", "kv_cache_dtype",
                                 "gpu_memory_utilization"],
                  "Engine": ["max_model_len", "max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill",
                             "enable_prefix_caching", "cuda_graphs"],
                  "Speculative decoding": ["spec_method", "num_speculative_tokens", "acceptance_rate"],
                  "Workload, SLO, price": ["preset", "request_rate", "ttft_slo_ms", "tpot_slo_ms", "slo_percentile",
                                           "gpu_price_per_hour"]}
        self.tabs = widgets.Tab([knob_grid([self.knobs[n] for n in names]) for names in groups.values()],
                                titles=list(groups))
        self.widget.children = (self.tabs, *self.widget.children[1:])
        self._sync_controls()

    def _update(self, **changes) -> None:
        """Apply ``changes`` to the settings; a new preset brings its own request rate. A refused
        setting raises `LabError` and changes nothing."""
        if "preset" in changes and "request_rate" not in changes:
            changes["request_rate"] = None
        if changes.get("request_rate") is not None and not math.isfinite(self.state.settings.rate) \
                and "preset" not in changes:
            raise LabError("the offline batch sends every request at time 0: it has no request rate to set")
        super()._update(**changes)

    def shown(self, name: str):
        return _finite(self.state.settings.rate) if name == "request_rate" else super().shown(name)

    def _sync_controls(self) -> None:
        """Show the settings in effect on every control (a preset moves the rate slider, shown disabled
        for an offline batch) without acting on them again."""
        super()._sync_controls()
        s = self.state.settings
        self.rate.disabled = not math.isfinite(s.rate)
        for w in (self.spec_k, self.acceptance):
            w.disabled = s.spec_method == "off"

    # ---- view ----------------------------------------------------------------------------------
    def render(self) -> str:
        run = self.state.run
        s, m, sm = run.settings, run.summary.metrics, run.summary
        preset = TUNING_PRESETS[s.preset]
        rate = f"{s.rate:g} req/s" if math.isfinite(s.rate) else "all at time 0"
        plan = run.result.config.plan()
        spec = "" if s.spec_method == "off" else (f", speculative {s.spec_method} k={s.num_speculative_tokens} at "
                                                  f"acceptance {s.acceptance_rate:.2f}")
        head = (f"<p><b>{s.num_requests} requests</b>, <i>{html.escape(preset.description)}</i>, {rate}. "
                f"{s.model} in {s.dtype} (KV cache {s.kv_cache_dtype}) on <b>{s.layout.num_gpus} x {s.hardware}</b> "
                f"({s.layout}); {plan.weight_bytes_per_gpu / 1e9:.1f} GB of weights per GPU, KV cache "
                f"{run.result.num_blocks * run.result.config.cache_config.block_size:,} tokens per replica at "
                f"gpu_memory_utilization {s.gpu_memory_utilization:.2f}; max_model_len {s.max_model_len}, "
                f"max_num_seqs {s.max_num_seqs}, "
                f"max_num_batched_tokens {s.max_num_batched_tokens}, chunked prefill "
                f"{_on(s.enable_chunked_prefill)}, prefix caching {_on(s.enable_prefix_caching)}, "
                f"{'CUDA graphs' if s.cuda_graphs else 'eager'}{spec}.</p>")
        slo = sm.slo
        met = "<b style='color:#2a7a2a'>met</b>" if sm.slo_met else "<b style='color:#a40000'>missed</b>"
        figures = [
            ("Output throughput", f"{m.output_throughput:,.0f} tok/s ({m.request_throughput:.2f} req/s)"),
            ("Goodput", f"{sm.goodput:.2f} req/s, {sm.goodput_per_gpu:.2f} per GPU: requests meeting every target "
                        f"({_share(sm.goodput, m.request_throughput)} of them)"),
            (f"SLO ({html.escape(str(slo))})", f"{met}: p{slo.percentile:g} TTFT "
             f"{slo.value(m, 'ttft') * 1e3:,.1f} ms, p{slo.percentile:g} TPOT {slo.value(m, 'tpot') * 1e3:.2f} ms"),
            ("Preemptions", f"{m.num_preemptions} (KV cache peaked at {sm.peak_kv_use:.0%})"),
            ("Memory-bound steps", f"{sm.memory_bound_share:.0%} (compute-bound {1 - sm.memory_bound_share:.0%})"),
            ("Cost per million output tokens", f"${run.cost_per_million_tokens:.3f} at ${s.gpu_price_per_hour:g} per "
                                               f"GPU-hour x {s.layout.num_gpus} GPUs"),
        ]
        rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in figures)
        note = ("<p style='font-size:smaller'>Goodput is vLLM's request goodput: requests meeting both targets "
                "per second. The SLO is met at a percentile p when the p-th percentile of TTFT and of TPOT are "
                "within their targets (at least p % of requests meet each).</p>")
        return (head + f"<table>{rows}</table>"
                f"<p class='minivllm-verdict'><b>{html.escape(run.verdict.sentence)}</b></p>"
                + note + metrics_html({"this run": m}))

    def figure(self):
        run = self.state.run
        fig = Figure(figsize=(11, 3.4))
        a, b = fig.subplots(1, 2)
        draw_tokens_per_step(a, run.result, run.settings.max_num_batched_tokens)
        a.set_title("Tokens per step")
        draw_kv(b, run.result)
        b.set_title("KV cache in use" + (" (every replica's steps)" if run.settings.dp > 1 else ""))
        fig.tight_layout()
        return fig

    def frontier_figure(self, variants: dict[str, dict] | None = None, rates: list[float] | None = None,
                        num_requests: int = 300, workers: int | None = None):
        """Throughput against p99 TPOT and TTFT as the request rate rises, for this lab's settings
        and ``variants`` of it (label -> changes, e.g. ``{"TP=2": {"tp": 2}}``); ``rates`` default
        to a quarter up to twice the preset's rate. Returns the matplotlib Figure."""
        s = replace(self.state.settings, num_requests=num_requests)
        if not math.isfinite(s.rate) and rates is None:
            raise LabError("the offline batch has no request rate to sweep: pass rates")
        rates = rates or [s.rate * f for f in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)]
        configs = {"this lab": s.sim_config()}
        for label, changes in (variants or {}).items():
            configs[label] = replace(s, **changes).sim_config()
        curves = frontier(configs, lambda r: replace(s, request_rate=r).workload(), rates, s.slo, workers=workers)
        fig = Figure(figsize=(11, 3.8))
        a, b = fig.subplots(1, 2)
        draw_frontier(a, curves, "tpot", s.slo.tpot)
        a.set_title("Throughput against p99 TPOT (labels: req/s)")
        draw_frontier(b, curves, "ttft", s.slo.ttft)
        b.set_title("Throughput against p99 TTFT")
        fig.tight_layout()
        return fig


def _finite(rate: float) -> float:
    return rate if math.isfinite(rate) else 256.0  # the rate slider's end, shown disabled for an offline batch


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole else "none"

