"""SGLang's RadixAttention prefix cache, as a second block manager beside the hash one.

Pure Python, no torch, the same `BlockManagerBase` contract: the scheduler, the engine, the
simulator and the widgets drive it unchanged (``CacheConfig(prefix_caching="radix")`` chooses it).

A radix tree over token sequences: a path from the root spells a prefix. A node is one physical KV
block and holds that block's tokens (up to ``block_size``, in ``Block.token_ids``), so a prefix's
K/V lives where the request that filled it wrote it. A new request walks down from the root as far
as its tokens match, **token by token**:

* a full block whose tokens all match is shared by reference, as in the hash cache;
* where the match ends inside a block (two prompts part mid-block, or the block is the half-filled
  tail of a finished or preempted request), the matched tokens' K/V is *copied* into a fresh block
  of the new request: a `KVCopy` the model runner makes before the step's forward pass
  (copy-on-write, vLLM's old ``blocks_to_copy``). A block that is not full is never shared, so no
  two requests ever write the same slot. The hash cache recomputes those tokens instead.

Why a node per block rather than per run of tokens, as in SGLang: the block is what is referenced,
freed and evicted. A branch inside a block cannot split the block, so siblings may begin with the
same tokens (each keeps its own copy of the shared run); children are found by their first token,
then compared token by token. Equal full siblings can occur too (two equal prompts admitted in one
step): both stay in the tree and the lookup tries each.

Eviction is leaf-first and least recently used, as in SGLang, and needs no heap: a request holds
every ancestor of its blocks and gives them back tail first, so the free queue (oldest release
first) lists every free node after its free children, and taking its head evicts a leaf
(`check_invariants` checks this order). Being used means being held: a copy takes no reference, so
it leaves its source's place in the queue as it is.

A copy reads the cache before the forward pass, so it may only read K/V computed in an earlier step:
tokens a chunk scheduled in this step writes become copyable when the Scheduler closes the step
(`take_kv_copies`). Whole blocks may be shared in the same step, as in the hash cache: attention
reads a layer's cache only after the step has written it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice

from minivllm.core.block_manager import BlockManagerBase, KVCopy, chain_hash
from minivllm.core.sequence import Sequence


@dataclass(eq=False, slots=True)
class RadixNode:
    """One cached block in the tree; its tokens are the block's ``token_ids``."""

    block_id: int  # -1: the root, which holds no tokens
    parent: RadixNode | None
    children: dict[int, list[RadixNode]] = field(default_factory=dict)  # by their first token
    num_ready: int = 0  # leading tokens whose K/V an earlier step computed: what a copy may read


