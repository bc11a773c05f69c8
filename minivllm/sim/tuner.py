"""Tuning a deployment in the simulator: the latency-throughput frontier of a few configurations, and
an auto-tuner in the spirit of vLLM's ``benchmarks/auto_tune`` (which searches ``max_num_seqs`` and
``max_num_batched_tokens`` for the best throughput meeting a latency requirement). Here the search
also covers the parallel layout (every TP x PP x DP of the GPUs that the model accepts) and, when
asked, the KV-cache dtype and CUDA graphs; it ranks by goodput per GPU or by cost per million output
tokens among the configurations that meet the SLO (`minivllm.sim.evaluation` defines both), and says
why each of the top few beats the next.

Candidates run in parallel processes (``fork``: each worker generates the workload's requests once);
a candidate the simulator refuses (weights that do not fit, TP not dividing the heads, ...) is
reported with its reason.

    from minivllm.sim import get_hardware, get_model
    from minivllm.sim.evaluation import PercentileSLO
    from minivllm.sim.presets import tuning_workload
    from minivllm.sim.tuner import auto_tune
    result = auto_tune(get_model("Llama-3.1-8B"), get_hardware("H100-SXM"), 2, tuning_workload("chat"),
                       PercentileSLO(ttft=0.5, tpot=0.03))
    print(result.report())
"""
from __future__ import annotations

import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

from minivllm.sim.evaluation import PercentileSLO, RunSummary, summarize_run
from minivllm.sim.hardware import Hardware
from minivllm.sim.model_specs import ModelSpec
from minivllm.sim.planner import ParallelLayout
from minivllm.sim.simulator import SimConfig, Simulator
from minivllm.sim.workload import Request, Workload

OBJECTIVES = ("goodput_per_gpu", "cost")


# ---- evaluating one configuration, in this process or a worker ------------------------------------
@dataclass(frozen=True)
class Refused:
    """A configuration the simulator would not run, and its reason."""

    reason: str


@lru_cache(maxsize=1)  # a worker generates each workload once: a search's workloads come one rate after another
def requests_of(workload: Workload) -> list[Request]:
    return workload.generate()


def evaluate(config: SimConfig, workload: Workload, slo: PercentileSLO) -> RunSummary | Refused:
    """Simulate ``workload`` on ``config``; a setting the simulator refuses comes back as `Refused`."""
    try:
        result = Simulator(config).run(requests_of(workload))
    except ValueError as e:
        return Refused(str(e))
    return summarize_run(result, slo, workload.request_rate)


def evaluate_all(tasks: Sequence[tuple[SimConfig, Workload, PercentileSLO]], workers: int | None = None,
                 evaluate: Callable[..., Any] = evaluate) -> list:
    """``evaluate(config, workload, slo)`` for each task (default: `evaluate`, a `RunSummary` or
    `Refused`), in ``workers`` processes (default: the CPUs; 1: here); ``evaluate`` must be a
    module-level function."""
    workers = check_workers(workers)
    if workers == 1 or len(tasks) <= 1:
        return [evaluate(*t) for t in tasks]
    # fork: the workers start from this process's imports; results are small (summaries, not traces)
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(evaluate, *zip(*tasks)))


def check_workers(workers: int | None) -> int:
    if workers is None:
        return os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} must be an int >= 1 or None (the CPUs)")
    return workers


def workloads_at(workload_factory: Callable[[float], Workload], rates: Sequence[float]) -> list[Workload]:
    """``workload_factory(rate)`` for each of ``rates``, lowest first; refuses a rate that is not a
    finite one > 0, or a factory whose workload is not at the rate asked."""
    if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
        raise ValueError(f"rates={list(rates)!r} must be finite request rates > 0")
    workloads = [workload_factory(r) for r in sorted(rates)]
    for w, r in zip(workloads, sorted(rates)):
        if not isinstance(w, Workload) or w.request_rate != r:
            raise ValueError(f"workload_factory({r}) must return a Workload at request_rate={r}, got {w!r}")
    return workloads


# ---- the frontier -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrontierPoint:
    request_rate: float  # offered, requests per second
    output_throughput: float  # tokens per second
    goodput: float  # requests per second meeting every target
    ttft_p99: float  # seconds
    tpot_p99: float
    slo_met: bool


