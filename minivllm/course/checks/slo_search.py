"""Exercise 09's check: the learner's SLO-aware rate search, ``max_sustainable_rate(meets_slo, low,
high, tol)``, the highest request rate a configuration sustains while meeting a latency SLO.

Two stages, each stopping at the first failing case:

1. **known thresholds**: ``meets_slo(rate)`` is ``rate <= T`` for a known ``T`` (inside the bracket,
   on its ends, outside it), so the right answer is known exactly;
2. **the simulator**: ``meets_slo(rate)`` simulates Llama-3.1-8B on one H100 (two settings of
   ``max_num_batched_tokens`` / ``max_num_seqs``, a chat and a long-prompt RAG workload of a few
   hundred requests) and judges the p99 TTFT and TPOT against `SLO`; the reference is an exhaustive
   sweep of the bracket on a grid of step ``tol``. Then the two edge cases on the simulator: a bracket
   where every rate meets the SLO (answer: ``high``) and one where none does (answer: None).

A simulation's p99 latencies need not rise monotonically with the rate (a few hundred requests; one
unlucky burst moves a p99), so the sweep's reference is the largest grid rate such that it *and every
lower grid rate* meet the SLO: the sweep walks up the grid and stops at its first miss. The settings
below are monotone on their grids, so a right bisection lands within ``tol`` of it.

Every case also bounds the calls: ``ceil(log2((high - low) / tol)) + 3`` (bisection needs two fewer).
Simulations are cached per process (they are deterministic), so the sweep and the learner's search
share them and a second run of the check costs little.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

from minivllm.course.checks.base import CheckFailed, CheckResult, run_stages

MODEL, HARDWARE = "Llama-3.1-8B", "H100-SXM"
SLO_TTFT, SLO_TPOT, SLO_PERCENTILE = 0.5, 0.025, 99.0  # seconds, seconds, percent


def max_calls(low: float, high: float, tol: float) -> int:
    """The most calls of ``meets_slo`` a search of [low, high] to ``tol`` may make: bisection's
    ``ceil(log2((high - low) / tol))`` halvings, its two ends, and one to spare."""
    return max(math.ceil(math.log2((high - low) / tol)), 0) + 3


def reference_rate(grid: list[float], meets_slo: Callable[[float], bool]) -> float | None:
    """The largest rate of ``grid`` (ascending) such that it and every lower grid rate meet the SLO;
    None when the lowest misses. Walks up the grid and stops at the first miss."""
    best = None
    for rate in grid:
        if not meets_slo(rate):
            break
        best = rate
    return best


# ---- stage 1: known thresholds ----------------------------------------------------------------------
@dataclass(frozen=True)
class ThresholdCase:
    """``meets_slo(rate)`` is ``rate <= threshold``."""

    low: float
    high: float
    tol: float
    threshold: float

    def __str__(self) -> str:
        return (f"meets_slo(rate) = rate <= {self.threshold:g}, bracket ({self.low:g}, {self.high:g}), "
                f"tol {self.tol:g}")


THRESHOLD_CASES = [
    ThresholdCase(1, 100, 0.5, 37.3),
    ThresholdCase(1, 100, 0.5, 99.9),   # just under high
    ThresholdCase(1, 100, 0.5, 1.2),    # just over low
    ThresholdCase(0.25, 3, 0.01, 2.345),  # fractional rates and a fine tolerance
    ThresholdCase(1, 100, 0.5, 100),    # high itself meets: the answer is high
    ThresholdCase(1, 100, 0.5, 250),    # the whole bracket meets
    ThresholdCase(1, 100, 0.5, 1),      # only low meets: the answer is low
    ThresholdCase(1, 100, 0.5, 0.5),    # nothing meets: the answer is None
]


MAX_PROBES = 1000  # calls after which a search is taken to loop forever


class EndlessSearch(BaseException):
    """Raised in a search that has called ``meets_slo`` `MAX_PROBES` times; a BaseException, so that
    an ``except Exception`` in the learner's loop cannot swallow it."""