def common_prefix_len(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class RadixBlockManager(BlockManagerBase):
    """The radix-tree allocation core (see the module's docstring)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.root = RadixNode(-1, None)
        self.nodes: dict[int, RadixNode] = {}  # block id -> its node: the blocks whose K/V is cached
        self._copies: list[KVCopy] = []  # asked for in the step being scheduled
        self._unready: dict[int, None] = {}  # blocks given tokens in the step being scheduled

    # ---- lookup -------------------------------------------------------------------------------
    def served_tokens(self, node: RadixNode, want: tuple[int, ...]) -> int:
        """Of ``want`` (the request's next tokens, at most a block), how many ``node`` serves: the
        whole block when it is full and all match (shared), else the matched run it can copy."""
        have = self.blocks[node.block_id].token_ids
        if len(want) == self.block_size and have == want:
            return self.block_size
        return min(common_prefix_len(have, want), node.num_ready)

    def _wanted(self, seq: Sequence, depth: int) -> tuple[int, ...]:
        """``seq``'s tokens from ``depth`` on that the block there may serve: never its last token
        (the model must run on it to produce the next token's logits)."""
        return tuple(seq.token_ids[depth:min(depth + self.block_size, seq.num_tokens - 1)])

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        if not self.enable_prefix_caching or not seq.reads_prefix_cache:
            return []
        bs = self.block_size
        best, best_len = None, 0
        stack = [(self.root, 0)]  # nodes whose children to try, and the depth of those children
        while stack:
            node, depth = stack.pop()
            want = self._wanted(seq, depth)
            for child in node.children.get(want[0], ()) if want else ():
                n = self.served_tokens(child, want)
                if n == bs:  # shared whole: its children may match further
                    stack.append((child, depth + bs))
                if depth + n > best_len:
                    best, best_len = child, depth + n
        path = []
        while best is not None and best is not self.root:
            path.append(best.block_id)
            best = best.parent
        return path[::-1]

    def cached_prefix_tokens(self, seq: Sequence, cached_blocks: list[int]) -> int:
        if not cached_blocks:
            return 0
        depth = (len(cached_blocks) - 1) * self.block_size
        return depth + self.served_tokens(self.nodes[cached_blocks[-1]], self._wanted(seq, depth))

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int]) -> bool:
        num_cached = self.cached_prefix_tokens(seq, cached_blocks)
        shared = cached_blocks[:num_cached // self.block_size]  # a partly matched last block is copied
        fresh = self.blocks_needed(num_cached + num_new_tokens) - len(shared)
        revived = sum(1 for b in shared if self.blocks[b].ref_count == 0)
        return fresh + revived <= self.num_free_blocks

    # ---- the allocation core ------------------------------------------------------------------
    def allocate(self, seq: Sequence, cached_blocks: list[int]) -> None:
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        bs = self.block_size
        num_cached = self.cached_prefix_tokens(seq, cached_blocks)
        self.share_blocks(seq, cached_blocks[:num_cached // bs])  # a partly matched last block is copied
        if num_cached % bs:
            self._copy_partial(seq, cached_blocks[-1], num_cached % bs)
        seq.num_computed_tokens = num_cached

    def _copy_partial(self, seq: Sequence, src: int, num_tokens: int) -> None:
        """Give ``seq`` a fresh block holding a copy of ``src``'s first ``num_tokens`` slots."""
        # src keeps its place in the free queue, if it is there (a copy holds no reference; the
        # Cinema replays the queue from the step's events). The pop may even evict src itself: the
        # copy still reads it first
        (dst,) = self.pop_free_blocks(1)
        self.blocks[dst].ref_count = 1
        seq.block_table.append(dst)
        self._copies.append(KVCopy(src, dst, num_tokens))
        start = (len(seq.block_table) - 1) * self.block_size
        self.insert(seq, start, start + num_tokens)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        start = seq.num_computed_tokens
        end = start + num_new_tokens
        self.grow_table(seq, end)
        if not self.enable_prefix_caching:
            return
        stop = min(end, seq.num_tokens)  # slots past the known tokens hold draft tokens: not yet
        i, offset = divmod(start, self.block_size)
        if stop - start == 1 and offset and len(self.blocks[seq.block_table[i]].token_ids) == offset:
            self.extend_node(seq.block_table, i, (seq.token_ids[start],))  # a decode: the common case, kept cheap
        else:
            self.insert(seq, start, stop)

    def free(self, seq: Sequence) -> None:
        self.release_blocks(seq.block_table[::-1])  # tail first: the free queue stays leaf-first
        seq.block_table.clear()
        seq.num_computed_tokens = 0

    def insert(self, seq: Sequence, start: int, stop: int) -> None:
        """Put ``seq``'s tokens ``[start, stop)`` in the tree, in the blocks that hold them (each
        block a node under the block before it). Tokens already there are skipped: speculative
        decoding registers a chunk's known tokens, then its accepted drafts."""
        bs, tokens, table = self.block_size, seq.token_ids, seq.block_table
        for i in range(start // bs, -(-stop // bs)):
            block = self.blocks[table[i]]
            have = len(block.token_ids)
            lo, hi = max(start, i * bs + have), min(stop, (i + 1) * bs)
            if lo >= hi:
                continue
            assert lo == i * bs + have, f"block {block.block_id} would get a gap"
            if not have:
                self.add_node(block.block_id, table[i - 1] if i else None, tokens[lo])
            self.extend_node(table, i, tuple(tokens[lo:hi]))

    def extend_node(self, table: list[int], i: int, tokens: tuple[int, ...]) -> None:
        """Append ``tokens`` to the node of ``table[i]``; a block they fill gets its chain hash."""
        block = self.blocks[table[i]]
        block.token_ids += tokens
        if len(block.token_ids) == self.block_size:  # named as the hash cache names it
            block.block_hash = chain_hash(self.blocks[table[i - 1]].block_hash if i else None, block.token_ids)
        self._unready[block.block_id] = None

    def add_node(self, block_id: int, parent_id: int | None, first_token: int) -> None:
        """A new node for ``block_id`` under ``parent_id`` (None: the root). Until the block is full
        its hash is the chain hash of its first token: a name that does not change on every token."""
        parent = self.root if parent_id is None else self.nodes[parent_id]
        node = self.nodes[block_id] = RadixNode(block_id, parent)
        parent.children.setdefault(first_token, []).append(node)
        parent_hash = None if parent_id is None else self.blocks[parent_id].block_hash
        self.blocks[block_id].block_hash = chain_hash(parent_hash, (first_token,))

    def take_kv_copies(self) -> list[KVCopy]:
        """The copies of the step just scheduled; what it registered becomes copyable for the next."""
        for block_id in self._unready:
            node = self.nodes.get(block_id)
            if node is not None:
                node.num_ready = len(self.blocks[block_id].token_ids)
        self._unready.clear()
        copies, self._copies = self._copies, []
        return copies

    # ---- eviction ----------------------------------------------------------------------------
    def pop_free_blocks(self, n: int) -> list[int]:
        """The base's (least recently freed first), taking each evicted node out of the tree."""
        if n <= len(self.free_queue):  # else the base raises
            for block_id in islice(self.free_queue, n):
                node = self.nodes.pop(block_id, None)
                if node is not None:
                    self._detach(node)
                self._unready.pop(block_id, None)
        return super().pop_free_blocks(n)

    def _detach(self, node: RadixNode) -> None:
        assert not node.children, f"block {node.block_id} is evicted before its children"
        first = self.blocks[node.block_id].token_ids[0]
        siblings = node.parent.children[first]
        siblings.remove(node)
        if not siblings:
            del node.parent.children[first]

    # ---- invariants ----------------------------------------------------------------------------
    def _check_hashes(self, seq: Sequence) -> None:
        """The base's per-request check: each block ``seq`` holds is a node under the block before
        it, holding exactly ``seq``'s computed tokens there."""
        bs, parent = self.block_size, self.root
        for i, block_id in enumerate(seq.block_table):
            node, block = self.nodes.get(block_id), self.blocks[block_id]
            where = f"request {seq.request_id}'s logical block {i} (block {block_id})"
            assert node is not None, f"{where} holds computed tokens but is not in the tree"
            assert node.parent is parent, f"{where} hangs under another block than the one before it"
            n = min(bs, seq.num_computed_tokens - i * bs)
            assert block.token_ids == tuple(seq.token_ids[i * bs:i * bs + n]), (
                f"{where} records tokens {list(block.token_ids)}, but the request's computed tokens there are "
                f"{seq.token_ids[i * bs:i * bs + n]}")
            parent = node

    def check_invariants(self, seqs: list[Sequence]) -> None:
        """The base's checks, then the tree's: every cached block is a node reachable from the root
        under its first token; only full nodes have children; hashes chain (a full block's over its
        tokens, as in the hash cache; a filling one's over its first token); the free queue lists
        every free node after its free children (leaf-first eviction)."""
        super().check_invariants(seqs)
        hashed = {b.block_id for b in self.blocks if b.block_hash is not None}
        assert hashed == set(self.nodes), f"blocks {sorted(hashed ^ set(self.nodes))} are cached but not in the tree, or back"
        queue_pos = {b: i for i, b in enumerate(self.free_queue)}
        for block_id, node in self.nodes.items():
            tokens = self.blocks[block_id].token_ids
            assert 1 <= len(tokens) <= self.block_size and node.num_ready <= len(tokens)
            parent = node.parent
            assert parent is self.root or self.nodes.get(parent.block_id) is parent, f"block {block_id}'s parent left the tree"
            assert any(c is node for c in parent.children.get(tokens[0], ())), f"block {block_id} is unreachable"
            assert not node.children or len(tokens) == self.block_size, f"block {block_id} is not full but has children"
            parent_hash = None if parent is self.root else self.blocks[parent.block_id].block_hash
            named = tokens if len(tokens) == self.block_size else tokens[:1]
            assert self.blocks[block_id].block_hash == chain_hash(parent_hash, named), f"block {block_id}: stale hash"
            if block_id in queue_pos and parent.block_id in queue_pos:
                assert queue_pos[block_id] < queue_pos[parent.block_id], (
                    f"free block {parent.block_id} would be evicted before its child {block_id}")
        for node in [self.root, *self.nodes.values()]:
            for first, children in node.children.items():
                assert children and all(c.parent is node and self.blocks[c.block_id].token_ids[0] == first
                                        for c in children), f"block {node.block_id}'s children are misfiled"
