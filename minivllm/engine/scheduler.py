"""Iteration-level scheduling: which requests run in the next step, and how many tokens each.

Pure Python, no torch. Every step the scheduler hands out a token budget
(``max_num_batched_tokens``) and at most ``max_num_seqs`` running requests:

* ``continuous`` batching with chunked prefill (vLLM's default): running requests go first,
  oldest first, each taking its next token (decode) or its next prompt chunk; waiting requests then
  fill what is left of the budget, FCFS, their prompts cut into chunks if need be. Prefill and decode
  share one step.
* ``continuous`` without chunked prefill: whole prompts only, and a step that admits prompts runs
  prompts only (decodes wait a step), as in vLLM's original scheduler.
* ``static``: no request joins until the whole running batch has finished; the baseline that
  continuous batching is measured against.

When the KV cache runs out of blocks for a running request, the most recently arrived running
request is preempted: its blocks are freed and it goes back to the front of the waiting queue, to be
recomputed later (its generated tokens are kept, and the prefix cache often makes that cheap).
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from minivllm.engine.block_manager import BlockManager
from minivllm.engine.sequence import Sequence, SequenceStatus

BATCHING_POLICIES = ("continuous", "static")


@dataclass(frozen=True)
class ScheduledChunk:
    """``num_new_tokens`` tokens of ``seq`` starting at position ``start`` run this step."""

    seq: Sequence
    start: int
    num_new_tokens: int

    @property
    def is_prefill(self) -> bool:
        """Prompt tokens, or several tokens at once (a recompute); a decode is one generated token."""
        return self.start < self.seq.num_prompt_tokens or self.num_new_tokens > 1

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last known token, so the step samples its next one."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, batching_policy: str = "continuous"):
        if batching_policy not in BATCHING_POLICIES:
            raise ValueError(f"batching_policy={batching_policy!r} must be one of {BATCHING_POLICIES}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs!r} must be >= 1")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens!r} must be >= 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.batching_policy = batching_policy
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest arrival first; preemption takes from the end

    # ---- queue management ----------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` (stop, length or abort), wherever it is, and release its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.enable_chunked_prefill or not self._schedule_whole_prompts(out):
            budget = self.max_num_batched_tokens
            budget = self._schedule_running(out, budget)
            # a step that had to preempt is short of blocks: admitting now would only thrash
            if self.enable_chunked_prefill and not out.preempted:
                self._schedule_waiting(out, budget, chunked=True)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        bm = self.block_manager
        for seq in list(self.running):  # a copy: preemption removes from the end
            if budget == 0 or seq.status is not SequenceStatus.RUNNING:
                break  # out of budget, or seq was preempted and so was everyone after it
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while seq.status is SequenceStatus.RUNNING and not bm.can_append(seq, num_new):
                self._preempt(self.running[-1], out)
            if seq.status is not SequenceStatus.RUNNING:
                break
            bm.append_slots(seq, num_new)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_new))
            budget -= num_new
        return budget

    def _schedule_whole_prompts(self, out: SchedulerOutput) -> bool:
        """Without chunked prefill: admit whole prompts; a step with prompts runs only prompts."""
        self._schedule_waiting(out, self.max_num_batched_tokens, chunked=False)
        return not out.is_empty

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, *, chunked: bool) -> None:
        if not self._admission_open():
            return
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = bm.find_cached_prefix(seq)
            remaining = seq.num_tokens - len(cached) * bm.block_size
            num_new = min(remaining, budget) if chunked else remaining
            if num_new > budget or not bm.can_allocate(seq, num_new, cached):
                break
            self.waiting.popleft()
            bm.allocate(seq, cached)
            if seq.num_cached_tokens is None:  # first admission: the hit the request is credited with
                seq.num_cached_tokens = seq.num_computed_tokens
            bm.append_slots(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival_index)  # a recompute goes back in place
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_new))
            budget -= num_new

    def _admission_open(self) -> bool:
        """Static batching admits requests only while the current batch is still being formed,
        that is, before any of its requests has produced a token."""
        if self.batching_policy == "continuous":
            return True
        return not any(seq.num_output_tokens for seq in self.running)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    # ---- after the model ran ---------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: dict[Sequence, int]) -> None:
        """Advance every scheduled sequence past its chunk and append its sampled token, if any."""
        for chunk in out.chunks:
            chunk.seq.num_computed_tokens = chunk.start + chunk.num_new_tokens
        for seq, token in sampled.items():
            seq.token_ids.append(token)
