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

Those decisions are a `SchedulingPolicy` (`minivllm.core.policy`): the Scheduler keeps the queues
and makes the moves the policy asks for (`schedule_chunk`, `admit`, `preempt`); exercise 04 plugs in
a learner's policy through ``batching_policy``.

With speculative decoding (``num_speculative_tokens`` > 0) a decoding request also gets slots for up
to that many draft tokens after its token, in the same step and from the same budget; the engine's
proposer fills them (`ScheduledChunk.draft_token_ids`) and the KV of rejected drafts is dropped in
`update`.

When the KV cache runs out of blocks for a running request, the most recently arrived running
request is preempted: its blocks are freed and it goes back to the front of the waiting queue, to be
recomputed later (its generated tokens are kept, and the prefix cache often makes that cheap).
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from minivllm.core.block_manager import BlockManager, KVCopy
from minivllm.core.policy import SchedulingPolicy, make_policy
from minivllm.core.sequence import Sequence, SequenceStatus


@dataclass(slots=True, eq=False)
class ScheduledChunk:
    """``num_new_tokens`` tokens of ``seq`` starting at position ``start`` run this step; the last
    ``len(draft_token_ids)`` of them are draft tokens that follow the sequence's known tokens."""

    seq: Sequence
    start: int
    num_new_tokens: int
    draft_token_ids: tuple[int, ...] = ()

    @property
    def is_prefill(self) -> bool:
        """Prompt tokens, or several known tokens at once (a recompute); a decode is one generated
        token (plus its drafts)."""
        return self.start < len(self.seq.prompt_token_ids) or self.num_new_tokens - len(self.draft_token_ids) > 1

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last known token, so the step samples its next one."""
        return self.start + self.num_new_tokens - len(self.draft_token_ids) == len(self.seq.token_ids)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # structured output: each constrained request's token mask rows, set by the engine after scheduling
    # (xgrammar's bitmask; the core only passes it on)
    token_masks: dict[str, object] = field(default_factory=dict)
    # copy-on-write of partly matched blocks (the radix prefix cache): made before the forward pass
    kv_copies: list[KVCopy] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, batching_policy: str | SchedulingPolicy = "continuous",
                 num_speculative_tokens: int = 0, max_model_len: int | None = None):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs!r} must be >= 1")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens!r} must be >= 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.policy = make_policy(batching_policy)
        self.num_speculative_tokens = num_speculative_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest arrival first; preemption takes from the end
        self._finished: list[Sequence] = []  # ended since the last step closed (`take_finished`)

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
        self._finished.append(seq)

    def take_finished(self) -> list[Sequence]:
        """The requests ended since the last call, in order: a step's record lists them, so one
        aborted between steps shows in the next step's record (its blocks' return among its freed
        blocks)."""
        finished, self._finished = self._finished, []
        return finished

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """The next step, as the policy decides it."""
        out = SchedulerOutput()
        self.policy.schedule(self, out)
        out.kv_copies = self.block_manager.take_kv_copies()
        return out

    # ---- the moves a policy makes ------------------------------------------------------------
    def num_tokens_to_run(self, seq: Sequence) -> int:
        """The tokens a running ``seq`` has yet to run: one when it decodes, else the rest of its
        prompt (or of a recompute); plus the slots of its draft tokens with speculative decoding."""
        todo = len(seq.token_ids) - seq.num_computed_tokens
        return todo + self._num_draft_slots(seq) if self.num_speculative_tokens else todo

    def schedule_chunk(self, seq: Sequence, num_new_tokens: int, out: SchedulerOutput) -> None:
        """Run the next ``num_new_tokens`` tokens of the running ``seq`` this step; the policy has
        checked `BlockManager.can_append`."""
        if seq.status is not SequenceStatus.RUNNING:
            raise ValueError(f"seq={seq.request_id!r} is {seq.status.value}, not running: admit it first")
        most = self.num_tokens_to_run(seq)
        if not 1 <= num_new_tokens <= most:
            raise ValueError(f"num_new_tokens={num_new_tokens!r} must be in [1, {most}] for request {seq.request_id!r}")
        self.block_manager.append_slots(seq, num_new_tokens)
        out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_new_tokens))

    def _num_draft_slots(self, seq: Sequence) -> int:
        """Slots for draft tokens after a decoding request's token: the engine verifies them all in
        one step, which emits at most one token more than it accepts, so the request may never get
        more than ``max_tokens`` or ``max_model_len`` allows minus one."""
        if not self.num_speculative_tokens or seq.num_tokens - seq.num_computed_tokens != 1:
            return 0
        room = seq.sampling_params.max_tokens - seq.num_output_tokens - 1
        if self.max_model_len is not None:
            room = min(room, self.max_model_len - seq.num_tokens - 1)
        return max(0, min(self.num_speculative_tokens, room))

    def admit(self, seq: Sequence, cached_blocks: list[int], num_new_tokens: int, out: SchedulerOutput) -> None:
        """Move the waiting ``seq`` to the running list with its cached prefix blocks (from
        `BlockManager.find_cached_prefix`) and run its first ``num_new_tokens`` uncached tokens this
        step; the policy has checked `BlockManager.can_allocate`."""
        if seq.status is not SequenceStatus.WAITING:
            raise ValueError(f"seq={seq.request_id!r} is {seq.status.value}, not waiting")
        uncached = seq.num_tokens - self.block_manager.cached_prefix_tokens(seq, cached_blocks)
        if not 1 <= num_new_tokens <= uncached:
            raise ValueError(f"num_new_tokens={num_new_tokens!r} must be in [1, {uncached}] for request "
                             f"{seq.request_id!r}")
        if cached_blocks and not seq.reads_prefix_cache:
            raise ValueError(f"seq={seq.request_id!r} asks for prompt_logprobs, so it computes its whole prompt: "
                             "admit it without cached blocks (Sequence.reads_prefix_cache)")
        self.waiting.remove(seq)  # the policy chose it: the front of the queue for FCFS
        self.block_manager.allocate(seq, cached_blocks)
        if seq.num_cached_tokens is None:  # first admission: the hit the request is credited with
            seq.num_cached_tokens = seq.num_computed_tokens
        self.block_manager.append_slots(seq, num_new_tokens)
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.arrival_index)  # a recompute goes back in place
        out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_new_tokens))

    def receive_transferred(self, seq: Sequence, cached_blocks: list[int], num_transferred_tokens: int) -> None:
        """Disaggregated prefill, the decode side (`minivllm.disagg`, and the simulator's P/D pools):
        give a request that another instance prefilled the blocks for the K/V of its first
        ``num_transferred_tokens`` tokens, counted as computed: its local prefix-cache hits
        ``cached_blocks`` first, then fresh blocks that the KV connector fills. It is neither waiting
        nor running until `start_transferred` (its K/V has arrived). The caller has checked
        `BlockManager.can_allocate` and ``max_num_seqs``."""
        if seq.block_table or seq.status is not SequenceStatus.WAITING:
            raise ValueError(f"seq={seq.request_id!r} is {seq.status.value} with {len(seq.block_table)} blocks: "
                             "only a new request receives transferred K/V")
        hit = self.block_manager.cached_prefix_tokens(seq, cached_blocks)
        if not hit <= num_transferred_tokens < seq.num_tokens:
            raise ValueError(f"num_transferred_tokens={num_transferred_tokens!r} must be in [{hit}, "
                             f"{seq.num_tokens}) for request {seq.request_id!r}")
        self.block_manager.allocate(seq, cached_blocks)
        seq.num_cached_tokens = seq.num_computed_tokens
        self.block_manager.append_slots(seq, num_transferred_tokens - seq.num_computed_tokens)
        seq.num_computed_tokens = num_transferred_tokens

    def start_transferred(self, seq: Sequence) -> None:
        """The transferred K/V of ``seq`` (`receive_transferred`) has arrived: it decodes from the next
        step on."""
        if seq.status is not SequenceStatus.WAITING or not seq.block_table or seq in self.waiting:
            raise ValueError(f"seq={seq.request_id!r} has not received transferred K/V (receive_transferred)")
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.arrival_index)

    def preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Free the running ``seq``'s blocks and put it back at the front of the waiting queue, to be
        recomputed later; its generated tokens are kept. Not a request already run this step."""
        if seq.status is not SequenceStatus.RUNNING:
            raise ValueError(f"seq={seq.request_id!r} is {seq.status.value}, not running")
        if any(c.seq is seq for c in out.chunks):
            raise ValueError(f"seq={seq.request_id!r} already runs in this step: preempt it before scheduling it")
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    # ---- after the model ran ---------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: dict[Sequence, int | list[int]]) -> None:
        """Advance every scheduled sequence past its chunk and append its sampled token, if any.
        A chunk with draft tokens emits a list: the drafts it accepted, then one more token."""
        for chunk in out.chunks:
            if not chunk.draft_token_ids:
                chunk.seq.num_computed_tokens = chunk.start + chunk.num_new_tokens
        for seq, tokens in sampled.items():
            if isinstance(tokens, list):
                seq.token_ids += tokens
            else:
                seq.token_ids.append(tokens)
        if self.num_speculative_tokens:
            for chunk in out.chunks:
                if chunk.draft_token_ids:
                    self._keep_accepted(chunk, len(sampled[chunk.seq]) - 1)

    def _keep_accepted(self, chunk: ScheduledChunk, num_accepted: int) -> None:
        """Keep the K/V of the chunk's known tokens and accepted drafts; give back the slots of the
        rejected drafts (never registered in the prefix cache: `append_slots` registers known tokens
        only), then register the blocks that the accepted drafts filled."""
        seq, bm = chunk.seq, self.block_manager
        num_computed = chunk.start + chunk.num_new_tokens - len(chunk.draft_token_ids) + num_accepted
        bm.free_slots_after(seq, num_computed)
        bm.append_slots(seq, num_computed - seq.num_computed_tokens)  # no new block: registers only
        seq.num_computed_tokens = num_computed
        seq.spec_metrics.record(len(chunk.draft_token_ids), num_accepted)