class CountingProbe:
    """Wraps ``meets_slo`` for one search: counts the calls and notes any outside [low, high]."""

    def __init__(self, meets_slo: Callable[[float], bool], low: float, high: float):
        self.meets_slo, self.low, self.high = meets_slo, low, high
        self.rates: list[float] = []
        self.outside: list[object] = []

    def __call__(self, rate) -> bool:
        self.rates.append(rate)
        if len(self.rates) >= MAX_PROBES:
            raise EndlessSearch
        if not (isinstance(rate, numbers.Real) and not isinstance(rate, bool) and self.low <= rate <= self.high):
            self.outside.append(rate)  # judged after the search returns (a try/except in it could swallow a raise)
            return False
        return self.meets_slo(float(rate))

    @property
    def calls(self) -> int:
        return len(self.rates)


def run_search(search: Callable, meets_slo: Callable[[float], bool], low: float, high: float, tol: float,
               where: str) -> tuple[float | None, CountingProbe]:
    """The learner's answer and the probe it called, or `CheckFailed` for a raise, a bad return value
    or a call outside the bracket."""
    probe = CountingProbe(meets_slo, low, high)
    try:
        rate = search(probe, low, high, tol)
    except EndlessSearch:
        raise CheckFailed(f"{where}: your search called meets_slo {MAX_PROBES} times without returning (the last "
                          f"rates: {', '.join(map(_number, probe.rates[-4:]))}): does the bracket shrink "
                          "every step, and does the loop stop once it is tol wide?") from None
    except Exception as e:  # the skeleton's NotImplementedError lands here too
        raise CheckFailed(f"{where}: max_sustainable_rate raised {e!r}") from None
    if probe.outside:
        raise CheckFailed(f"{where}: your search called meets_slo({probe.outside[0]!r}), outside the bracket "
                          f"[{low:g}, {high:g}]: probe only rates in the bracket")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, numbers.Real)):
        raise CheckFailed(f"{where}: max_sustainable_rate returned {rate!r}: return a rate (a number) or None")
    return (None if rate is None else float(rate)), probe


def _number(x: object) -> str:
    return f"{x:g}" if isinstance(x, numbers.Real) and not isinstance(x, bool) else repr(x)


def judge(rate: float | None, want: float | None, probe: CountingProbe, meets_slo: Callable[[float], bool],
          low: float, high: float, tol: float, where: str, reference: str) -> None:
    """`CheckFailed` unless ``rate`` answers like ``want`` (the highest rate meeting the SLO, None:
    none) within ``tol``, is a rate that meets the SLO, and took at most `max_calls` calls.
    ``reference`` names where ``want`` comes from, for the message."""
    used = f"your search used {probe.calls} call{'s' * (probe.calls != 1)} of meets_slo"
    if want is None:
        if rate is not None:
            raise CheckFailed(f"{where}: you returned {rate:g}, but even the lowest rate, {low:g}, misses the SLO: "
                              f"return None ({used})")
    elif rate is None:
        raise CheckFailed(f"{where}: you returned None, but {low:g} meets the SLO and {reference} is {want:g} "
                          f"({used})")
    elif want == high and rate != high:
        raise CheckFailed(f"{where}: you returned {rate:g}, but even the highest rate, {high:g}, meets the SLO: "
                          f"return high ({used})")
    elif not low <= rate <= high:
        raise CheckFailed(f"{where}: you returned {rate:g}, outside the bracket [{low:g}, {high:g}] ({used})")
    elif not meets_slo(rate):
        raise CheckFailed(f"{where}: you returned {rate:g}, a rate that misses the SLO ({reference} is {want:g}): "
                          f"return the highest rate you saw meet it ({used})")
    elif abs(rate - want) > tol:
        side = "below" if rate < want else "above"
        raise CheckFailed(f"{where}: you returned {rate:g}, more than tol = {tol:g} {side} {reference}, {want:g} "
                          f"({used})")
    limit = max_calls(low, high, tol)
    if probe.calls > limit:
        raise CheckFailed(f"{where}: the answer is right, but {used}: the check allows {limit}, "
                          f"ceil(log2(({high:g} - {low:g}) / {tol:g})) + 3, one more than bisection needs")


