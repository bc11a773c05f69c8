"""The paged KV cache's bookkeeping: which physical block holds which request's tokens.

Pure Python, no torch: the model runner, the simulator and the course widgets drive the same object.

* Each request owns a *block table*: logical block i of the request lives in physical block
  ``block_table[i]``; a block holds ``block_size`` tokens.
* Automatic prefix caching: a full block is named by a hash chained over every token before it
  (``hash(parent_hash, tokens)``), so equal hashes mean equal prefixes. A new request walks its
  prompt block by block and reuses cached blocks (ref count + 1) instead of recomputing them. A hit
  also compares the stored token ids, so a hash collision can never hand out the wrong KV.
* Freed blocks keep their contents and their hash: they wait in an LRU free queue and can still be
  hit until a new allocation evicts them (least recently freed first).

Two classes, so that exercise 02 can plug a learner's allocation core into the real engine
(``LLM(..., block_manager_class=...)``): `BlockManagerBase` holds the blocks, the free queue and its
eviction, the queries the scheduler asks, the events the trace reads and the invariant check;
`BlockManager`, the engine's own, adds the allocation core (prefix-cache lookup, allocate, append
slots, free). `minivllm.core.radix_block_manager` holds the other cache, SGLang's radix tree,
matched token by token; ``CacheConfig.prefix_caching`` chooses.
"""
from __future__ import annotations

import abc
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

from minivllm.core.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and its tokens are known
    token_ids: tuple[int, ...] = ()


@dataclass
class BlockEvents:
    """What the block manager did since the last `drain_events` (read into the step trace)."""

    allocated: list[int] = field(default_factory=list)
    freed: list[int] = field(default_factory=list)
    cache_hits: list[int] = field(default_factory=list)
    evicted: list[int] = field(default_factory=list)


class KVCopy(NamedTuple):  # a named tuple: cheap to send to worker processes every step
    """Copy-on-write of a partly matched block (the radix cache): the K/V in the first
    ``num_tokens`` slots of ``src_block`` goes to the same slots of ``dst_block``, every layer,
    before the step's forward pass writes anything."""

    src_block: int
    dst_block: int
    num_tokens: int


