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

from minivllm.core.block_manager import BlockManager
from minivllm.core.policy import SchedulingPolicy, make_policy
from minivllm.core.scheduler import Scheduler, SchedulerOutput
from minivllm.core.sequence import Sequence
from minivllm.core.step import run_step
from minivllm.core.trace import StepRecord
from minivllm.sampling_params import SamplingParams
from minivllm.sim.cost_model import CostModel
from minivllm.sim.hardware import Hardware
from minivllm.sim.model_specs import ModelSpec
from minivllm.sim.workload import Request

DUMMY_TOKEN = 0


@dataclass(frozen=True)
class SimConfig:
    """The engine settings the simulator honours; names and defaults follow `EngineConfig`."""

    model: ModelSpec
    hardware: Hardware
    dtype: str = "bf16"
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # overrides the computed cache size
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    batching_policy: str | SchedulingPolicy = "continuous"  # a name, or exercise 04's own policy

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _positive_int(name, getattr(self, name))
        for name in ("max_model_len", "num_kv_blocks"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"SimConfig.gpu_memory_utilization={self.gpu_memory_utilization!r} must be in (0, 1]")
        try:
            make_policy(self.batching_policy)
        except ValueError as e:
            raise ValueError(f"SimConfig.{e}") from None
        if self.max_model_len is not None and self.max_model_len > self.model.max_model_len:
            raise ValueError(f"SimConfig.max_model_len={self.max_model_len} exceeds {self.model.name}'s "
                             f"{self.model.max_model_len}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.resolved_max_model_len:
            raise ValueError(f"SimConfig.max_num_batched_tokens={self.max_num_batched_tokens} is smaller than "
                             f"max_model_len={self.resolved_max_model_len}: without chunked prefill a whole "
                             "prompt must fit in one step")

    @property
    def resolved_max_model_len(self) -> int:
        return self.max_model_len or self.model.max_model_len


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SimConfig.{name}={value!r} must be an int >= 1")


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
        if c.num_kv_blocks is not None:
            self.num_blocks = c.num_kv_blocks
        else:
            self.num_blocks = self.cost.kv_capacity_tokens(c.gpu_memory_utilization) // c.block_size
            if self.num_blocks < 1:
                raise ValueError(f"gpu_memory_utilization={c.gpu_memory_utilization} leaves no room for a "
                                 f"single KV block of {c.block_size} tokens on {c.hardware.name}")
        self.now = 0.0

    def make_sequence(self, request: Request) -> Sequence:
        """A request as the engine would queue it; refuses (ValueError) what the engine refuses."""
        c, n = self.config, len(request.prompt_token_ids)
        if n < 1:
            raise ValueError(f"request {request.request_id}: prompt_token_ids is empty")
        if n > c.resolved_max_model_len:
            raise ValueError(f"request {request.request_id}: prompt of {n} tokens is longer than "
                             f"max_model_len={c.resolved_max_model_len}")
        longest = min(n + request.output_len, c.resolved_max_model_len)
        need = -(-longest // c.block_size)
        if need > self.num_blocks:
            raise ValueError(f"request {request.request_id}: prompt of {n} tokens plus output_len="
                             f"{request.output_len} needs {need} KV blocks, but the cache has only "
                             f"{self.num_blocks}")
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
        scheduler = Scheduler(BlockManager(self.num_blocks, c.block_size, c.enable_prefix_caching),
                              max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
                              enable_chunked_prefill=c.enable_chunked_prefill, batching_policy=c.batching_policy)
        # the engine's length stop (max_tokens or max_model_len), as one precomputed total per request
        stop_at = {s: min(s.num_prompt_tokens + s.sampling_params.max_tokens, c.resolved_max_model_len)
                   for s in seqs}

        def check_stop(seq: Sequence, token: int) -> bool:
            if len(seq.token_ids) >= stop_at[seq]:
                seq.finish_reason = "length"
                return True
            return False

        trace: list[StepRecord] = []
        self.now, i = 0.0, 0
        while i < len(seqs) or scheduler.has_unfinished():
            if not scheduler.has_unfinished():  # idle: jump to the next arrival
                self.now = max(self.now, seqs[i].arrival_time)
            while i < len(seqs) and seqs[i].arrival_time <= self.now:
                scheduler.add(seqs[i])
                i += 1
            record, finished = run_step(scheduler, self._execute, self._clock, check_stop, len(trace))
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
            if end == len(chunk.seq.token_ids):
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
