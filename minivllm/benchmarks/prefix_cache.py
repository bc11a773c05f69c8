"""Prefix caching: the hash cache (whole blocks) against the radix cache (token by token), side by side.

Each workload of `minivllm.benchmarks.prefix_workloads` (multi-turn chat, few-shot prompts, branching
continuations, a shared prefix that ends mid-block) runs twice, once per cache, with the same
requests, through two drivers:

* **engine**: the real `LLMEngine` on the course target model (greedy, or seeded samples for
  ``n`` > 1), on this CPU;
* **sim**: the core's scheduler and block manager at GPU scale (engine defaults: 256 sequences, a
  2048-token budget, 16384 blocks of 16), with a dummy model whose step takes the roofline time of
  Llama-3.1-8B on an H100 (`minivllm.sim.CostModel`).

For each it reports the prompt tokens served from the cache (hit rate), the prefill tokens computed
(and those the radix cache saves), the blocks it copied, and the bookkeeping: Python time in the
scheduler and block manager (``schedule``, ``update``, ``finish``) per step and per scheduled token,
and the run's time: the engine's CPU seconds (steadier than wall time on a shared machine; with one
torch thread, the time its steps took), the simulated GPU's seconds.

    python -m minivllm.benchmarks.prefix_cache [--workloads ...] [--engine-size medium] [--sim-size large]

From a notebook, at small size in a few seconds: ``compare("multi_turn", driver="engine")``.
"""
from __future__ import annotations

import argparse
import gc
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from minivllm.benchmarks.prefix_workloads import SCALES, WORKLOADS, History, PrefixWorkload, PromptSpec, make_workload
from minivllm.config.cache import PREFIX_CACHES, CacheConfig
from minivllm.config.scheduler import SchedulerConfig
from minivllm.core.scheduler import Scheduler, SchedulerOutput
from minivllm.core.sequence import Sequence
from minivllm.core.step import run_step
from minivllm.core.trace import StepRecord, StepRecorder
from minivllm.sampling_params import SamplingParams
from minivllm.sim.simulator import collector_paused as sim_collector_paused

DRIVERS = ("engine", "sim")
SIM_SETTINGS = dict(block_size=16, num_blocks=16384, max_num_seqs=256, max_num_batched_tokens=2048,
                    max_model_len=8192, model="Llama-3.1-8B", hardware="H100-SXM")
ENGINE_SETTINGS = dict(block_size=16, num_kv_blocks=1024, max_num_seqs=8, max_model_len=1024)


@dataclass(frozen=True)
class PrefixCacheRun:
    """One workload through one driver with one cache."""

    prefix_caching: str
    prompt_tokens: int  # every sample's prompt counts
    cached_tokens: int  # of them, served from the prefix cache at first admission
    prefill_tokens: int  # tokens computed in prefill chunks (recomputes after preemption included)
    kv_copies: int  # partly matched blocks copied (the radix cache only)
    steps: int
    scheduled_tokens: int
    bookkeeping_s: float  # CPU time in schedule, update and finish
    time_s: float  # engine: CPU seconds of the process over the waves; sim: virtual seconds of the simulated GPU

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens

    @property
    def us_per_step(self) -> float:
        return self.bookkeeping_s / self.steps * 1e6

    @property
    def us_per_token(self) -> float:
        return self.bookkeeping_s / self.scheduled_tokens * 1e6


@dataclass(frozen=True)
class PrefixCacheComparison:
    workload: str
    driver: str
    size: str
    hash: PrefixCacheRun
    radix: PrefixCacheRun

    @property
    def prefill_saved(self) -> int:
        """Prefill tokens the radix cache did not compute that the hash cache did."""
        return self.hash.prefill_tokens - self.radix.prefill_tokens

    def table(self) -> str:
        rows = [f"{self.workload} ({self.size}, {self.driver}):",
                f"  {'cache':6} {'hit rate':>9} {'cached':>8} {'prefill':>8} {'copies':>7} {'steps':>6} "
                f"{'us/step':>8} {'us/token':>9} {'time s':>8}"]
        for r in (self.hash, self.radix):
            rows.append(f"  {r.prefix_caching:6} {r.hit_rate:9.1%} {r.cached_tokens:8d} {r.prefill_tokens:8d} "
                        f"{r.kv_copies:7d} {r.steps:6d} {r.us_per_step:8.1f} {r.us_per_token:9.2f} {r.time_s:8.3f}")
        rows.append(f"  radix/hash: prefill x{self.radix.prefill_tokens / self.hash.prefill_tokens:.3f} "
                    f"({self.prefill_saved} tokens saved), bookkeeping per token "
                    f"x{self.radix.us_per_token / self.hash.us_per_token:.2f}, time x{self.radix.time_s / self.hash.time_s:.3f}")
        return "\n".join(rows)