def _stage_thresholds(search: Callable) -> str:
    for case in THRESHOLD_CASES:
        def meets_slo(rate: float, threshold: float = case.threshold) -> bool:
            return rate <= threshold

        if case.threshold < case.low:
            want = None
        elif case.threshold >= case.high:
            want = case.high
        else:
            want = case.threshold
        rate, probe = run_search(search, meets_slo, case.low, case.high, case.tol, str(case))
        judge(rate, want, probe, meets_slo, case.low, case.high, case.tol, str(case), "the threshold")
    return (f"{len(THRESHOLD_CASES)} known thresholds (inside the bracket, on its ends, outside it) found within "
            "tol, in bisection's number of calls")


# ---- stage 2: the simulator against an exhaustive sweep -----------------------------------------------
@dataclass(frozen=True)
class SimCase:
    """A workload preset (`minivllm.sim.presets`) of ``num_requests`` on Llama-3.1-8B on one H100 at
    these scheduler settings, and the bracket and tolerance of the search."""

    preset: str
    num_requests: int
    max_num_batched_tokens: int
    max_num_seqs: int
    low: float
    high: float
    tol: float

    @property
    def setting(self) -> tuple:
        """What a simulation depends on besides the rate (the cache's key)."""
        return (self.preset, self.num_requests, self.max_num_batched_tokens, self.max_num_seqs)

    def grid(self) -> list[float]:
        """The sweep's rates: low, low + tol, ..., high (the last step may be shorter)."""
        steps = math.ceil((self.high - self.low) / self.tol - 1e-9)
        return [min(self.low + i * self.tol, self.high) for i in range(steps + 1)]

    def __str__(self) -> str:
        return (f"{self.preset} ({self.num_requests} requests, {MODEL} on one {HARDWARE}, max_num_batched_tokens="
                f"{self.max_num_batched_tokens}, max_num_seqs={self.max_num_seqs}), p{SLO_PERCENTILE:g} TTFT <= "
                f"{SLO_TTFT * 1e3:g} ms and TPOT <= {SLO_TPOT * 1e3:g} ms, bracket ({self.low:g}, {self.high:g}) "
                f"req/s, tol {self.tol:g}")


SIM_CASES = [
    SimCase("chat", 300, 2048, 128, low=4, high=132, tol=4),     # TTFT binds (queueing for prefill)
    SimCase("rag", 200, 2048, 128, low=0.5, high=8.5, tol=0.5),  # TPOT binds (long prompts in every step)
    SimCase("chat", 300, 8192, 256, low=16, high=272, tol=16),
    SimCase("rag", 200, 8192, 64, low=0.5, high=8.5, tol=0.5),
]
EDGE_CASES = [  # on the grids of SIM_CASES: most of their simulations are cached by then
    SimCase("chat", 300, 2048, 128, low=8, high=64, tol=4),      # every rate meets: the answer is high
    SimCase("rag", 200, 8192, 64, low=5, high=8.5, tol=0.5),     # no rate meets: the answer is None
]


@dataclass(frozen=True)
class Probe:
    met: bool
    ttft: float  # the p99, seconds
    tpot: float


_PROBES: dict[tuple, Probe] = {}  # (SimCase.setting, rate) -> its run, for this process