@dataclass(frozen=True)
class FrontierCurve:
    label: str
    points: tuple[FrontierPoint, ...]  # one per rate the configuration ran
    refused: tuple[tuple[float, str], ...]  # (rate, reason) where the simulator refused it


def frontier(configs: Mapping[str, SimConfig], workload_factory: Callable[[float], Workload],
             rates: Sequence[float], slo: PercentileSLO | None = None, *,
             workers: int | None = None) -> list[FrontierCurve]:
    """Throughput against p99 TTFT and TPOT as the offered rate rises: each configuration (by label)
    runs ``workload_factory(rate)`` at every rate of ``rates``, in parallel processes."""
    if not configs:
        raise ValueError("configs is empty: give at least one {label: SimConfig}")
    workloads = workloads_at(workload_factory, rates)
    slo = slo or PercentileSLO()
    # rate-major order: a worker sees one workload for several configurations in a row
    tasks = [(config, w, slo) for w in workloads for config in configs.values()]
    results = evaluate_all(tasks, workers)
    curves = []
    for i, label in enumerate(configs):
        mine = results[i::len(configs)]
        points = tuple(FrontierPoint(w.request_rate, s.metrics.output_throughput, s.goodput, s.metrics.ttft.p99,
                                     s.metrics.tpot.p99, s.slo_met)
                       for w, s in zip(workloads, mine) if isinstance(s, RunSummary))
        refused = tuple((w.request_rate, s.reason) for w, s in zip(workloads, mine) if isinstance(s, Refused))
        curves.append(FrontierCurve(label, points, refused))
    return curves


# ---- the auto-tuner ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """The knobs the tuner varies; the rest (``engine_args``) is fixed for a search."""

    layout: ParallelLayout
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_dtype: str = "auto"
    cuda_graphs: bool = True

    def __str__(self) -> str:
        parts = [str(self.layout), f"max_num_seqs={self.max_num_seqs}",
                 f"max_num_batched_tokens={self.max_num_batched_tokens}"]
        parts += [f"kv_cache_dtype={self.kv_cache_dtype}"] * (self.kv_cache_dtype != "auto")
        parts += ["eager"] * (not self.cuda_graphs)
        return ", ".join(parts)


@dataclass(frozen=True)
class Ranked:
    rank: int
    candidate: Candidate
    summary: RunSummary
    score: float  # goodput per GPU (req/s) or cost per million output tokens
    why: str
    same_run: tuple[Candidate, ...] = ()  # other candidates whose run was step for step the same

    def __str__(self) -> str:
        also = f" (the same run: {'; '.join(map(str, self.same_run))})" if self.same_run else ""
        return f"#{self.rank} {self.candidate}{also}: {self.why}"


@dataclass(frozen=True)
class TuneResult:
    objective: str
    slo: PercentileSLO
    gpu_price_per_hour: float
    top: tuple[Ranked, ...]
    evaluated: tuple[tuple[Candidate, RunSummary], ...]  # best first
    refused: tuple[tuple[Candidate, str], ...]
    seconds: float  # wall time of the search

    def report(self) -> str:
        lines = [f"{len(self.evaluated) + len(self.refused)} candidates ({len(self.refused)} refused) in "
                 f"{self.seconds:.1f} s; objective {self.objective}, SLO {self.slo}"]
        lines += [str(r) for r in self.top]
        reasons = sorted({reason for _, reason in self.refused})
        lines += [f"refused: {reason}" for reason in reasons[:5]]
        return "\n".join(lines)