def compare(workload: str, driver: str = "sim", size: str = "small", seed: int = 0,
            model: str | None = None) -> PrefixCacheComparison:
    """``workload`` through ``driver`` ("engine" or "sim") once with each cache. ``model``: the
    engine's checkpoint folder (default: the course target)."""
    if driver not in DRIVERS:
        raise ValueError(f"driver={driver!r} must be one of {DRIVERS}")
    make_workload(workload, size, seed)  # refuses a bad name or size before anything runs
    if driver == "engine":
        from minivllm import course

        folder = model or course.model_path("target")
        runs = {kind: run_engine(make_workload(workload, size, seed), kind, folder, seed) for kind in PREFIX_CACHES}
    else:
        runs = {kind: run_sim(make_workload(workload, size, seed), kind) for kind in PREFIX_CACHES}
    return PrefixCacheComparison(workload, driver, size, runs["hash"], runs["radix"])


class CoreTimer:
    """Times a scheduler's ``schedule``, ``update`` and ``finish`` (the core's bookkeeping) by wrapping
    them on the instance. CPU time of this thread: other processes on a shared machine do not count."""

    def __init__(self, scheduler: Scheduler):
        self.seconds = 0.0
        for name in ("schedule", "update", "finish"):
            setattr(scheduler, name, self._timed(getattr(scheduler, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            start = time.thread_time()
            result = method(*args, **kwargs)
            self.seconds += time.thread_time() - start
            return result
        return timed


@contextmanager
def collector_paused() -> Iterator[None]:
    """No garbage collection while a run is timed, as in the simulator, after a collection of what
    came before: a collection landing in one run and not the other would swamp a few milliseconds of
    bookkeeping."""
    gc.collect()
    with sim_collector_paused():
        yield


def summarize(kind: str, seqs: list[Sequence], trace: list[StepRecord], timer: CoreTimer,
              time_s: float) -> PrefixCacheRun:
    return PrefixCacheRun(
        kind, prompt_tokens=sum(s.num_prompt_tokens for s in seqs),
        cached_tokens=sum(s.num_cached_tokens or 0 for s in seqs),
        prefill_tokens=sum(r.num_prefill_tokens for r in trace), kv_copies=sum(len(r.kv_copies) for r in trace),
        steps=len(trace),
        scheduled_tokens=sum(r.num_batched_tokens for r in trace), bookkeeping_s=timer.seconds, time_s=time_s)


# ---- the real engine --------------------------------------------------------------------------------
def run_engine(workload: PrefixWorkload, kind: str, folder: str, seed: int = 0) -> PrefixCacheRun:
    from minivllm import LLM

    engine = LLM(folder, prefix_caching=kind, seed=seed, **ENGINE_SETTINGS).llm_engine
    # warm up (torch's first calls are slow) on token 0, which no workload prompt holds: no cache hit
    engine.add_request("warmup", {"prompt_token_ids": [0] * 20}, SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    warmup_steps = len(engine.trace)
    timer, seqs = CoreTimer(engine.scheduler), []
    with collector_paused():
        start = time.process_time()
        run_engine_waves(engine, workload, seed, seqs)
        cpu = time.process_time() - start
    engine.close()
    return summarize(kind, seqs, engine.trace[warmup_steps:], timer, cpu)


def run_engine_waves(engine, workload: PrefixWorkload, seed: int, seqs: list[Sequence]) -> None:
    """Each wave's requests added at once, the engine stepped until they finish; their samples go to ``seqs``."""
    history: History = []
    for k in range(workload.num_waves):
        specs = workload.wave(k, history)
        for i, spec in enumerate(specs):
            params = SamplingParams(n=spec.n, max_tokens=spec.max_tokens, ignore_eos=True,
                                    temperature=0 if spec.n == 1 else 0.8, seed=seed + 1000 * k + i)
            engine.add_request(f"{k}-{i}", {"prompt_token_ids": list(spec.prompt)}, params)
            seqs += engine.parents.get(f"{k}-{i}") or [engine.requests[f"{k}-{i}"]]
        done = {}
        while engine.has_unfinished_requests():
            done.update((out.request_id, out) for out in engine.step())
        history = [(spec, [c.token_ids for c in done[f"{k}-{i}"].outputs]) for i, spec in enumerate(specs)]


# ---- the simulator's core at GPU scale ------------------------------------------------------------------
def run_sim(workload: PrefixWorkload, kind: str, settings: dict = SIM_SETTINGS) -> PrefixCacheRun:
    sim = CoreSimulation(kind, settings)
    history: History = []
    with collector_paused():
        for k in range(workload.num_waves):
            history = sim.run_wave(k, workload.wave(k, history))
    return summarize(kind, sim.seqs, sim.trace, sim.timer, sim.now)


class CoreSimulation:
    """The core's scheduler over the ``kind`` of block manager, stepped by `run_step` as the simulator
    steps it, with a dummy model: its tokens are a fixed function of the request and position (both
    caches see the same outputs, and the samples of one prompt differ), its steps take the roofline
    time of ``settings["model"]`` on ``settings["hardware"]``."""

    def __init__(self, kind: str, settings: dict):
        from minivllm.sim import CostModel, get_hardware, get_model

        s = settings
        self.cost = CostModel(get_model(s["model"]), get_hardware(s["hardware"]))
        bm = CacheConfig(block_size=s["block_size"], prefix_caching=kind).make_block_manager(s["num_blocks"])
        self.scheduler = SchedulerConfig(max_num_seqs=s["max_num_seqs"], max_num_batched_tokens=s["max_num_batched_tokens"]
                                         ).make_scheduler(bm, s["max_model_len"])
        self.timer, self.recorder = CoreTimer(self.scheduler), StepRecorder()
        self.now = 0.0
        self.trace: list[StepRecord] = []
        self.seqs: list[Sequence] = []

    def run_wave(self, k: int, specs: list[PromptSpec]) -> History:
        """Wave ``k``'s requests (``n`` sequences each) added at once, stepped until they finish."""
        wave = [[Sequence(f"{j}_{k}-{i}", list(spec.prompt), SamplingParams(max_tokens=spec.max_tokens))
                 for j in range(spec.n)] for i, spec in enumerate(specs)]
        for seq in (seq for samples in wave for seq in samples):
            self.scheduler.add(seq)
            self.seqs.append(seq)
        while self.scheduler.has_unfinished():
            record, _ = run_step(self.scheduler, self.execute, lambda: self.now, self.check_stop, len(self.trace),
                                 self.recorder)
            self.trace.append(record)
        return [(spec, [seq.output_token_ids for seq in samples]) for spec, samples in zip(specs, wave)]

    def execute(self, out: SchedulerOutput) -> dict[Sequence, int]:
        """A dummy token per sampling chunk; the clock advances by the step's roofline time."""
        pairs = sum(c.num_new_tokens * (2 * c.start + c.num_new_tokens + 1) / 2 for c in out.chunks)
        sampled = {c.seq: dummy_token(c.seq.request_id, c.seq.num_tokens) for c in out.chunks if c.samples}
        self.now += self.cost.step_time(len(out.chunks), out.num_batched_tokens, len(sampled),
                                        sum(c.start + c.num_new_tokens for c in out.chunks), pairs)
        return sampled

    @staticmethod
    def check_stop(seq: Sequence, token: int) -> bool:
        if seq.num_output_tokens >= seq.sampling_params.max_tokens:
            seq.finish_reason = "length"
        return seq.finish_reason is not None


def dummy_token(request_id: str, position: int, vocab_size: int = 4096) -> int:
    """A token that depends only on the request and position (crc32: the same in every process)."""
    return 1 + zlib.crc32(f"{request_id}:{position}".encode()) % (vocab_size - 1)


# ---- the command line ------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--engine-size", default="medium", choices=list(SCALES))
    ap.add_argument("--sim-size", default="large", choices=list(SCALES))
    ap.add_argument("--drivers", nargs="+", default=list(DRIVERS), choices=list(DRIVERS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the engine")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import logging

    from minivllm.benchmarks.offline_throughput import cpu_model, load_average
    from minivllm.llm import logger  # importing it sets the package's log level: lower it after

    logger.setLevel(logging.WARNING)
    if "engine" in args.drivers:
        import torch

        torch.set_num_threads(args.threads)
    print(f"machine: {cpu_model()}, {args.threads} torch thread(s), {load_average()} (before)")
    print(f"engine: course target, {ENGINE_SETTINGS}; sim: {SIM_SETTINGS}\n")
    for driver in args.drivers:
        for name in args.workloads:
            size = args.engine_size if driver == "engine" else args.sim_size
            print(compare(name, driver, size, args.seed).table() + "\n", flush=True)
    print(f"load after: {load_average()}")


if __name__ == "__main__":
    main()
