"""Judging prefill/decode disaggregation (chapter 10): colocated against disaggregated at the same GPU
count across request rates, the prefill:decode split of N GPUs with the most goodput, and a verdict
in words.

* **goodput**: requests meeting both the TTFT and the TPOT target per second (`minivllm.sim.evaluation`);
  **goodput per GPU** divides by every GPU of both pools.
* **a split's capacity**: the most goodput it reaches over the request rates tried (goodput rises with
  the rate until the SLO starts to fail, then falls), and the highest rate at which it meets the SLO at
  its percentile (DistServe's measure: the rate a deployment sustains with, say, 90 % of requests
  within their targets).
* **transfer share**: the seconds requests spent between their prefill's end and their KV's arrival
  (waiting for decode blocks, then on the link) over the seconds of their end-to-end latency.

    from minivllm.sim.disagg_eval import best_split
    result = best_split(get_model("Llama-3.1-8B"), get_hardware("H100-SXM"), 4,
                        lambda rate: tuning_workload("chat", 400, rate), [10, 20, 40],
                        PercentileSLO(ttft=0.2, tpot=0.02, percentile=90))
    print(result.report())

Runs go to worker processes as the auto-tuner's do (`minivllm.sim.tuner`): ``fork``, each worker
generating a workload's requests once; a configuration the simulator refuses comes back as `Refused`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from minivllm.sim import tuner
from minivllm.sim.disagg import DisaggConfig, DisaggResult, DisaggSimulator, PoolConfig
from minivllm.sim.evaluation import PercentileSLO, RunSummary, judged_metrics, run_summary
from minivllm.sim.hardware import Hardware
from minivllm.sim.model_specs import ModelSpec
from minivllm.sim.planner import ParallelLayout
from minivllm.sim.simulator import SimConfig
from minivllm.sim.tuner import Refused
from minivllm.sim.workload import Workload


@dataclass(frozen=True)
class DisaggSummary:
    """A disaggregated run reduced to what the comparisons need (small: what workers return)."""

    run: RunSummary  # metrics over both pools; num_gpus counts both; the KV figures are the decode pool's
    prefill_gpus: int
    decode_gpus: int
    mean_transfer_bytes: float  # per request that crossed the link
    mean_transfer_time: float  # seconds from decode admission to the KV's arrival
    mean_admission_wait: float  # seconds from the prefill's end to decode admission
    transfer_share: float  # (admission wait + transfer) / end-to-end latency, summed over requests
    link: str
    link_bandwidth: float  # bytes/s one direction per GPU
    kv_rate_per_decode_gpu: float  # bytes/s of KV the arriving prompts make, per decode GPU: the link must carry it

    @property
    def goodput(self) -> float:
        return self.run.goodput

    @property
    def goodput_per_gpu(self) -> float:
        return self.run.goodput_per_gpu

    @property
    def slo_met(self) -> bool:
        return self.run.slo_met


def summarize_disagg(result: DisaggResult, slo: PercentileSLO, offered_rate: float,
                     percentiles: tuple[float, ...] = (50.0, 99.0)) -> DisaggSummary:
    """The `DisaggSummary` of ``result`` (the latencies the client sees, `DisaggResult.trace`)."""
    preemptions = sum(len(r.preempted) for r in result.prefill_trace + result.decode_trace)
    metrics, timelines = judged_metrics(result.trace, result.arrival_times, slo, percentiles, preemptions)
    c = result.config
    decode = result.decode_trace or result.prefill_trace  # every request may end at its prefill
    block_size = c.sim_config("decode").cache_config.block_size
    run = run_summary(metrics, timelines, slo, offered_rate, num_gpus=c.num_gpus,
                      kv_tokens=result.decode_num_blocks * block_size * c.decode.instances, steps=decode,
                      num_blocks=result.decode_num_blocks if result.decode_trace else result.prefill_num_blocks,
                      costs=result.prefill_step_costs + result.decode_step_costs)
    transfers = result.transfers
    handoff = sum(x.ready - x.prefill_end for x in transfers)
    return DisaggSummary(
        run, c.prefill.num_gpus, c.decode.num_gpus,
        mean_transfer_bytes=float(np.mean([x.num_bytes for x in transfers])) if transfers else 0.0,
        mean_transfer_time=float(np.mean([x.transfer_time for x in transfers])) if transfers else 0.0,
        mean_admission_wait=float(np.mean([x.admission_wait for x in transfers])) if transfers else 0.0,
        transfer_share=handoff / sum(t.e2e for t in timelines) if transfers else 0.0, link=str(result.link),
        link_bandwidth=result.link.bandwidth,
        kv_rate_per_decode_gpu=sum(x.num_bytes for x in transfers) / _arrival_span(result, metrics.duration)
        / c.decode.num_gpus)


def _arrival_span(result: DisaggResult, duration: float) -> float:
    """Seconds over which the requests arrived (the run's duration for an offline batch): the KV rate
    the prompts ask of the link, which a slow link stretches the run's duration to hide."""
    arrivals = result.arrival_times.values()
    span = max(arrivals) - min(arrivals)
    return span if span > 0 else duration


# ---- running configurations, here or in workers -----------------------------------------------------
Summary = RunSummary | DisaggSummary


def evaluate(config: SimConfig | DisaggConfig, workload: Workload, slo: PercentileSLO) -> Summary | Refused:
    """Simulate ``workload`` on a colocated (`SimConfig`: `minivllm.sim.tuner.evaluate`) or
    disaggregated (`DisaggConfig`) deployment."""
    if not isinstance(config, DisaggConfig):
        return tuner.evaluate(config, workload, slo)
    try:
        return summarize_disagg(DisaggSimulator(config).run(tuner.requests_of(workload)), slo, workload.request_rate)
    except ValueError as e:
        return Refused(str(e))


def evaluate_all(tasks: Sequence[tuple], workers: int | None = None) -> list[Summary | Refused]:
    """`evaluate` each (config, workload, slo) in ``workers`` processes (default: the CPUs; 1: here)."""
    return tuner.evaluate_all(tasks, workers, evaluate)


# ---- colocated against disaggregated ------------------------------------------------------------------
def colocated_config(config: DisaggConfig, tp: int | None = None) -> SimConfig:
    """The colocated deployment with the same GPUs as ``config``: DP replicas of ``tp`` GPUs (default:
    the decode pool's TP, or 1 where it does not divide the GPUs) with the decode pool's engine
    arguments."""
    n = config.num_gpus
    tp = tp if tp is not None else (config.decode.tp if n % config.decode.tp == 0 else 1)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1 or n % tp:
        raise ValueError(f"tp={tp!r} must be an int >= 1 dividing the {n} GPUs of the pools")
    return SimConfig(config.model, config.hardware, config.dtype, layout=ParallelLayout(tp=tp, dp=n // tp),
                     kv_cache_dtype=config.kv_cache_dtype, **config.decode.engine_args)


@dataclass(frozen=True)
class Comparison:
    request_rate: float
    colocated: RunSummary | Refused
    disaggregated: DisaggSummary | Refused


def colocated_vs_disaggregated(config: DisaggConfig, workload_factory: Callable[[float], Workload],
                               rates: Sequence[float], slo: PercentileSLO, *, colocated: SimConfig | None = None,
                               workers: int | None = None) -> list[Comparison]:
    """``config`` and a colocated deployment of the same GPU count (`colocated_config` unless given)
    on ``workload_factory(rate)`` at every rate of ``rates``, in parallel processes."""
    if not isinstance(config, DisaggConfig):
        raise ValueError(f"config={config!r} must be a DisaggConfig")
    colocated = colocated or colocated_config(config)
    if colocated.layout.num_gpus != config.num_gpus:
        raise ValueError(f"colocated uses {colocated.layout.num_gpus} GPUs, the pools {config.num_gpus}: compare at "
                         "the same GPU count")
    workloads = tuner.workloads_at(workload_factory, rates)
    results = evaluate_all([(cfg, w, slo) for w in workloads for cfg in (colocated, config)], workers)
    return [Comparison(w.request_rate, results[2 * k], results[2 * k + 1]) for k, w in enumerate(workloads)]


@dataclass(frozen=True)
class PDVerdict:
    helps: bool | None  # True: P/D has more goodput; False: less; None: a tie (within 5 %)
    sentence: str


def pd_verdict(colocated: RunSummary, disaggregated: DisaggSummary) -> PDVerdict:
    """When P/D helps and when it only costs, in words, from two runs at the same GPU count and rate."""
    slo, col, dis = colocated.slo, colocated.metrics, disaggregated.run.metrics
    p = f"p{slo.percentile:g}"
    g_col, g_dis = colocated.goodput, disaggregated.goodput
    ratio = g_dis / g_col if g_col else math.inf
    figures = (f"goodput {g_dis:.2f} req/s disaggregated against {g_col:.2f} colocated on {colocated.num_gpus} GPUs; "
               f"{p} TTFT {slo.value(dis, 'ttft') * 1e3:,.0f} ms against {slo.value(col, 'ttft') * 1e3:,.0f}, "
               f"{p} TPOT {slo.value(dis, 'tpot') * 1e3:.1f} ms against {slo.value(col, 'tpot') * 1e3:.1f}, "
               f"p99 ITL {dis.itl.p99 * 1e3:.1f} ms against {col.itl.p99 * 1e3:.1f}")
    link = (f"the KV handoff (decode admission {disaggregated.mean_admission_wait * 1e3:,.1f} ms, then "
            f"{disaggregated.mean_transfer_time * 1e3:,.1f} ms on {disaggregated.link}) is "
            f"{disaggregated.transfer_share:.0%} of the end-to-end latency")
    if g_dis > 1.05 * g_col or (g_col == 0 and g_dis > 0):
        why = []
        misses = slo.misses(col)
        if "tpot" in misses:
            why.append("colocated, every decode step also carries prefill chunks, so its TPOT misses the target; "
                       "the decode pool's steps carry decodes only")
        if "ttft" in misses:
            why.append("colocated, prompts queue behind the decodes' share of each step; the prefill pool runs "
                       "prompts only")
        if not why:  # both meet the SLO at its percentile, but fewer colocated requests meet it one by one
            why.append("colocated, the decode steps that also carry a prefill chunk stretch inter-token gaps, so "
                       "more requests miss the TPOT target one by one; the decode pool's steps carry decodes only")
        return PDVerdict(True, f"P/D helps ({ratio:.2f}x the goodput): " + "; ".join(why) + f". {figures}; {link}.")
    if g_col > 1.05 * g_dis:
        misses = disaggregated.run.slo.misses(dis)
        if disaggregated.transfer_share > 0.1:
            why = f"the link costs: {link}"
            load = disaggregated.kv_rate_per_decode_gpu / disaggregated.link_bandwidth
            if load > 0.8:
                why += (f"; the prompts make {disaggregated.kv_rate_per_decode_gpu / 1e9:.1f} GB/s of KV per decode "
                        f"GPU, {load:.0%} of what its link carries, so transfers queue without end: a faster "
                        "link, more decode GPUs, or an fp8 KV cache (half the bytes)")
        elif "ttft" in misses:
            why = (f"the prefill pool ({_gpus(disaggregated.prefill_gpus)}) is too small for the prompts: requests "
                   f"queue {disaggregated.run.mean_queue_wait * 1e3:,.0f} ms before their prefill; give it more GPUs")
        elif "tpot" in misses:
            why = (f"the decode pool ({_gpus(disaggregated.decode_gpus)}) is too small: its batches grow (up to "
                   f"{disaggregated.run.peak_running} requests, KV at {disaggregated.run.peak_kv_use:.0%}) and its "
                   "steps slow; give it more GPUs")
        else:
            why = ("each pool idles while the other works: a colocated engine fills every GPU with both phases. "
                   f"{link}")
        return PDVerdict(False, f"P/D only costs ({ratio:.2f}x the goodput): {why}. {figures}.")
    return PDVerdict(None, ("A tie on goodput (within 5 %), as vLLM's docs warn: P/D does not raise throughput, "
                            f"it lets TTFT and inter-token latency be tuned apart and tames the tail ITL. {figures}; "
                            f"{link}."))


def _gpus(n: int) -> str:
    return f"{n} GPU{'s' * (n != 1)}"


# ---- the prefill:decode split ------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitScore:
    label: str  # "3P:1D", or "colocated"
    config: DisaggConfig | SimConfig
    runs: tuple[tuple[float, Summary], ...]  # (rate, summary) for each rate it ran
    refused: tuple[tuple[float, str], ...]

    @property
    def num_gpus(self) -> int:
        return self.config.num_gpus if isinstance(self.config, DisaggConfig) else self.config.layout.num_gpus

    @property
    def best_goodput(self) -> float:
        return max((s.goodput for _, s in self.runs), default=0.0)

    @property
    def goodput_per_gpu(self) -> float:
        return self.best_goodput / self.num_gpus

    @property
    def max_rate_meeting_slo(self) -> float:
        """The highest rate tried at which the SLO held (0 when none)."""
        return max((r for r, s in self.runs if s.slo_met), default=0.0)


@dataclass(frozen=True)
class SplitResult:
    num_gpus: int
    slo: PercentileSLO
    rates: tuple[float, ...]
    scores: tuple[SplitScore, ...]  # best goodput per GPU first (colocated among them)

    @property
    def best(self) -> SplitScore:
        return self.scores[0]

    def report(self) -> str:
        lines = [f"{self.num_gpus} GPUs, SLO {self.slo}, rates {', '.join(f'{r:g}' for r in self.rates)} req/s"]
        for s in self.scores:
            if not s.runs:
                lines.append(f"{s.label}: refused ({s.refused[0][1]})")
                continue
            lines.append(f"{s.label}: best goodput {s.best_goodput:.2f} req/s ({s.goodput_per_gpu:.2f} per GPU), SLO "
                         f"held up to {s.max_rate_meeting_slo:g} req/s")
        return "\n".join(lines)


def splits(num_gpus: int, prefill_tp: int = 1, decode_tp: int = 1) -> list[tuple[int, int]]:
    """Every (prefill instances, decode instances), each at least one, that uses exactly ``num_gpus``."""
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 2:
        raise ValueError(f"num_gpus={num_gpus!r} must be an int >= 2 (one GPU per pool at least)")
    for name, tp in (("prefill_tp", prefill_tp), ("decode_tp", decode_tp)):
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"{name}={tp!r} must be an int >= 1")
    out = [(p, (num_gpus - p * prefill_tp) // decode_tp) for p in range(1, num_gpus // prefill_tp + 1)
           if num_gpus - p * prefill_tp >= decode_tp and (num_gpus - p * prefill_tp) % decode_tp == 0]
    if not out:
        raise ValueError(f"num_gpus={num_gpus} cannot be split into prefill instances of TP={prefill_tp} and decode "
                         f"instances of TP={decode_tp}")
    return out


def best_split(model: ModelSpec, hardware: Hardware, num_gpus: int, workload_factory: Callable[[float], Workload],
               rates: Sequence[float], slo: PercentileSLO, *, prefill_tp: int = 1, decode_tp: int = 1,
               link="infiniband", layer_pipelined: bool = False, first_token: str = "prefill",
               colocated_tp: int | None = None, workers: int | None = None, **engine_args) -> SplitResult:
    """The prefill:decode ratio search: every split of ``num_gpus`` GPUs into prefill instances of
    ``prefill_tp`` GPUs and decode instances of ``decode_tp`` (and the colocated deployment of the
    same GPUs, ``colocated_tp`` per replica) at every rate of ``rates``, ranked by their best goodput
    per GPU. ``engine_args`` hold for every instance of both pools and the colocated replicas."""
    if not isinstance(slo, PercentileSLO):
        raise ValueError(f"slo={slo!r} must be a PercentileSLO")
    workloads = tuner.workloads_at(workload_factory, rates)
    candidates: list[tuple[str, DisaggConfig | SimConfig]] = []
    for p, d in splits(num_gpus, prefill_tp, decode_tp):
        candidates.append((f"{p * prefill_tp}P:{d * decode_tp}D", DisaggConfig(
            model, hardware, PoolConfig(p, prefill_tp, **engine_args), PoolConfig(d, decode_tp, **engine_args),
            link=link, layer_pipelined=layer_pipelined, first_token=first_token)))
    tp = colocated_tp or 1
    candidates.append(("colocated", colocated_config(candidates[0][1], tp)))
    tuner.check_workers(workers)
    tasks = [(cfg, w, slo) for w in workloads for _, cfg in candidates]  # rate-major: a worker keeps one workload
    results = evaluate_all(tasks, workers)
    scores = []
    for k, (label, cfg) in enumerate(candidates):
        mine = results[k::len(candidates)]
        scores.append(SplitScore(label, cfg, tuple((w.request_rate, s) for w, s in zip(workloads, mine)
                                                   if not isinstance(s, Refused)),
                                 tuple((w.request_rate, s.reason) for w, s in zip(workloads, mine)
                                       if isinstance(s, Refused))))
    scores.sort(key=lambda s: (s.goodput_per_gpu, s.max_rate_meeting_slo), reverse=True)
    return SplitResult(num_gpus, slo, tuple(sorted(rates)), tuple(scores))