def layouts_for(num_gpus: int) -> list[ParallelLayout]:
    """Every TP x PP x DP that uses exactly ``num_gpus`` GPUs (the model may refuse some)."""
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
        raise ValueError(f"num_gpus={num_gpus!r} must be an int >= 1")
    return [ParallelLayout(tp=tp, pp=pp, dp=num_gpus // (tp * pp))
            for tp in range(1, num_gpus + 1) if num_gpus % tp == 0
            for pp in range(1, num_gpus // tp + 1) if (num_gpus // tp) % pp == 0]


def auto_tune(model: ModelSpec, hardware: Hardware, num_gpus: int, workload: Workload, slo: PercentileSLO,
              objective: str = "goodput_per_gpu", *, max_num_seqs: Sequence[int] = (64, 128, 256),
              max_num_batched_tokens: Sequence[int] = (2048, 4096, 8192), kv_cache_dtypes: Sequence[str] = ("auto",),
              cuda_graphs: Sequence[bool] = (True,), dtype: str = "bf16", gpu_price_per_hour: float = 2.0,
              top: int = 3, workers: int | None = None, **engine_args) -> TuneResult:
    """Search layouts of ``num_gpus`` GPUs x ``max_num_seqs`` x ``max_num_batched_tokens`` (x KV
    dtypes x CUDA graphs) on ``workload`` for the best ``objective`` among the candidates meeting
    ``slo``: "goodput_per_gpu" (highest) or "cost" (lowest cost per million output tokens at
    ``gpu_price_per_hour``). ``engine_args`` (gpu_memory_utilization, max_model_len, ...) hold for
    every candidate; ``max_model_len`` defaults to the workload's longest request, rounded up to a
    power of two. Returns the ``top`` best with why each beats the next, and every refusal."""
    if not isinstance(model, ModelSpec):
        raise ValueError(f"model={model!r} must be a ModelSpec (minivllm.sim.get_model)")
    if not isinstance(hardware, Hardware):
        raise ValueError(f"hardware={hardware!r} must be a Hardware (minivllm.sim.get_hardware)")
    if not isinstance(workload, Workload):
        raise ValueError(f"workload={workload!r} must be a Workload (minivllm.sim.presets.tuning_workload)")
    if not isinstance(slo, PercentileSLO):
        raise ValueError(f"slo={slo!r} must be a PercentileSLO")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} must be one of {OBJECTIVES}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top={top!r} must be an int >= 1")
    if not gpu_price_per_hour > 0:
        raise ValueError(f"gpu_price_per_hour={gpu_price_per_hour!r} must be > 0")
    for name, values in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                         ("kv_cache_dtypes", kv_cache_dtypes), ("cuda_graphs", cuda_graphs)):
        if not values:
            raise ValueError(f"{name}={values!r} must list at least one value")
    check_workers(workers)
    engine_args.setdefault("max_model_len", default_max_model_len(workload, model))
    candidates = [Candidate(layout, seqs, budget, kv, graphs) for layout in layouts_for(num_gpus)
                  for seqs in max_num_seqs for budget in max_num_batched_tokens
                  for kv in kv_cache_dtypes for graphs in cuda_graphs]
    start = time.perf_counter()
    tasks, refused = [], []
    for c in candidates:
        try:  # the engine's own checks of the arguments: a bad value is a refused candidate
            tasks.append((c, (sim_config(model, hardware, dtype, c, engine_args), workload, slo)))
        except ValueError as e:
            refused.append((c, str(e)))
    results = evaluate_all([t for _, t in tasks], workers)
    evaluated = []
    for (c, _), s in zip(tasks, results):
        if isinstance(s, Refused):
            refused.append((c, s.reason))
        else:
            evaluated.append((c, s))

    def score(s: RunSummary) -> float:
        return s.goodput_per_gpu if objective == "goodput_per_gpu" else s.cost_per_million_tokens(gpu_price_per_hour)

    def key(item: tuple[Candidate, RunSummary]):
        s = item[1]  # meeting the SLO first, then the objective, then the lower TPOT, then TTFT
        better = score(s) if objective == "goodput_per_gpu" else -score(s)
        return (s.slo_met, better, -s.slo.value(s.metrics, "tpot"), -s.slo.value(s.metrics, "ttft"))

    evaluated.sort(key=key, reverse=True)
    # candidates that ran the very same steps (a max_num_seqs the batch never reached) rank once
    groups: dict[tuple, list[tuple[Candidate, RunSummary]]] = {}
    for c, s in evaluated:
        groups.setdefault(same_run_key(s), []).append((c, s))
    best = [members[0] for members in groups.values()][:top + 1]
    twins = [tuple(c for c, _ in members[1:]) for members in groups.values()]
    ranked = tuple(Ranked(i + 1, c, s, score(s), why_wins(i + 1, s, best[i + 1] if i + 1 < len(best) else None,
                                                          objective, gpu_price_per_hour), twins[i])
                   for i, (c, s) in enumerate(best[:top]))
    return TuneResult(objective, slo, gpu_price_per_hour, ranked, tuple(evaluated), tuple(refused),
                      time.perf_counter() - start)


def same_run_key(s: RunSummary) -> tuple:
    m = s.metrics
    return (s.num_gpus, m.duration, m.ttft.mean, m.tpot.mean, m.itl.mean, m.num_preemptions)


def sim_config(model: ModelSpec, hardware: Hardware, dtype: str, c: Candidate, engine_args: dict) -> SimConfig:
    return SimConfig(model, hardware, dtype, layout=c.layout, kv_cache_dtype=c.kv_cache_dtype,
                     cuda_graphs=c.cuda_graphs, max_num_seqs=c.max_num_seqs,
                     max_num_batched_tokens=c.max_num_batched_tokens, **engine_args)


def default_max_model_len(workload: Workload, model: ModelSpec) -> int:
    """The workload's longest possible request rounded up to a power of two (the model's limit at most)."""
    prompt, output = workload.prompt_len, workload.output_len
    if prompt.maximum is None or output.maximum is None:
        return model.max_model_len
    longest = max(prompt.maximum, workload.shared_prefix_len + 1) + output.maximum
    return min(1 << (longest - 1).bit_length(), model.max_model_len)


def why_wins(rank: int, s: RunSummary, runner_up: tuple[Candidate, RunSummary] | None, objective: str,
             price: float) -> str:
    """A sentence from the metrics: what this candidate has that the next one down does not."""
    m = s.metrics
    own = (f"goodput {s.goodput_per_gpu:.2f} req/s per GPU, {m.output_throughput:,.0f} tok/s, "
           f"p{s.slo.percentile:g} TTFT {s.slo.value(m, 'ttft') * 1e3:,.0f} ms, TPOT "
           f"{s.slo.value(m, 'tpot') * 1e3:.1f} ms, ${s.cost_per_million_tokens(price):.2f} per M tokens"
           + ("" if s.slo_met else "; misses the SLO"))
    if runner_up is None:
        return own + "."
    c2, s2 = runner_up
    m2 = s2.metrics
    reasons = []
    if s.slo_met and not s2.slo_met:
        missed = ", ".join(f"{k.upper()} {v * 1e3:,.1f} ms > {t * 1e3:g}" for k, (v, t) in s2.slo.misses(m2).items())
        reasons.append(f"#{rank + 1} misses the SLO ({missed})")
    if m.num_preemptions < m2.num_preemptions:
        ratio = s.kv_tokens / s2.kv_tokens
        kv = f"{ratio:.1f}x the KV capacity of #{rank + 1}, so " if ratio > 1.05 else ""
        reasons.append(f"{kv}{m.num_preemptions} preemptions against {m2.num_preemptions}")
    if s.goodput_per_gpu > 1.02 * s2.goodput_per_gpu:
        reasons.append(f"{s.goodput_per_gpu / s2.goodput_per_gpu:.2f}x the goodput per GPU")
    if m.output_throughput > 1.02 * m2.output_throughput:
        reasons.append(f"{m.output_throughput / m2.output_throughput:.2f}x the output throughput")
    tpot, tpot2 = s.slo.value(m, "tpot"), s2.slo.value(m2, "tpot")
    if tpot < 0.95 * tpot2:
        reasons.append(f"p{s.slo.percentile:g} TPOT {tpot * 1e3:.1f} ms against {tpot2 * 1e3:.1f}")
    ttft, ttft2 = s.slo.value(m, "ttft"), s2.slo.value(m2, "ttft")
    if ttft < 0.95 * ttft2:
        reasons.append(f"p{s.slo.percentile:g} TTFT {ttft * 1e3:,.0f} ms against {ttft2 * 1e3:,.0f}")
    if not reasons:
        reasons.append(f"ties #{rank + 1} (goodput and throughput within 2 %, p{s.slo.percentile:g} latencies within 5 %)")
    return f"{own}. Beats #{rank + 1} ({c2}): " + "; ".join(reasons) + "."