def simulate(case: SimCase, rate: float) -> Probe:
    """Run ``case``'s workload at ``rate`` (cached) and judge it against the SLO."""
    key = (case.setting, float(rate))
    if key not in _PROBES:
        from minivllm.sim import SimConfig, get_hardware, get_model
        from minivllm.sim.evaluation import PercentileSLO
        from minivllm.sim.presets import tuning_workload
        from minivllm.sim.tuner import Refused, default_max_model_len, evaluate

        model, slo = get_model(MODEL), PercentileSLO(ttft=SLO_TTFT, tpot=SLO_TPOT, percentile=SLO_PERCENTILE)
        workload = tuning_workload(case.preset, case.num_requests, float(rate))
        config = SimConfig(model, get_hardware(HARDWARE), max_num_batched_tokens=case.max_num_batched_tokens,
                           max_num_seqs=case.max_num_seqs, max_model_len=default_max_model_len(workload, model))
        summary = evaluate(config, workload, slo)
        if isinstance(summary, Refused):  # the check's own settings: a change in the simulator broke them
            raise RuntimeError(f"the simulator refused {case} at {rate:g} req/s: {summary.reason}")
        m = summary.metrics
        _PROBES[key] = Probe(summary.slo_met, slo.value(m, "ttft"), slo.value(m, "tpot"))
    return _PROBES[key]


def _check_sim_case(search: Callable, case: SimCase) -> tuple[int, int]:
    """`CheckFailed` unless the learner's search matches the sweep on ``case``; returns (the learner's
    calls, the grid's size)."""
    def meets_slo(rate: float) -> bool:
        return simulate(case, rate).met

    rate, probe = run_search(search, meets_slo, case.low, case.high, case.tol, str(case))
    grid = case.grid()
    want = reference_rate(grid, meets_slo)
    reference = f"the sweep's reference (the highest of {len(grid)} grid rates below the first one that misses)"
    try:
        judge(rate, want, probe, meets_slo, case.low, case.high, case.tol, str(case), reference)
    except CheckFailed as e:
        raise CheckFailed(f"{e}; {_around(case, rate, want)}") from None
    return probe.calls, len(grid)


def _around(case: SimCase, rate: float | None, want: float | None) -> str:
    """The p99s at the learner's rate and at the reference, for a failure message."""
    def at(r: float) -> str:
        p = simulate(case, r)
        return (f"at {r:g} req/s p{SLO_PERCENTILE:g} TTFT {p.ttft * 1e3:,.0f} ms, TPOT {p.tpot * 1e3:.1f} ms "
                f"({'meets' if p.met else 'misses'})")

    shown = [r for r in (rate, want) if r is not None and case.low <= r <= case.high]
    if want is not None and want < case.high:
        shown.append(min(want + case.tol, case.high))  # the first grid rate that misses
    return "; ".join(at(r) for r in dict.fromkeys(shown))


def _stage_simulator(search: Callable) -> str:
    calls, grids = [], []
    for case in SIM_CASES:
        used, size = _check_sim_case(search, case)
        calls.append(used)
        grids.append(size)
    return (f"{len(SIM_CASES)} simulated configurations (chat and RAG, two scheduler settings) within tol of an "
            f"exhaustive sweep, with {min(calls)}-{max(calls)} simulations where the sweep's grid has "
            f"{min(grids)}-{max(grids)} rates")


def _stage_edges(search: Callable) -> str:
    for case in EDGE_CASES:
        _check_sim_case(search, case)
    return "on the simulator, a bracket where every rate meets the SLO (high) and one where none does (None)"


def check_slo_search(search: Callable, verbose: bool = True) -> CheckResult:
    """Check ``search(meets_slo, low, high, tol) -> float | None`` on known thresholds, then on the
    simulator against an exhaustive sweep of the rates."""
    def is_a_function() -> str:
        if not callable(search):
            raise CheckFailed(f"max_sustainable_rate={search!r} must be a function (meets_slo, low, high, tol)")
        return "max_sustainable_rate is a function"

    return run_stages("the SLO-aware rate search",
                      [is_a_function, lambda: _stage_thresholds(search), lambda: _stage_simulator(search),
                       lambda: _stage_edges(search)], verbose)
