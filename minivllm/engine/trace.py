"""The step trace: one immutable record of what each engine step did.

Widgets, plots, the simulator's metrics and the tests read the trace; nothing re-derives what
happened. Times are seconds on the driver's clock (wall time for the engine, virtual time for the
simulator).
"""
from __future__ import annotations

from dataclasses import dataclass

from minivllm.engine.block_manager import BlockEvents, BlockManager
from minivllm.engine.scheduler import SchedulerOutput


@dataclass(frozen=True)
class ChunkRecord:
    request_id: str
    start: int  # first position computed this step
    num_tokens: int
    is_prefill: bool  # part of a prompt (or a recompute), not a single decode token
    sampled_token: int | None  # the token this step appended, if the chunk reached the end


@dataclass(frozen=True)
class StepRecord:
    step: int
    start_time: float
    end_time: float
    chunks: tuple[ChunkRecord, ...]
    preempted: tuple[str, ...]
    finished: tuple[tuple[str, str], ...]  # (request_id, finish_reason)
    blocks_allocated: tuple[int, ...]
    blocks_freed: tuple[int, ...]
    blocks_cache_hit: tuple[int, ...]
    blocks_evicted: tuple[int, ...]
    num_free_blocks: int  # after the step, including cached-but-free blocks
    num_cached_free_blocks: int
    num_running: int
    num_waiting: int

    @property
    def duration(self) -> float:
        return self.end_time - self.start_time

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks if c.is_prefill)

    @property
    def num_decode_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks if not c.is_prefill)


def make_step_record(step: int, start_time: float, end_time: float, out: SchedulerOutput,
                     sampled: dict, finished: list, block_manager: BlockManager,
                     num_running: int, num_waiting: int) -> StepRecord:
    events: BlockEvents = block_manager.drain_events()
    chunks = tuple(
        ChunkRecord(c.seq.request_id, c.start, c.num_new_tokens, c.is_prefill, sampled.get(c.seq))
        for c in out.chunks)
    return StepRecord(
        step=step, start_time=start_time, end_time=end_time, chunks=chunks,
        preempted=tuple(s.request_id for s in out.preempted),
        finished=tuple((s.request_id, s.finish_reason) for s in finished),
        blocks_allocated=tuple(events.allocated), blocks_freed=tuple(events.freed),
        blocks_cache_hit=tuple(events.cache_hits), blocks_evicted=tuple(events.evicted),
        num_free_blocks=block_manager.num_free_blocks,
        num_cached_free_blocks=block_manager.num_cached_free_blocks,
        num_running=num_running, num_waiting=num_waiting)
