"""Serving metrics read from a step trace, defined as `vllm bench serve` defines them.

For a request that arrives at ``a``, gets its output tokens at times ``t_1 .. t_n`` (the end of the
step that sampled each) and so finishes at ``t_n``:

* TTFT = ``t_1 - a``; E2E latency = ``t_n - a``;
* TPOT = ``(t_n - t_1) / (n - 1)``, over requests with ``n > 1``;
* ITL: every gap ``t_{k+1} - t_k``, pooled over all requests;
* duration = last finish - first arrival; request throughput = requests / duration, output
  throughput = output tokens / duration, total throughput adds the prompt tokens;
* goodput = requests meeting every given SLO (TTFT, TPOT, E2E; unset ones ignored) / duration.

Latency statistics are the mean, the median and the 99th percentile (linear interpolation, like
``numpy.percentile``), in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minivllm.core.trace import StepRecord


@dataclass(frozen=True)
class LatencyStats:
    mean: float
    median: float
    p99: float

    @classmethod
    def of(cls, values) -> "LatencyStats":
        if len(values) == 0:
            return cls(float("nan"), float("nan"), float("nan"))
        v = np.asarray(values, dtype=float)
        return cls(float(v.mean()), float(np.median(v)), float(np.percentile(v, 99)))


@dataclass(frozen=True)
class SLO:
    """Latency targets in seconds; None means no target."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft", "tpot", "e2e"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"SLO.{name}={value!r} must be > 0 or None")


@dataclass(frozen=True)
class RequestTimeline:
    """One request's life, read from the trace (the Gantt chart's bar)."""

    request_id: str
    arrival: float
    first_scheduled: float
    first_token: float
    finished: float
    token_times: tuple[float, ...]
    num_prompt_tokens: int
    num_preemptions: int

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def e2e(self) -> float:
        return self.finished - self.arrival

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


@dataclass(frozen=True)
class Metrics:
    num_requests: int
    duration: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    goodput: float | None  # requests/s meeting the SLO, when one was given
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    num_preemptions: int

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs in `vllm bench serve`'s order, latencies in ms."""
        rows = [("Successful requests", f"{self.num_requests}"),
                ("Benchmark duration (s)", f"{self.duration:.2f}"),
                ("Total input tokens", f"{self.total_input_tokens}"),
                ("Total generated tokens", f"{self.total_output_tokens}"),
                ("Request throughput (req/s)", f"{self.request_throughput:.2f}"),
                ("Output token throughput (tok/s)", f"{self.output_throughput:.1f}"),
                ("Total token throughput (tok/s)", f"{self.total_token_throughput:.1f}")]
        if self.goodput is not None:
            rows.append(("Request goodput (req/s)", f"{self.goodput:.2f}"))
        for label, s in (("TTFT", self.ttft), ("TPOT", self.tpot), ("ITL", self.itl), ("E2E latency", self.e2e)):
            rows += [(f"Mean {label} (ms)", f"{s.mean * 1e3:.2f}"), (f"Median {label} (ms)", f"{s.median * 1e3:.2f}"),
                     (f"P99 {label} (ms)", f"{s.p99 * 1e3:.2f}")]
        rows.append(("Preemptions", f"{self.num_preemptions}"))
        return rows

    def table(self) -> str:
        return "\n".join(f"{label:<34}{value:>12}" for label, value in self.rows())


def request_timelines(trace: list[StepRecord], arrival_times: dict[str, float]) -> list[RequestTimeline]:
    """Every finished request's timeline, in the order of ``arrival_times``."""
    first_scheduled: dict[str, float] = {}
    prompt_len: dict[str, int] = {}
    tokens: dict[str, list[float]] = {rid: [] for rid in arrival_times}
    finished: dict[str, float] = {}
    preemptions: dict[str, int] = dict.fromkeys(arrival_times, 0)
    for rec in trace:
        for c in rec.chunks:
            if c.request_id not in first_scheduled:
                first_scheduled[c.request_id] = rec.start_time
            if c.sampled_token is not None:
                if not tokens[c.request_id]:  # the first sample ends the prompt (and any recompute)
                    prompt_len[c.request_id] = c.start + c.num_tokens
                tokens[c.request_id].append(rec.end_time)
        for rid in rec.preempted:
            preemptions[rid] += 1
        for rid, _reason in rec.finished:
            finished[rid] = rec.end_time
    return [RequestTimeline(rid, arrival, first_scheduled[rid], tokens[rid][0], finished[rid], tuple(tokens[rid]),
                            prompt_len[rid], preemptions[rid])
            for rid, arrival in arrival_times.items() if rid in finished]


def compute_metrics(trace: list[StepRecord], arrival_times: dict[str, float], slo: SLO | None = None) -> Metrics:
    """The `vllm bench serve` summary of a trace; ``arrival_times`` maps request id to arrival."""
    if not trace:
        raise ValueError("trace is empty: nothing ran")
    timelines = request_timelines(trace, arrival_times)
    if not timelines:
        raise ValueError("trace has no finished request")
    duration = max(t.finished for t in timelines) - min(arrival_times.values())
    out_tokens = sum(len(t.token_times) for t in timelines)
    in_tokens = sum(t.num_prompt_tokens for t in timelines)
    itl = np.concatenate([np.diff(t.token_times) for t in timelines])
    goodput = None
    if slo is not None:
        good = sum(1 for t in timelines
                   if (slo.ttft is None or t.ttft <= slo.ttft) and (slo.e2e is None or t.e2e <= slo.e2e)
                   and (slo.tpot is None or t.tpot is None or t.tpot <= slo.tpot))
        goodput = good / duration
    return Metrics(
        num_requests=len(timelines), duration=duration, total_input_tokens=in_tokens,
        total_output_tokens=out_tokens, request_throughput=len(timelines) / duration,
        output_throughput=out_tokens / duration, total_token_throughput=(in_tokens + out_tokens) / duration,
        goodput=goodput, ttft=LatencyStats.of([t.ttft for t in timelines]),
        tpot=LatencyStats.of([t.tpot for t in timelines if t.tpot is not None]),
        itl=LatencyStats.of(itl), e2e=LatencyStats.of([t.e2e for t in timelines]),
        num_preemptions=sum(len(r.preempted) for r in trace))


@dataclass(frozen=True)
class Timeline:
    """Per-step series for plots: step end times, KV blocks in use (fraction), batch size, queue,
    preemptions in the step."""

    times: np.ndarray
    kv_usage: np.ndarray
    num_running: np.ndarray
    num_waiting: np.ndarray
    preemptions: np.ndarray


def step_timeline(trace: list[StepRecord], num_blocks: int) -> Timeline:
    if num_blocks < 1:
        raise ValueError(f"num_blocks={num_blocks!r} must be >= 1")
    return Timeline(
        times=np.array([r.end_time for r in trace]),
        kv_usage=np.array([1 - r.num_free_blocks / num_blocks for r in trace]),
        num_running=np.array([r.num_running for r in trace]),
        num_waiting=np.array([r.num_waiting for r in trace]),
        preemptions=np.array([len(r.preempted) for r in trace]))
