"""What a tuning run is judged by: the serving metrics, latency targets at a percentile, goodput per
GPU, cost per million output tokens, the share of memory-bound steps, and a verdict naming the binding
constraint and the knob that moves it. Used by the Tuning Lab (chapter 09) and the auto-tuner.

Definitions (the lab says them too):

* **goodput**: `vllm bench serve`'s request goodput: requests that met *every* target (TTFT and
  TPOT) per second of the run.
* **the SLO at a percentile** ``p``: the run meets it when the ``p``-th percentile of TTFT and of TPOT
  are within their targets, i.e. at least ``p`` % of the requests meet each target on its own.
* **goodput per GPU**: goodput / GPUs of the layout (``tp * pp * dp``).
* **cost per million output tokens**: GPUs * price per GPU-hour / 3600 / output tokens per second
  * 1e6: what the GPUs cost while they produce a million tokens at this run's rate.
* **memory-bound share**: the share of steps whose roofline memory time exceeds their compute time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from minivllm.core.trace import StepRecord
from minivllm.sim.deployment import StepCost
from minivllm.sim.metrics import SLO, Metrics, RequestTimeline, request_timelines, summarize
from minivllm.sim.simulator import SimResult


@dataclass(frozen=True)
class PercentileSLO:
    """Latency targets in seconds (None: no target), met at the ``percentile``-th percentile."""

    ttft: float | None = None
    tpot: float | None = None
    percentile: float = 99.0

    def __post_init__(self) -> None:
        SLO(ttft=self.ttft, tpot=self.tpot)  # its own checks of the targets
        if isinstance(self.percentile, bool) or not 0 < self.percentile <= 100:
            raise ValueError(f"PercentileSLO.percentile={self.percentile!r} must be in (0, 100]")

    @property
    def per_request(self) -> SLO:
        return SLO(ttft=self.ttft, tpot=self.tpot)

    def value(self, metrics: Metrics, metric: str) -> float:
        """The ``percentile``-th percentile of ``metric`` ("ttft" or "tpot") in seconds."""
        stats = metrics.stats(metric)
        return dict(stats.percentiles).get(float(self.percentile), math.nan)

    def misses(self, metrics: Metrics) -> dict[str, tuple[float, float]]:
        """The targets missed: metric -> (its percentile value, the target)."""
        out = {}
        for metric, target in (("ttft", self.ttft), ("tpot", self.tpot)):
            v = self.value(metrics, metric)
            if target is not None and not (v <= target or math.isnan(v)):  # nan: no request has a TPOT
                out[metric] = (v, target)
        return out

    def met(self, metrics: Metrics) -> bool:
        return not self.misses(metrics)

    def __str__(self) -> str:
        targets = [f"{m} <= {t * 1e3:g} ms" for m, t in (("TTFT", self.ttft), ("TPOT", self.tpot)) if t is not None]
        return f"p{self.percentile:g} " + " and ".join(targets) if targets else "no SLO"


@dataclass(frozen=True)
class RunSummary:
    """One simulated run, reduced to what tuning compares (small: what the tuner's workers return)."""

    metrics: Metrics
    slo: PercentileSLO
    num_gpus: int
    kv_tokens: int  # KV cache tokens over all replicas
    peak_kv_use: float  # the highest fraction of a replica's KV blocks in use after a step
    peak_running: int  # the most requests a replica ran in one step
    memory_bound_share: float  # of steps
    mean_queue_wait: float  # seconds from arrival to first scheduled, averaged over requests
    offered_rate: float  # the workload's request rate (math.inf: an offline batch)

    @property
    def slo_met(self) -> bool:
        return self.slo.met(self.metrics)

    @property
    def goodput(self) -> float:
        return self.metrics.goodput if self.metrics.goodput is not None else self.metrics.request_throughput

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput / self.num_gpus

    def cost_per_million_tokens(self, gpu_price_per_hour: float) -> float:
        """Dollars (or whatever the price is in) per million output tokens at this run's rate."""
        if not gpu_price_per_hour >= 0:
            raise ValueError(f"gpu_price_per_hour={gpu_price_per_hour!r} must be >= 0")
        return self.num_gpus * gpu_price_per_hour / 3600 / self.metrics.output_throughput * 1e6


def judged_metrics(trace: list[StepRecord], arrival_times: dict[str, float], slo: PercentileSLO,
                   percentiles: tuple[float, ...], num_preemptions: int) -> tuple[Metrics, list[RequestTimeline]]:
    """The serving metrics of a trace at ``percentiles`` and at the SLO's own, goodput by the SLO's
    per-request targets; and the requests' timelines they came from."""
    timelines = request_timelines(trace, arrival_times)
    if not timelines:
        raise ValueError("the run has no finished request")
    duration = max(t.finished for t in timelines) - min(arrival_times.values())
    asked = tuple(sorted({float(p) for p in percentiles} | {float(slo.percentile)}))
    return summarize(timelines, duration, slo.per_request, percentiles=asked,
                     num_preemptions=num_preemptions), timelines


def summarize_run(result: SimResult, slo: PercentileSLO, offered_rate: float,
                  percentiles: tuple[float, ...] = (50.0, 99.0)) -> RunSummary:
    """A `RunSummary` of ``result``: the metrics at ``percentiles`` and the SLO's, and the run's shape."""
    metrics, timelines = judged_metrics(result.trace, result.arrival_times, slo, percentiles,
                                        sum(len(r.preempted) for r in result.trace))
    layout = result.config.layout
    return run_summary(metrics, timelines, slo, offered_rate, num_gpus=layout.num_gpus,
                       kv_tokens=result.num_blocks * result.config.cache_config.block_size * layout.dp,
                       steps=result.trace, num_blocks=result.num_blocks, costs=result.step_costs)


def run_summary(metrics: Metrics, timelines: list[RequestTimeline], slo: PercentileSLO, offered_rate: float, *,
                num_gpus: int, kv_tokens: int, steps: list[StepRecord], num_blocks: int,
                costs: list[StepCost]) -> RunSummary:
    """The `RunSummary` of a run's `judged_metrics`, its replicas' ``steps`` (of ``num_blocks`` KV
    blocks each: the peaks) and every step's cost (the memory-bound share)."""
    return RunSummary(
        metrics=metrics, slo=slo, num_gpus=num_gpus, kv_tokens=kv_tokens,
        peak_kv_use=1 - min(r.num_free_blocks for r in steps) / num_blocks,
        peak_running=max(r.num_running for r in steps),
        memory_bound_share=sum(c.bound == "memory" for c in costs) / len(costs),
        mean_queue_wait=float(np.mean([t.first_scheduled - t.arrival for t in timelines])),
        offered_rate=offered_rate)


@dataclass(frozen=True)
class Verdict:
    constraint: str  # "KV capacity", "queueing", "SLO", "memory bandwidth", "compute"
    sentence: str  # what binds, and the knob that moves it


def verdict(s: RunSummary, *, max_num_seqs: int, max_num_batched_tokens: int) -> Verdict:
    """The constraint that binds this run, checked in the order one would fix them: lost work
    (preemptions), then waiting (queueing), then the latency targets, then the roofline side."""
    m = s.metrics
    if m.num_preemptions:
        return Verdict("KV capacity", (
            f"KV capacity binds: {m.num_preemptions} preemptions (the cache, {s.kv_tokens:,} tokens, peaked at "
            f"{s.peak_kv_use:.0%}) threw work away to be recomputed. Raise gpu_memory_utilization, use an fp8 KV "
            f"cache, add TP (weights split, more memory per replica for KV) or lower max_num_seqs={max_num_seqs}."))
    misses = s.slo.misses(m)
    queued = (math.isfinite(s.offered_rate) and s.mean_queue_wait > 0.5 * m.ttft.mean
              and ("ttft" in misses or (s.slo.ttft is None and m.ttft.p99 > 1.0)))
    if queued:
        wait = f"requests wait {s.mean_queue_wait * 1e3:,.0f} ms on average before their first step"
        if s.peak_running >= max_num_seqs:
            return Verdict("queueing", f"Queueing binds: {wait}, while the batch is full at max_num_seqs="
                           f"{max_num_seqs}. Raise max_num_seqs (the KV cache peaked at {s.peak_kv_use:.0%}).")
        if s.peak_kv_use > 0.95:
            return Verdict("queueing", f"Queueing binds: {wait} for KV blocks (the cache is full). Raise "
                           "gpu_memory_utilization, use an fp8 KV cache, or add GPUs (TP for memory, DP for replicas).")
        return Verdict("queueing", f"Queueing binds: {wait}: at {s.offered_rate:g} req/s the GPUs are saturated "
                       f"({s.memory_bound_share:.0%} of steps memory-bound). Add DP replicas, or lower the rate.")
    if "tpot" in misses:
        v, target = misses["tpot"]
        return Verdict("SLO", (
            f"The TPOT target binds: p{s.slo.percentile:g} TPOT {v * 1e3:.1f} ms is over {target * 1e3:g} ms: every "
            f"decode step carries up to {s.peak_running} requests and prefill chunks of up to "
            f"{max_num_batched_tokens} tokens. Lower max_num_batched_tokens or max_num_seqs, add TP (each step is "
            "shorter), or use speculative decoding."))
    if "ttft" in misses:
        v, target = misses["ttft"]
        offline = (" An offline batch queues every request at time 0, so its TTFT is the queue: judge it by "
                   "throughput and drop the TTFT target." if not math.isfinite(s.offered_rate) else "")
        return Verdict("SLO", (
            f"The TTFT target binds: p{s.slo.percentile:g} TTFT {v * 1e3:,.0f} ms is over {target * 1e3:g} ms. "
            f"Raise max_num_batched_tokens={max_num_batched_tokens} (bigger prefill chunks), turn on prefix "
            f"caching, or add TP.{offline}"))
    if s.memory_bound_share >= 0.5:
        return Verdict("memory bandwidth", (
            f"Memory bandwidth binds: {s.memory_bound_share:.0%} of steps are memory-bound (each reads every "
            "weight and the batch's KV for a few tokens). Batch more per step (raise max_num_seqs or the load), "
            "use fp8 weights or KV cache, or speculative decoding (several tokens per weight read)."))
    return Verdict("compute", (
        f"Compute binds: {1 - s.memory_bound_share:.0%} of steps are compute-bound (big prefill chunks, full "
        "batches). fp8 weights double the FLOP rate where the GPU has it; TP adds GPUs to each step; prefix "
        "caching skips shared prompt work."))
