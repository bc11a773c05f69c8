"""The step trace: one immutable record of what each engine step did.

Widgets, plots, the simulator's metrics and the tests read the trace; nothing re-derives what
happened. Times are seconds on the driver's clock (wall time for the engine, virtual time for the
simulator).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from minivllm.core.block_manager import BlockEvents, BlockManager, KVCopy
from minivllm.core.records import RankComm
from minivllm.core.scheduler import ScheduledChunk, SchedulerOutput
from minivllm.core.sequence import Sequence


class ChunkRecord(NamedTuple):  # one per request per step: a named tuple is immutable and small
    request_id: str
    start: int  # first position computed this step
    num_tokens: int
    is_prefill: bool  # part of a prompt (or a recompute), not a single decode token
    sampled_token: int | None  # the token this step sampled, if the chunk reached the end
    # speculative decoding: the chunk's draft tokens, of which the first num_accepted were kept;
    # sampled_token came after them (the bonus token if all were accepted, else the correction)
    draft_token_ids: tuple[int, ...] = ()
    num_accepted: int = 0


@dataclass(frozen=True, slots=True)  # one per step: slots keep a long trace small
class BlockSnapshot:
    """Who holds which physical KV block after a step: what the Cinema (`minivllm.lab.cinema`) draws.

    Cheap enough to take every step: parallel tuples over the requests that hold blocks, and, of the
    free blocks, only those freed in this step that kept their cached KV. The free queue's order and
    which older free blocks still hold cached KV follow from replaying the trace from its first step.
    """

    num_blocks: int
    block_size: int
    request_ids: tuple[str, ...]  # requests holding blocks (the running ones), oldest arrival first
    num_tokens: tuple[int, ...]  # tokens whose K/V each request has in the cache
    block_tables: tuple[tuple[int, ...], ...]  # logical block i -> physical block, per request
    freed_cached: tuple[int, ...]  # blocks freed this step that are still free and still cached

    def ref_counts(self) -> list[int]:
        """Per physical block, how many block tables point at it (0: free)."""
        refs = [0] * self.num_blocks
        for table in self.block_tables:
            for b in table:
                refs[b] += 1
        return refs


@dataclass(frozen=True, slots=True)  # one per step: slots keep a long trace small
class StepRecord:
    step: int
    start_time: float
    end_time: float
    chunks: tuple[ChunkRecord, ...]
    preempted: tuple[str, ...]
    finished: tuple[tuple[str, str], ...]  # (request_id, finish_reason); an abort: in the next step's
    blocks_allocated: tuple[int, ...]
    blocks_freed: tuple[int, ...]
    blocks_cache_hit: tuple[int, ...]
    blocks_evicted: tuple[int, ...]
    num_free_blocks: int  # after the step, including cached-but-free blocks
    num_cached_free_blocks: int
    num_running: int
    num_waiting: int
    blocks: BlockSnapshot
    comm: tuple[RankComm, ...] = ()  # per rank, the collectives of this step (empty in one process)
    kv_copies: tuple[KVCopy, ...] = ()  # made before the forward pass (the radix cache's copy-on-write)

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

    @property
    def num_draft_tokens(self) -> int:
        return sum(len(c.draft_token_ids) for c in self.chunks)

    @property
    def num_accepted_tokens(self) -> int:
        return sum(c.num_accepted for c in self.chunks)


class StepRecorder:
    """Writes the `StepRecord` of each step for one driver of one block manager: each `LLMEngine`
    and each `Simulator` run has its own.

    It keeps the block tables of its last snapshot, so that a table that did not change shares the
    previous step's tuple: a long run stores each table once per block it gains, not once per step.
    """

    def __init__(self) -> None:
        # request id -> (the tuple last recorded, a list copy to compare the live table with)
        self.last_tables: dict[str, tuple[tuple[int, ...], list[int]]] = {}

    def record(self, step: int, start_time: float, end_time: float, out: SchedulerOutput,
               sampled: dict, finished: list, block_manager: BlockManager,
               running: list[Sequence], num_waiting: int) -> StepRecord:
        """The record of one step; ``running`` are the requests holding blocks after it."""
        events: BlockEvents = block_manager.drain_events()
        chunks = tuple([_chunk_record(c, sampled.get(c.seq)) for c in out.chunks])
        return StepRecord(
            step=step, start_time=start_time, end_time=end_time, chunks=chunks,
            preempted=tuple(s.request_id for s in out.preempted),
            finished=tuple((s.request_id, s.finish_reason) for s in finished),
            blocks_allocated=tuple(events.allocated), blocks_freed=tuple(events.freed),
            blocks_cache_hit=tuple(events.cache_hits), blocks_evicted=tuple(events.evicted),
            num_free_blocks=block_manager.num_free_blocks,
            num_cached_free_blocks=block_manager.num_cached_free_blocks,
            num_running=len(running), num_waiting=num_waiting,
            blocks=self.snapshot_blocks(block_manager, running, events.freed),
            kv_copies=tuple(out.kv_copies))

    def snapshot_blocks(self, block_manager: BlockManager, running: list[Sequence],
                        freed: list[int]) -> BlockSnapshot:
        """The block tables of ``running`` (the requests holding blocks) and which of the blocks
        ``freed`` in this step still hold cached KV."""
        bm = block_manager
        tables: dict[str, tuple[tuple[int, ...], list[int]]] = {}
        for seq in running:
            # compare contents, not lengths: a speculative rollback can shrink a table and regrow it
            # with other blocks in one step
            kept = self.last_tables.get(seq.request_id)
            if kept is None or kept[1] != seq.block_table:
                kept = (tuple(seq.block_table), seq.block_table.copy())
            tables[seq.request_id] = kept
        self.last_tables = tables
        return BlockSnapshot(
            num_blocks=bm.num_blocks, block_size=bm.block_size,
            request_ids=tuple(tables),
            num_tokens=tuple([s.num_computed_tokens for s in running]),
            block_tables=tuple([kept[0] for kept in tables.values()]),
            freed_cached=tuple(b for b in dict.fromkeys(freed)  # a block may be freed twice in a step
                               if bm.blocks[b].ref_count == 0 and bm.blocks[b].block_hash is not None))


def _chunk_record(c: ScheduledChunk, sampled: int | list[int] | None) -> ChunkRecord:
    """``sampled``: the token the chunk sampled, or the tokens it emitted after verifying drafts."""
    if isinstance(sampled, list):
        return ChunkRecord(c.seq.request_id, c.start, c.num_new_tokens, c.is_prefill, sampled[-1],
                           c.draft_token_ids, len(sampled) - 1)
    # once per request per step: tuple.__new__ skips ChunkRecord's Python-level __new__ (3.5 % of a simulation)
    return tuple.__new__(ChunkRecord, (c.seq.request_id, c.start, c.num_new_tokens, c.is_prefill, sampled, (), 0))