def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block, which depends on every token before it through ``parent_hash``.

    Built only from ints, whose hashes are the same in every process (``hash(None)`` is not before
    Python 3.12), so the hashes a notebook prints are reproducible."""
    return hash((0 if parent_hash is None else parent_hash, token_ids))


class BlockManagerBase(abc.ABC):
    """Everything but the allocation core, which subclasses provide: `find_cached_prefix`,
    `allocate`, `append_slots` and `free`."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks!r} must be an int >= 1")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} must be an int >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # ref_count == 0 blocks, oldest-freed first; they may still be cached (have a hash)
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.num_cached_free_blocks = 0  # free blocks that still hold cached contents
        self.events = BlockEvents()

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no request references: truly empty ones plus cached ones that may be evicted."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix_tokens(self, seq: Sequence, cached_blocks: list[int]) -> int:
        """How many leading tokens of ``seq`` the blocks `find_cached_prefix` found serve: whole
        blocks here (the radix cache may serve part of its last one, by copying it)."""
        return len(cached_blocks) * self.block_size

    def take_kv_copies(self) -> list[KVCopy]:
        """The K/V copies the step just scheduled needs before its forward pass; the Scheduler asks
        once per step, at the end of `Scheduler.schedule`. The hash cache shares whole blocks only:
        none."""
        return []

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int]) -> bool:
        """Whether ``seq`` (with no blocks yet) can get blocks for its first ``num_new_tokens``
        uncached tokens. Reviving a cached block from the free queue also uses up a free block."""
        total = len(cached_blocks) * self.block_size + num_new_tokens
        fresh = self.blocks_needed(total) - len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        return fresh + revived <= self.num_free_blocks

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size) - len(seq.block_table)
        return need <= len(self.free_queue)

    # ---- the allocation core ---------------------------------------------------------------
    @abc.abstractmethod
    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Physical blocks that already hold a prefix of ``seq``'s tokens (full blocks here; the
        radix cache's last one may match in part: `cached_prefix_tokens` says how many tokens hit).

        The last token of the sequence is never served from the cache: the model must run on it to
        produce the next token's logits, so at most ``(num_tokens - 1) // block_size`` blocks hit. A
        sequence that does not `reads_prefix_cache` (it wants its prompt's logprobs) gets none.
        """

    @abc.abstractmethod
    def allocate(self, seq: Sequence, cached_blocks: list[int]) -> None:
        """Give a waiting ``seq`` (no blocks yet) its cached prefix blocks, one more reference each,
        recorded in ``events.cache_hits``; sets ``num_computed_tokens`` to match."""

    @abc.abstractmethod
    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow ``seq``'s table to cover ``num_new_tokens`` more tokens, then register the blocks
        those tokens fill in the prefix cache (their K/V is written in this very step)."""

    @abc.abstractmethod
    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references, tail block first; empty its table, zero its
        ``num_computed_tokens``."""

    def free_slots_after(self, seq: Sequence, num_tokens: int) -> None:
        """Speculative decoding: drop ``seq``'s blocks past the first ``num_tokens`` tokens (slots of
        draft tokens that were rejected, or never proposed), tail first."""
        if not 0 <= num_tokens <= len(seq.block_table) * self.block_size:
            raise ValueError(f"num_tokens={num_tokens!r} must be in [0, {len(seq.block_table) * self.block_size}]")
        keep = self.blocks_needed(num_tokens)
        self.release_blocks(seq.block_table[keep:][::-1])  # tail first
        del seq.block_table[keep:]

    # ---- the free queue ------------------------------------------------------------------
    def pop_free_block(self) -> int:
        """Take the least recently freed block off the free queue, evict the cached contents it
        still holds, and return it empty. Its ref_count is 0: the caller takes the first reference."""
        return self.pop_free_blocks(1)[0]

    def pop_free_blocks(self, n: int) -> list[int]:
        """`pop_free_block` ``n`` times, in one call: a prompt takes dozens of blocks at once."""
        if n > len(self.free_queue):
            raise RuntimeError(f"{n} blocks asked, {len(self.free_queue)} free: the scheduler asks "
                               "can_allocate/can_append first")
        taken, evicted = [], []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)  # least recently freed first
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict the cached contents
                if self.cached.get(block.block_hash) == block_id:
                    del self.cached[block.block_hash]
                evicted.append(block_id)
            block.block_hash, block.token_ids = None, ()
            taken.append(block_id)
        self.num_cached_free_blocks -= len(evicted)
        self.events.evicted += evicted
        self.events.allocated += taken
        return taken

    def revive_block(self, block_id: int) -> None:
        """Take a free block that still holds cached contents off the free queue: a cache hit on
        it. Its ref_count is 0: the caller takes the reference."""
        if block_id not in self.free_queue or self.blocks[block_id].block_hash is None:
            raise ValueError(f"block_id={block_id!r} is not a free cached block")
        del self.free_queue[block_id]
        self.num_cached_free_blocks -= 1

    def release_blocks(self, block_ids: list[int]) -> None:
        """Drop one reference to each of ``block_ids``, in order; the blocks that no request holds
        any more go to the end of the free queue, in that order."""
        unheld = []
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count < 1:
                raise ValueError(f"block_id={block_id!r} has no reference to drop")
            block.ref_count -= 1
            if block.ref_count == 0:  # held until now, so not on the free queue (push_free_block's checks)
                unheld.append(block_id)
        self._queue_free(unheld)

    def share_blocks(self, seq: Sequence, block_ids: list[int]) -> None:
        """Append the cache hits ``block_ids`` to ``seq``'s block table, each with one more reference
        (a free one revived first), and record them as hits."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.revive_block(block_id)
            block.ref_count += 1
            seq.block_table.append(block_id)
        self.events.cache_hits.extend(block_ids)

    def grow_table(self, seq: Sequence, num_tokens: int) -> None:
        """Append fresh blocks, one reference each, until ``seq``'s block table covers ``num_tokens``
        tokens."""
        missing = -(-num_tokens // self.block_size) - len(seq.block_table)  # blocks_needed, inlined: every step
        if missing > 0:
            for block_id in self.pop_free_blocks(missing):
                self.blocks[block_id].ref_count = 1
                seq.block_table.append(block_id)

    def push_free_block(self, block_id: int) -> None:
        """Queue a block whose ref_count fell to 0 (evicted last); a cached one stays hittable."""
        if block_id in self.free_queue:
            raise ValueError(f"block_id={block_id!r} is already on the free queue")
        if self.blocks[block_id].ref_count != 0:
            raise ValueError(f"block_id={block_id!r} has ref_count {self.blocks[block_id].ref_count}: only a "
                             "block no request holds goes on the free queue")
        self._queue_free([block_id])

    def _queue_free(self, block_ids: list[int]) -> None:
        """Append unreferenced blocks to the free queue (evicted last); cached ones stay hittable."""
        for block_id in block_ids:
            self.free_queue[block_id] = None
        self.num_cached_free_blocks += sum(1 for b in block_ids if self.blocks[b].block_hash is not None)
        self.events.freed += block_ids

    def drain_events(self) -> BlockEvents:
        events, self.events = self.events, BlockEvents()
        return events

    # ---- invariants (tests and the exercise check call this after every step) ---------------
    def check_invariants(self, seqs: list[Sequence]) -> None:
        """Raise AssertionError, in words, if the bookkeeping is inconsistent with ``seqs``
        (every request that currently holds blocks). Call it between engine steps."""
        holders: list[list[str]] = [[] for _ in range(self.num_blocks)]
        for seq in seqs:
            assert len(set(seq.block_table)) == len(seq.block_table), \
                f"request {seq.request_id} lists a block twice: {seq.block_table}"
            assert len(seq.block_table) == self.blocks_needed(seq.num_computed_tokens), (
                f"request {seq.request_id} has {seq.num_computed_tokens} tokens in the cache but holds "
                f"{len(seq.block_table)} blocks")
            for b in seq.block_table:
                holders[b].append(seq.request_id)
        for block in self.blocks:
            held = holders[block.block_id]
            assert block.ref_count == len(held), (
                f"block {block.block_id} has ref_count {block.ref_count} but {len(held)} block "
                f"table{'s hold' if len(held) != 1 else ' holds'} it"
                + (f" (request{'s' if len(held) > 1 else ''} {', '.join(held)})" if held else ""))
            in_free = block.block_id in self.free_queue
            assert in_free == (block.ref_count == 0), (
                f"block {block.block_id} with ref_count {block.ref_count} is "
                f"{'in' if in_free else 'missing from'} the free queue")
        for h, block_id in self.cached.items():
            assert self.blocks[block_id].block_hash == h, f"cache entry for block {block_id} has a stale hash"
        cached_free = sum(1 for b in self.free_queue if self.blocks[b].block_hash is not None)
        assert cached_free == self.num_cached_free_blocks, (
            f"{cached_free} free blocks hold cached contents, but the counter says {self.num_cached_free_blocks}")
        assert len(self.free_queue) + sum(1 for h in holders if h) == self.num_blocks, "a block leaked"
        if self.enable_prefix_caching:
            for seq in seqs:
                self._check_hashes(seq)

    def _check_hashes(self, seq: Sequence) -> None:
        """Every block ``seq`` has filled holds its tokens under the chain hash of its prefix; the
        blocks it is still filling have no hash yet."""
        bs, parent = self.block_size, None
        for i, block_id in enumerate(seq.block_table):
            block = self.blocks[block_id]
            where = f"request {seq.request_id}'s logical block {i} (block {block_id})"
            if (i + 1) * bs > seq.num_computed_tokens:
                assert block.block_hash is None, f"{where} is not full yet but already has a hash"
                continue
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            assert block.block_hash is not None, f"{where} is full but has no hash"
            assert block.token_ids == tokens, (
                f"{where} records tokens {list(block.token_ids)}, but the request's tokens there are "
                f"{list(tokens)}")
            want = chain_hash(parent, tokens)
            assert block.block_hash == want, (
                f"{where} has hash {block.block_hash}, but chaining its tokens onto the hash before "
                f"it gives {want}")
            parent = block.block_hash


class BlockManager(BlockManagerBase):
    """The engine's allocation core."""

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        if not self.enable_prefix_caching or not seq.reads_prefix_cache:
            return []
        hits: list[int] = []
        parent: int | None = None
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(parent, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
            parent = h
        return hits

    def allocate(self, seq: Sequence, cached_blocks: list[int]) -> None:
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        self.share_blocks(seq, cached_blocks)
        seq.num_computed_tokens = len(cached_blocks) * self.block_size

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        start = seq.num_computed_tokens
        end = start + num_new_tokens
        self.grow_table(seq, end)
        # hash the blocks that fill, if any (slots past the known tokens hold draft tokens: not yet)
        if self.enable_prefix_caching and end // self.block_size > start // self.block_size:
            self._register_full_blocks(seq, min(end, len(seq.token_ids)))

    def free(self, seq: Sequence) -> None:
        # tail blocks are queued first so they are evicted first: a prefix is worth more to later
        # requests than the tail that hangs from it
        self.release_blocks(seq.block_table[::-1])
        seq.block_table.clear()
        seq.num_computed_tokens = 0

    def _register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Hash the blocks that become full with the first ``num_tokens`` tokens. Blocks before
        ``num_computed_tokens`` were hashed when they filled (or were cache hits)."""
        bs, blocks, table, tokens = self.block_size, self.blocks, seq.block_table, seq.token_ids
        first = seq.num_computed_tokens // bs
        parent = blocks[table[first - 1]].block_hash if first else None
        for i in range(first, num_tokens // bs):
            block = blocks[table[i]]
            if block.block_hash is None:
                block.token_ids = tuple(tokens[i * bs:(i + 1) * bs])
                block.block_hash = chain_hash(parent, block.token_ids)
                # first writer wins; a duplicate stays private to its request and is never hit
                self.cached.setdefault(block.block_hash, block.block_id)
            parent = block.block_hash
