"""Serving metrics read from a step trace, defined as `vllm bench serve` defines them.

For a request that arrives at ``a``, gets its output tokens at times ``t_1 .. t_n`` (the end of the
step that sampled each) and so finishes at ``t_n``:

* TTFT = ``t_1 - a``; E2E latency = ``t_n - a``;
* TPOT = ``(t_n - t_1) / (n - 1)``, over requests with ``n > 1``;
* ITL: every gap ``t_{k+1} - t_k``, pooled over all requests;
* duration = last finish - first arrival; request throughput = requests / duration, output
  throughput = output tokens / duration, total throughput adds the prompt tokens;
* goodput = requests meeting every given SLO (TTFT, TPOT, E2E; unset ones ignored) / duration.

Latency statistics are the mean, the median, the standard deviation and chosen percentiles (the
99th unless told; linear interpolation, like ``numpy.percentile``), in seconds.

The summary and its report are written once, over `RequestRecord`s, and used twice: `compute_metrics`
reads the records from a simulated trace, the bench client (`python -m minivllm.bench serve`) measures
them over HTTP; both call `summarize` and print with `report`, so a simulated run and a measured one
print the same table, laid out as `vllm bench serve` prints it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from minivllm.core.trace import StepRecord


@dataclass(frozen=True)
class LatencyStats:
    """One latency's statistics in seconds; ``p99`` always, ``percentiles`` those asked for."""

    mean: float
    median: float
    p99: float
    std: float = math.nan
    percentiles: tuple[tuple[float, float], ...] = ()  # (p, value) for each percentile asked for

    @classmethod
    def of(cls, values, percentiles: Sequence[float] = (99.0,)) -> "LatencyStats":
        if len(values) == 0:  # no data is nan, not vLLM's 0: a latency of 0 ms would be a claim
            return cls(math.nan, math.nan, math.nan, math.nan, tuple((float(p), math.nan) for p in percentiles))
        v = np.asarray(values, dtype=float)
        return cls(float(v.mean()), float(np.median(v)), float(np.percentile(v, 99)), float(v.std()),
                   tuple((float(p), float(np.percentile(v, p))) for p in percentiles))


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

    def met_by(self, r: RequestRecord) -> bool:
        """Every target given is met (a one-token request has no TPOT and meets that target, as in vLLM)."""
        return ((self.ttft is None or r.ttft <= self.ttft) and (self.e2e is None or r.e2e <= self.e2e)
                and (self.tpot is None or r.tpot is None or r.tpot <= self.tpot))


@dataclass(frozen=True)
class RequestRecord:
    """One finished request as the serving metrics see it, simulated or measured: it arrived (was
    sent) at ``arrival``; its output came at ``token_times`` (one time per streamed chunk; in the
    simulator a step's tokens, one or, with accepted drafts, several), the first at ``first_token``, the last at ``finished``."""

    request_id: str
    arrival: float
    first_token: float
    finished: float
    token_times: tuple[float, ...]
    num_prompt_tokens: int
    num_output_tokens: int

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def e2e(self) -> float:
        return self.finished - self.arrival

    @property
    def tpot(self) -> float | None:
        # vLLM's (latency - TTFT) / (tokens - 1): a chunk may carry several tokens, so not the chunk gaps
        n = self.num_output_tokens
        return (self.finished - self.first_token) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> np.ndarray:
        return np.diff(self.token_times)


@dataclass(frozen=True)
class RequestTimeline(RequestRecord):
    """One simulated request's life, read from the trace (the Gantt chart's bar)."""

    first_scheduled: float
    num_preemptions: int


