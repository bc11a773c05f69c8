"""The KV connector's scheduler side (pure Python, no torch): what to send and receive, for which
request, into which blocks, and when.

Shaped like vLLM's ``KVConnectorBase_V1`` scheduler-side methods, cut down to one prefill and one
decode instance that move K/V synchronously between steps:

* prefill instance: `saves_after_step` (vLLM's ``build_connector_meta`` for the saving side) names
  the requests whose prompt the step completed; the worker side copies their K/V out of the paged
  cache right after the forward pass, so their blocks go back to the prefill instance's cache as
  usual. `continues_on_decode` (vLLM's ``request_finished``) says whether the request goes on.
* decode instance: `DecodeAdmission` queues the arrivals; before each step it admits them in order
  while the cache and ``max_num_seqs`` allow (``get_num_new_matched_tokens``: the prompt positions
  the local prefix cache lacks come from the prefill instance; ``update_state_after_alloc``: the
  blocks they go into), and returns one `KVLoad` per admitted request for the worker side to fill.
  A request that does not fit waits; none is dropped.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from minivllm.core.scheduler import Scheduler, SchedulerOutput
from minivllm.core.sequence import Sequence


def slots_of(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The cache slots of positions ``[start, end)`` of a request with ``block_table``."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


@dataclass(frozen=True)
class KVSave:
    """Prefill side: copy the K/V of positions ``[0, num_tokens)`` (the whole prompt) out of ``slots``."""

    request_id: str
    slots: list[int]


@dataclass(frozen=True)
class KVLoad:
    """Decode side: receive the K/V of positions ``[first_position, first_position + len(slots))``
    into ``slots``, the decode instance's own (``block_ids`` are their blocks)."""

    request_id: str
    num_prompt_tokens: int
    first_position: int
    slots: list[int]
    block_ids: tuple[int, ...]


def saves_after_step(out: SchedulerOutput, block_size: int) -> list[KVSave]:
    """The prompts this step's forward pass completed: every chunk that samples (on the prefill
    instance a request samples once, its first token, at the end of its prompt)."""
    return [KVSave(c.seq.request_id, slots_of(c.seq.block_table, 0, c.seq.num_prompt_tokens, block_size))
            for c in out.chunks if c.samples]


def continues_on_decode(finish_reason: str | None, num_tokens: int, max_tokens: int, max_model_len: int) -> bool:
    """Whether a request that the prefill instance ended after its first token (it runs there with
    ``max_tokens=1``) goes on to the decode instance: only if it ended for that cap, not for a stop
    or for a limit of the request's own."""
    return finish_reason == "length" and max_tokens > 1 and num_tokens < max_model_len


class DecodeAdmission:
    """The decode instance's arrivals, first come first served, until their blocks are free."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.pending: deque[Sequence] = deque()  # each ends with its first token, sampled by the prefill side

    def add(self, seq: Sequence) -> None:
        self.pending.append(seq)

    def get_num_new_matched_tokens(self, seq: Sequence, cached_blocks: list[int]) -> int:
        """Prompt positions whose K/V comes from the prefill instance: those the local prefix cache
        (``cached_blocks``) does not hold."""
        return seq.num_prompt_tokens - self.scheduler.block_manager.cached_prefix_tokens(seq, cached_blocks)

    def admit(self, start: Callable[[Sequence, list[int]], None],
              plan: Callable[[str, int, int, list[int], int], KVLoad] | None = None) -> list[KVLoad]:
        """Admit arrivals in order while they fit, each with room for its prompt and its next token
        (so its first decode step needs no preemption); ``start(seq, cached_blocks)`` allocates its
        blocks and makes it run (`LLMEngine.add_prefilled_request`). The first that does not fit
        stops admission: no one overtakes it. ``plan(request id, prompt tokens, locally cached
        tokens, block table, block size)`` makes each admitted request's `KVLoad` (default `kv_load`;
        the decode instance passes its receiver's ``plan_load``)."""
        plan = plan or kv_load
        sched, bm, loads = self.scheduler, self.scheduler.block_manager, []
        while self.pending and len(sched.running) < sched.max_num_seqs:
            seq = self.pending[0]
            cached = bm.find_cached_prefix(seq)
            remote = self.get_num_new_matched_tokens(seq, cached)
            if not bm.can_allocate(seq, remote + 1, cached):
                break
            self.pending.popleft()
            start(seq, cached)
            loads.append(plan(seq.request_id, seq.num_prompt_tokens, seq.num_prompt_tokens - remote,
                              list(seq.block_table), bm.block_size))
        return loads


def kv_load(request_id: str, num_prompt_tokens: int, num_cached_tokens: int, block_table: list[int],
            block_size: int) -> KVLoad:
    """The K/V a request admitted on the decode instance needs from the prefill instance: the prompt
    positions its local prefix cache (the first ``num_cached_tokens``, whole blocks) lacks, and the
    slots of ``block_table`` (the decode instance's blocks, freshly allocated after the cached ones)
    they go into."""
    first, end = num_cached_tokens, num_prompt_tokens
    return KVLoad(request_id, end, first, slots_of(block_table, first, end, block_size),
                  tuple(block_table[first // block_size:-(-end // block_size)]))
