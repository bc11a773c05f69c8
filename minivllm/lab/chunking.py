"""Chapter 05's lab: the token budget and the KV memory, and what they do to latency.

The state is a simulation (`minivllm.sim`) of a workload with a heavy tail of long prompts on one
GPU. Two sliders set ``max_num_batched_tokens`` (the token budget of a step: how big a prompt chunk
may be) and ``gpu_memory_utilization`` (how much memory is left for the KV cache once the weights
are in); chunked prefill can be switched off. The view, read from the trace: tokens per step
(prefill and decode), every inter-token gap (the spikes a long prefill causes), the KV cache's use
and the preemptions, and the metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

import ipywidgets as widgets
import numpy as np
from matplotlib.figure import Figure

from minivllm.lab.base import WIDE, Lab
from minivllm.lab.batching import metrics_html
from minivllm.lab.experiment import SimExperiment
from minivllm.sim import (Lengths, Metrics, SimConfig, SimResult, Simulator, Workload, compute_metrics,
                          get_hardware, get_model, request_timelines, step_timeline)


@dataclass(frozen=True)
class ChunkingSettings:
    max_num_batched_tokens: int = 512
    gpu_memory_utilization: float = 0.9
    enable_chunked_prefill: bool = True
    max_num_seqs: int = 64
    max_model_len: int = 8192
    model: str = "Llama-3.1-8B"
    hardware: str = "L4"
    num_requests: int = 80
    request_rate: float = 1.5
    seed: int = 0

    def workload(self) -> Workload:
        # log-normal prompts with a heavy tail (a few are 10x the median), moderate outputs
        return Workload(self.num_requests, self.request_rate, Lengths("lognormal", 768, 1.0, self.max_model_len // 2),
                        Lengths("lognormal", 192, 0.5, self.max_model_len // 4), seed=self.seed)

    def sim_config(self) -> SimConfig:
        return SimConfig(get_model(self.model), get_hardware(self.hardware), max_num_seqs=self.max_num_seqs,
                         max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=self.max_model_len,
                         gpu_memory_utilization=self.gpu_memory_utilization,
                         enable_chunked_prefill=self.enable_chunked_prefill)


@dataclass(frozen=True)
class ChunkingRun:
    settings: ChunkingSettings
    result: SimResult
    metrics: Metrics

    @property
    def recomputed_tokens(self) -> int:
        """Prefill tokens beyond each prompt's own: the price of preemption by recompute."""
        prompts = sum(len(s.prompt_token_ids) for s in self.result.requests)
        return sum(r.num_prefill_tokens for r in self.result.trace) - prompts


def simulate(settings: ChunkingSettings) -> ChunkingRun:
    result = Simulator(settings.sim_config()).run(settings.workload().generate())
    return ChunkingRun(settings, result, compute_metrics(result.trace, result.arrival_times))


def draw_tokens_per_step(ax, result: SimResult, budget: int) -> None:
    series = step_timeline(result.trace, result.num_blocks)
    prefill = np.array([r.num_prefill_tokens for r in result.trace])
    decode = np.array([r.num_decode_tokens for r in result.trace])
    ax.step(series.times, decode + prefill, where="post", color="tab:orange", lw=0.8, label="all tokens")
    ax.step(series.times, decode, where="post", color="tab:blue", lw=0.8, label="decode tokens")
    ax.axhline(budget, color="black", ls="--", lw=0.8, label="token budget")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("tokens in the step")
    ax.legend(loc="upper right", fontsize=8)


def draw_itl(ax, result: SimResult) -> None:
    """Every gap between two tokens of one request, at the time of the later token."""
    for t in request_timelines(result.trace, result.arrival_times):
        times = np.array(t.token_times)
        if len(times) > 1:
            ax.plot(times[1:], 1e3 * np.diff(times), ".", ms=2, color="tab:blue", alpha=0.4)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("inter-token latency (ms)")


def draw_kv(ax, result: SimResult) -> None:
    series = step_timeline(result.trace, result.num_blocks)
    ax.step(series.times, 100 * series.kv_usage, where="post", color="tab:green", label="KV cache in use")
    hits = series.preemptions > 0
    ax.plot(series.times[hits], np.full(hits.sum(), 100.0), "v", color="tab:red", ms=5, label="preemption")
    ax.set_ylim(0, 108)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("KV blocks in use (%)")
    ax.legend(loc="lower right", fontsize=8)


class ChunkingLab(Lab):
    """Move the token budget and the memory; watch ITL spikes, TTFT and preemptions."""

    def __init__(self, settings: ChunkingSettings | None = None):
        self.state = SimExperiment(simulate, settings or ChunkingSettings())
        s = self.state.settings
        self.budget = widgets.SelectionSlider(options=[2 ** k for k in range(7, 14)], value=s.max_num_batched_tokens,
                                              description="token budget (max_num_batched_tokens)", **WIDE)
        self.memory = widgets.FloatSlider(value=s.gpu_memory_utilization, min=0.5, max=1.0, step=0.01,
                                          description="gpu_memory_utilization", **WIDE)
        self.chunked = widgets.Checkbox(value=s.enable_chunked_prefill, description="chunked prefill", **WIDE)
        self.max_num_seqs = widgets.IntSlider(value=s.max_num_seqs, min=1, max=256, description="max_num_seqs", **WIDE)
        controls = [self.on_change(w, lambda v, name=name: self.state.update(**{name: v}))
                    for name, w in [("max_num_batched_tokens", self.budget), ("gpu_memory_utilization", self.memory),
                                    ("enable_chunked_prefill", self.chunked), ("max_num_seqs", self.max_num_seqs)]]
        super().__init__([controls[:2], controls[2:]], figure=True)

    def render(self) -> str:
        run = self.state.run
        s = run.settings
        head = (f"<p>{s.num_requests} requests at {s.request_rate:g} req/s (log-normal prompts, median about 470 "
                f"tokens, a tail up to {s.max_model_len // 2}); {s.model} on {s.hardware}; token budget "
                f"{s.max_num_batched_tokens}, chunked prefill {'on' if s.enable_chunked_prefill else 'off'}, "
                f"max_num_seqs {s.max_num_seqs}, gpu_memory_utilization {s.gpu_memory_utilization:.2f}: "
                f"KV cache {run.result.num_blocks} blocks = {16 * run.result.num_blocks} tokens. "
                f"<b>{run.metrics.num_preemptions} preemptions</b>, {run.recomputed_tokens} tokens recomputed.</p>")
        return head + metrics_html({"this run": run.metrics})

    def figure(self):
        result = self.state.run.result
        fig = Figure(figsize=(12, 3.6))
        a, b, c = fig.subplots(1, 3)
        draw_tokens_per_step(a, result, self.state.settings.max_num_batched_tokens)
        a.set_title("Tokens per step")
        draw_itl(b, result)
        b.set_title("Inter-token gaps")
        draw_kv(c, result)
        c.set_title("KV cache and preemptions")
        fig.tight_layout()
        return fig
