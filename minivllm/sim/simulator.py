"""The engine in virtual time: the real Scheduler and BlockManager, a cost model instead of a GPU.

`Simulator.run` feeds a workload's requests to the scheduler as the virtual clock reaches their
arrival times and runs the engine's own step (`minivllm.core.step.run_step`): the scheduler
decides, the cost model says how long the step took, every sampled token is a dummy, and a request
ends at its workload output length (as with ``ignore_eos``). The trace is a list of the same
`StepRecord` the real engine writes.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from minivllm.config.cache import CacheConfig
from minivllm.config.parts import split_args
from minivllm.config.scheduler import SchedulerConfig
from minivllm.core.block_manager import BlockManager
from minivllm.core.scheduler import SchedulerOutput
from minivllm.core.sequence import Sequence, check_request_fits
from minivllm.core.step import run_step
from minivllm.core.trace import StepRecord, StepRecorder
from minivllm.sampling_params import SamplingParams
from minivllm.sim.cost_model import CostModel
from minivllm.sim.hardware import Hardware
from minivllm.sim.model_specs import ModelSpec
from minivllm.sim.workload import Request

DUMMY_TOKEN = 0


class SimConfig:
    """The engine settings the simulator honours, in the engine's own parts (`CacheConfig`,
    `SchedulerConfig`) with the same flat names, defaults and checks:
    ``SimConfig(model, hardware, max_num_seqs=64, block_size=32)``. ``dtype`` is the simulated GPU's
    (``"bf16"``, ``"fp16"``, ``"fp8"``, ``"fp32"``)."""

    def __init__(self, model: ModelSpec, hardware: Hardware, dtype: str = "bf16", **engine_args):
        parts = split_args(engine_args, {"cache_config": CacheConfig, "scheduler_config": SchedulerConfig},
                           [], "SimConfig")
        if "kv_cache_memory" in engine_args:
            raise ValueError("kv_cache_memory is the CPU engine's; the simulator sizes the cache from "
                             "gpu_memory_utilization or num_kv_blocks")
        self.model, self.hardware, self.dtype = model, hardware, dtype
        self.cache_config = CacheConfig(**parts["cache_config"])
        self.scheduler_config = SchedulerConfig(**parts["scheduler_config"])
        self.max_model_len = self.scheduler_config.resolve_max_model_len(
            model.max_model_len, limit_name=f"{model.name} max_model_len")

    def __repr__(self) -> str:
        return (f"SimConfig({self.model.name}, {self.hardware.name}, {self.dtype}, {self.cache_config}, "
                f"{self.scheduler_config})")


@dataclass
class SimResult:
    config: SimConfig
    num_blocks: int
    trace: list[StepRecord]
    requests: list[Sequence]  # in arrival order, all finished
    arrival_times: dict[str, float] = field(default_factory=dict)


class Simulator:
    def __init__(self, config: SimConfig):
        self.config = c = config
        self.cost = CostModel(c.model, c.hardware, c.dtype)
        cache = c.cache_config
        if cache.num_kv_blocks is not None:
            self.num_blocks = cache.num_kv_blocks
        else:
            self.num_blocks = self.cost.kv_capacity_tokens(cache.gpu_memory_utilization) // cache.block_size
            if self.num_blocks < 1:
                raise ValueError(f"gpu_memory_utilization={cache.gpu_memory_utilization} leaves no room for a "
                                 f"single KV block of {cache.block_size} tokens on {c.hardware.name}")
        self.now = 0.0

    def make_sequence(self, request: Request) -> Sequence:
        """A request as the engine would queue it; refuses (ValueError) what the engine refuses."""
        c, n = self.config, len(request.prompt_token_ids)
        try:
            if n < 1:
                raise ValueError("prompt_token_ids is empty: a request needs at least one token")
            check_request_fits(n, request.output_len, max_model_len=c.max_model_len,
                               block_size=c.cache_config.block_size, num_blocks=self.num_blocks)
        except ValueError as e:
            raise ValueError(f"request {request.request_id}: {e}") from None
        params = SamplingParams(max_tokens=request.output_len, ignore_eos=True)
        return Sequence(request.request_id, request.prompt_token_ids, params, arrival_time=request.arrival_time)

    def run(self, requests: list[Request]) -> SimResult:
        """Simulate ``requests`` (sorted by arrival time) to completion; returns the trace."""
        with _collector_paused():
            return self._run(requests)

    def _run(self, requests: list[Request]) -> SimResult:
        c = self.config
        seqs = [self.make_sequence(r) for r in requests]
        if any(a.arrival_time > b.arrival_time for a, b in zip(seqs, seqs[1:])):
            raise ValueError("requests must be sorted by arrival_time")
        if len({s.request_id for s in seqs}) < len(seqs):
            raise ValueError("request_id values must be unique")
        cache = c.cache_config
        scheduler = c.scheduler_config.make_scheduler(
            BlockManager(self.num_blocks, cache.block_size, cache.enable_prefix_caching), c.max_model_len)
        # the engine's length stop (max_tokens or max_model_len), as one precomputed total per request
        stop_at = {s: min(s.num_prompt_tokens + s.sampling_params.max_tokens, c.max_model_len)
                   for s in seqs}

        def check_stop(seq: Sequence, token: int) -> bool:
            if len(seq.token_ids) >= stop_at[seq]:
                seq.finish_reason = "length"
                return True
            return False

        trace: list[StepRecord] = []
        recorder = StepRecorder()
        self.now, i = 0.0, 0
        while i < len(seqs) or scheduler.has_unfinished():
            if not scheduler.has_unfinished():  # idle: jump to the next arrival
                self.now = max(self.now, seqs[i].arrival_time)
            while i < len(seqs) and seqs[i].arrival_time <= self.now:
                scheduler.add(seqs[i])
                i += 1
            record, finished = run_step(scheduler, self._execute, self._clock, check_stop, len(trace), recorder)
            trace.append(record)
            for seq in finished:
                seq.finished_time = record.end_time
        return SimResult(c, self.num_blocks, trace, seqs, {s.request_id: s.arrival_time for s in seqs})

    def _clock(self) -> float:
        return self.now

    def _execute(self, out: SchedulerOutput) -> dict[Sequence, int]:
        """Advance the virtual clock by the step's cost; a dummy token for every chunk that samples."""
        sampled: dict[Sequence, int] = {}
        num_tokens = context = 0
        pairs = 0.0
        for chunk in out.chunks:
            n, start = chunk.num_new_tokens, chunk.start
            end = start + n
            num_tokens += n
            context += end
            pairs += n * (start + end + 1) / 2
            if chunk.samples:
                sampled[chunk.seq] = DUMMY_TOKEN
        self.now += self.cost.step_time(len(out.chunks), num_tokens, len(sampled), context, pairs)
        return sampled


@contextmanager
def _collector_paused() -> Iterator[None]:
    """A run builds millions of acyclic records that all outlive it, and the cyclic collector would
    scan them all on their way to its oldest generation (seconds for 10,000 requests). Keep it off
    during the run, then move what the run built to the oldest generation unscanned (freeze, then
    unfreeze); a later full collection still sees it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.unfreeze()
        if was_enabled:
            gc.enable()