@dataclass(frozen=True)
class Metrics:
    num_requests: int  # completed
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
    num_preemptions: int | None  # the simulator's count; None where unknown (a measured run)
    num_failed: int = 0

    def stats(self, metric: str) -> LatencyStats:
        """The statistics of ``metric``, named as `vllm bench serve --percentile-metrics` names it."""
        return {"ttft": self.ttft, "tpot": self.tpot, "itl": self.itl, "e2el": self.e2e}[metric]

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs in `vllm bench serve`'s order, latencies in ms (the labs' HTML table)."""
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
        if self.num_preemptions is not None:
            rows.append(("Preemptions", f"{self.num_preemptions}"))
        return rows

    def table(self, percentile_metrics: Sequence[str] = ("ttft", "tpot", "itl", "e2el")) -> str:
        """The `vllm bench serve` result block (`report`)."""
        return report(self, percentile_metrics)

    def result_dict(self, percentile_metrics: Sequence[str] = ("ttft", "tpot", "itl", "e2el")) -> dict:
        """The summary under the keys of `vllm bench serve --save-result` (latencies in ms; None where
        there was no data, where vLLM writes 0)."""
        result = {"duration": self.duration, "completed": self.num_requests, "failed": self.num_failed,
                  "total_input_tokens": self.total_input_tokens, "total_output_tokens": self.total_output_tokens,
                  "request_throughput": self.request_throughput, "request_goodput": self.goodput,
                  "output_throughput": self.output_throughput, "total_token_throughput": self.total_token_throughput}
        for metric in percentile_metrics:
            s = self.stats(metric)
            result |= {f"mean_{metric}_ms": _ms(s.mean), f"median_{metric}_ms": _ms(s.median),
                       f"std_{metric}_ms": _ms(s.std)}
            result |= {f"p{_percentile_word(p)}_{metric}_ms": _ms(v) for p, v in s.percentiles}
        return result


PERCENTILE_METRICS = {"ttft": ("TTFT", "Time to First Token"),  # vLLM's names and section headers
                      "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
                      "itl": ("ITL", "Inter-token Latency"),
                      "e2el": ("E2EL", "End-to-end Latency")}


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else seconds * 1e3


def _percentile_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)  # 99 -> "99", 99.9 -> "99.9", as vLLM names them


def summarize(records: Sequence[RequestRecord], duration: float, slo: SLO | None = None, *,
              num_failed: int = 0, percentiles: Sequence[float] = (99.0,),
              num_preemptions: int | None = None) -> Metrics:
    """The `vllm bench serve` summary of the finished requests ``records`` over ``duration`` seconds;
    ``num_failed`` requests did not finish. ITL pools every gap of every request."""
    if not duration > 0:
        raise ValueError(f"duration={duration!r} must be > 0")
    out_tokens = sum(r.num_output_tokens for r in records)
    in_tokens = sum(r.num_prompt_tokens for r in records)
    itl = np.concatenate([r.itls for r in records]) if records else np.array([])
    goodput = None if slo is None else sum(slo.met_by(r) for r in records) / duration
    return Metrics(
        num_requests=len(records), duration=duration, total_input_tokens=in_tokens,
        total_output_tokens=out_tokens, request_throughput=len(records) / duration,
        output_throughput=out_tokens / duration, total_token_throughput=(in_tokens + out_tokens) / duration,
        goodput=goodput, ttft=LatencyStats.of([r.ttft for r in records], percentiles),
        tpot=LatencyStats.of([r.tpot for r in records if r.tpot is not None], percentiles),
        itl=LatencyStats.of(itl, percentiles), e2e=LatencyStats.of([r.e2e for r in records], percentiles),
        num_preemptions=num_preemptions, num_failed=num_failed)


def report(m: Metrics, percentile_metrics: Sequence[str] = ("ttft", "tpot", "itl", "e2el"), *,
           max_concurrency: int | None = None, request_rate: float | None = None) -> str:
    """The result block `vllm bench serve` prints, with the same labels, widths and sections: the
    simulator's `Metrics.table` and the bench client both print this."""
    def line(label: str, value, fmt: str = "") -> str:
        return f"{label:<40} {value:<10{fmt}}"

    lines = [f"{' Serving Benchmark Result ':=^50}", line("Successful requests:", m.num_requests),
             line("Failed requests:", m.num_failed)]
    if max_concurrency is not None:
        lines.append(line("Maximum request concurrency:", max_concurrency))
    if request_rate is not None and math.isfinite(request_rate):
        lines.append(line("Request rate configured (RPS):", request_rate, ".2f"))
    lines += [line("Benchmark duration (s):", m.duration, ".2f"), line("Total input tokens:", m.total_input_tokens),
              line("Total generated tokens:", m.total_output_tokens),
              line("Request throughput (req/s):", m.request_throughput, ".2f")]
    if m.goodput is not None:
        lines.append(line("Request goodput (req/s):", m.goodput, ".2f"))
    lines += [line("Output token throughput (tok/s):", m.output_throughput, ".2f"),
              line("Total token throughput (tok/s):", m.total_token_throughput, ".2f")]
    for metric in percentile_metrics:
        name, header = PERCENTILE_METRICS[metric]
        s = m.stats(metric)
        lines += [f"{header:-^50}", line(f"Mean {name} (ms):", s.mean * 1e3, ".2f"),
                  line(f"Median {name} (ms):", s.median * 1e3, ".2f")]
        lines += [line(f"P{_percentile_word(p)} {name} (ms):", v * 1e3, ".2f") for p, v in s.percentiles]
    lines.append("=" * 50)
    return "\n".join(lines)


def request_timelines(trace: list[StepRecord], arrival_times: dict[str, float]) -> list[RequestTimeline]:
    """Every finished request's timeline, in the order of ``arrival_times``."""
    first_scheduled: dict[str, float] = {}
    prompt_len: dict[str, int] = {}
    tokens: dict[str, list[float]] = {rid: [] for rid in arrival_times}  # one time per step that emitted
    num_output: dict[str, int] = dict.fromkeys(arrival_times, 0)  # with accepted drafts, several per step
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
                num_output[c.request_id] += 1 + c.num_accepted
        for rid in rec.preempted:
            preemptions[rid] += 1
        for rid, _reason in rec.finished:
            finished[rid] = rec.end_time
    return [RequestTimeline(request_id=rid, arrival=arrival, first_token=tokens[rid][0], finished=finished[rid],
                            token_times=tuple(tokens[rid]), num_prompt_tokens=prompt_len[rid],
                            num_output_tokens=num_output[rid], first_scheduled=first_scheduled[rid],
                            num_preemptions=preemptions[rid])
            for rid, arrival in arrival_times.items() if rid in finished]


def compute_metrics(trace: list[StepRecord], arrival_times: dict[str, float], slo: SLO | None = None, *,
                    percentiles: Sequence[float] = (99.0,)) -> Metrics:
    """The `vllm bench serve` summary of a trace; ``arrival_times`` maps request id to arrival."""
    if not trace:
        raise ValueError("trace is empty: nothing ran")
    timelines = request_timelines(trace, arrival_times)
    if not timelines:
        raise ValueError("trace has no finished request")
    duration = max(t.finished for t in timelines) - min(arrival_times.values())
    return summarize(timelines, duration, slo, percentiles=percentiles,
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
