"""Chapter 04's lab: static against continuous batching at GPU scale, in the simulator.

The state is a simulation: a workload (a preset's lengths and burstiness, at a request rate) run
through the real Scheduler and BlockManager on a named model and GPU (`minivllm.sim`). The view is
read from its trace: a Gantt chart of request lifetimes, the batch occupancy over time and the
`vllm bench serve` metrics.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import ipywidgets as widgets
from matplotlib.figure import Figure

from minivllm.core.policy import BATCHING_POLICIES
from minivllm.lab.base import Lab, LabError
from minivllm.lab.experiment import SimExperiment
from minivllm.sim import (HARDWARE, MODELS, PRESETS, Lengths, Metrics, RequestTimeline, SimConfig, SimResult,
                          Simulator, Workload, compute_metrics, get_hardware, get_model, request_timelines,
                          step_timeline)
from minivllm.sim.workload import LENGTH_KINDS

GANTT_COLORS = {"waiting": "#d9d9d9", "prefill": "tab:orange", "decode": "tab:blue"}


@dataclass(frozen=True)
class BatchingSettings:
    preset: str = "balanced"
    request_rate: float = 8.0  # requests per second
    length_kind: str = "lognormal"  # the shape of both length distributions; the preset sets the means
    policy: str = "continuous"
    max_num_seqs: int = 32
    model: str = "Llama-3.1-8B"
    hardware: str = "H100-SXM"
    num_requests: int = 120
    seed: int = 0

    def workload(self) -> Workload:
        if self.preset not in PRESETS:
            raise LabError(f"preset={self.preset!r} is unknown; known: {', '.join(PRESETS)}")
        if self.length_kind not in LENGTH_KINDS:
            raise LabError(f"length_kind={self.length_kind!r} must be one of {LENGTH_KINDS}")
        prompt, output, burstiness = PRESETS[self.preset]
        return Workload(self.num_requests, self.request_rate, reshape(prompt, self.length_kind),
                        reshape(output, self.length_kind), burstiness=burstiness, seed=self.seed)

    def sim_config(self) -> SimConfig:
        return SimConfig(get_model(self.model), get_hardware(self.hardware), max_num_seqs=self.max_num_seqs,
                         batching_policy=self.policy)


def reshape(lengths: Lengths, kind: str) -> Lengths:
    """The same mean and cap with another shape: a uniform spread of half the mean, or none."""
    spread = {"fixed": 0.0, "uniform": lengths.mean / 2, "lognormal": lengths.spread}[kind]
    return Lengths(kind, lengths.mean, spread, lengths.maximum)


@dataclass(frozen=True)
class BatchingRun:
    settings: BatchingSettings
    result: SimResult
    metrics: Metrics
    timelines: list[RequestTimeline]


def simulate(settings: BatchingSettings) -> BatchingRun:
    """Run the settings' workload in the simulator; a setting the simulator refuses raises ValueError."""
    result = Simulator(settings.sim_config()).run(settings.workload().generate())
    return BatchingRun(settings, result, compute_metrics(result.trace, result.arrival_times),
                       request_timelines(result.trace, result.arrival_times))


# ---- drawing (also used directly by the chapter) ----------------------------------------------
def draw_gantt(ax, timelines: list[RequestTimeline], title: str) -> None:
    """One bar per request, by arrival: waiting (grey), prefill until its first token (orange),
    decoding (blue)."""
    for y, t in enumerate(timelines):
        ax.barh(y, t.first_scheduled - t.arrival, left=t.arrival, height=1.0, color=GANTT_COLORS["waiting"], lw=0)
        ax.barh(y, t.first_token - t.first_scheduled, left=t.first_scheduled, height=1.0,
                color=GANTT_COLORS["prefill"], lw=0)
        ax.barh(y, t.finished - t.first_token, left=t.first_token, height=1.0, color=GANTT_COLORS["decode"], lw=0)
    ax.set_ylim(len(timelines), -1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("request (by arrival)")
    ax.set_title(title)


def draw_occupancy(ax, run: BatchingRun, title: str) -> None:
    """Requests in the running batch after every step, against the batch limit."""
    series = step_timeline(run.result.trace, run.result.num_blocks)
    ax.step(series.times, series.num_running, where="post", color="tab:blue", label="running")
    ax.step(series.times, series.num_waiting, where="post", color="tab:red", alpha=0.6, label="waiting")
    ax.axhline(run.settings.max_num_seqs, color="black", ls="--", lw=0.8, label="max_num_seqs")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("requests")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)


def legend_patches():
    from matplotlib.patches import Patch
    return [Patch(color=c, label=k) for k, c in GANTT_COLORS.items()]


def metrics_html(runs: dict[str, Metrics]) -> str:
    """A `vllm bench serve`-style table, one column per run."""
    names = list(runs)
    labels = [label for label, _ in next(iter(runs.values())).rows()]
    values = {name: dict(m.rows()) for name, m in runs.items()}
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(f"<tr><td>{html.escape(label)}</td>" + "".join(
        f"<td style='text-align:right'>{values[n][label]}</td>" for n in names) + "</tr>" for label in labels)
    return f"<table><tr><th>metric</th>{head}</tr>{body}</table>"


class BatchingLab(Lab):
    """Pick a workload and a policy; read the Gantt chart, the batch occupancy and the metrics."""

    def __init__(self, settings: BatchingSettings | None = None):
        self.state = SimExperiment(simulate, settings or BatchingSettings())
        s = self.state.settings
        self.preset = widgets.Dropdown(options=list(PRESETS), value=s.preset, description="workload")
        self.request_rate = widgets.FloatLogSlider(value=s.request_rate, base=2, min=-2, max=7, step=0.5,
                                                   description="req/s")
        self.length_kind = widgets.Dropdown(options=list(LENGTH_KINDS), value=s.length_kind, description="lengths")
        self.policy = widgets.ToggleButtons(options=list(BATCHING_POLICIES), value=s.policy, description="policy",
                                            style={"button_width": "90px"})
        self.max_num_seqs = widgets.IntSlider(value=s.max_num_seqs, min=1, max=256, description="max batch")
        self.model = widgets.Dropdown(options=list(MODELS), value=s.model, description="model")
        self.hardware = widgets.Dropdown(options=list(HARDWARE), value=s.hardware, description="GPU")
        controls = [self.on_change(w, lambda v, name=name: self.state.update(**{name: v}))
                    for name, w in [("preset", self.preset), ("request_rate", self.request_rate),
                                    ("length_kind", self.length_kind), ("policy", self.policy),
                                    ("max_num_seqs", self.max_num_seqs), ("model", self.model),
                                    ("hardware", self.hardware)]]
        super().__init__([controls[:4], controls[4:]], figure=True)

    def render(self) -> str:
        run = self.state.run
        s = run.settings
        head = (f"<p><b>{s.num_requests} requests</b>, workload <i>{s.preset}</i> at {s.request_rate:g} req/s "
                f"({s.length_kind} lengths), <b>{s.policy}</b> batching, max batch {s.max_num_seqs}; "
                f"{s.model} on {s.hardware}, KV cache {run.result.num_blocks} blocks of 16 tokens</p>")
        return head + metrics_html({s.policy: run.metrics})

    def figure(self):
        run = self.state.run
        fig = Figure(figsize=(11, 4.2))
        gantt, occupancy = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        draw_gantt(gantt, run.timelines, f"Request lifetimes, {run.settings.policy} batching")
        gantt.legend(handles=legend_patches(), loc="lower left", fontsize=8)
        draw_occupancy(occupancy, run, "Batch occupancy")
        fig.tight_layout()
        return fig
