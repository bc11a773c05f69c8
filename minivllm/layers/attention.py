"""Attention over the paged KV cache, and the per-step metadata that drives it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from minivllm.kernels.reference import paged_attention, store_kv


@dataclass
class AttentionGroup:
    """Sequences padded together for the torch reference attention (see ``paged_attention``).
    Prefill chunks form one group and decodes (one query each) others, split by context length,
    so that neither a long prompt chunk nor one long context pads hundreds of short decodes."""

    query_index: torch.Tensor  # [seqs, q_len] rows of the flat batch
    key_slots: torch.Tensor  # [seqs, k_len]
    mask: torch.Tensor  # [seqs, q_len, k_len]
    padded_rows: torch.Tensor  # which rows of the flattened [seqs * q_len] result are real...
    out_rows: torch.Tensor  # ...and the rows of the flat batch they go to


@dataclass
class PagedBatch:
    """Sequences for the Triton kernels (``minivllm.kernels.paged_attention``), unpadded: sequence
    ``i``'s new tokens are rows ``query_starts[i] ... + query_lens[i]`` of the flat batch, the last of
    its ``context_lens[i]`` tokens in the cache, found through ``block_tables[i]``."""

    query_starts: torch.Tensor  # [seqs] int32
    query_lens: torch.Tensor  # [seqs] int32
    context_lens: torch.Tensor  # [seqs] int32
    block_tables: torch.Tensor  # [seqs, most blocks] int32, short tables padded with block 0
    block_size: int
    max_query_len: int
    max_context_len: int


@dataclass
class AttentionMetadata:
    """What every attention layer needs to know about this step's flat batch of tokens."""

    slot_mapping: torch.Tensor  # [tokens] cache slot each new token's K/V is written to
    groups: list[AttentionGroup] = field(default_factory=list)  # the torch backend's padded groups
    decodes: PagedBatch | None = None  # the Triton backend: sequences with one new token...
    prefills: PagedBatch | None = None  # ...and prompt chunks
    backend: str = "torch"  # or "triton"


def build_paged_batch(query_starts: tuple[int, ...], query_lens: tuple[int, ...], context_lens: tuple[int, ...],
                      block_tables: tuple[list[int], ...], *, block_size: int, device: torch.device) -> PagedBatch:
    """The Triton kernels' view of the same sequences ``build_attention_group`` pads."""
    width = max(len(t) for t in block_tables)
    tables = [t + [0] * (width - len(t)) for t in block_tables]

    def as_int32(x) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int32, device=device)

    return PagedBatch(as_int32(query_starts), as_int32(query_lens), as_int32(context_lens), as_int32(tables),
                      block_size, max(query_lens), max(context_lens))


def build_attention_group(query_starts: tuple[int, ...], query_lens: tuple[int, ...],
                          context_lens: tuple[int, ...], block_tables: tuple[list[int], ...], *,
                          block_size: int, device: torch.device) -> AttentionGroup:
    """Index tensors for sequences whose new tokens sit at rows ``query_starts[i] ...`` of the flat
    batch and are the last ``query_lens[i]`` of ``context_lens[i]`` tokens in the cache."""
    q_len, k_len = max(query_lens), max(context_lens)
    width = -(-k_len // block_size)
    tables = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in block_tables])
    key_slots = (tables[:, :, None] * block_size + torch.arange(block_size)).flatten(1)[:, :k_len]
    qpos = torch.arange(q_len)
    lens = torch.tensor(query_lens)[:, None]
    query_valid = qpos[None, :] < lens
    query_index = torch.tensor(query_starts)[:, None] + torch.where(query_valid, qpos, 0)
    # absolute position of each query row; a key at position p is visible to queries at >= p
    abs_qpos = torch.tensor(context_lens)[:, None] - lens + qpos[None, :]
    mask = torch.arange(k_len)[None, None, :] <= abs_qpos[:, :, None]
    mask &= query_valid[:, :, None]
    mask[:, :, 0] = True  # padding rows attend to something harmless instead of producing NaN
    padded_rows = torch.nonzero(query_valid.flatten()).flatten()
    return AttentionGroup(query_index.to(device), key_slots.to(device), mask.to(device), padded_rows.to(device),
                          query_index.flatten()[padded_rows].to(device))


class Attention(nn.Module):
    """Writes this layer's new K/V into the paged cache, then attends over the cache: with the torch
    reference, or with the Triton kernels when ``meta.backend == "triton"``. The model runner binds
    ``k_cache``/``v_cache`` (``[slots, kv_heads, head_dim]``) at start."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if meta.backend == "triton":
            return self._forward_triton(q, k, v, meta)
        store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        for g in meta.groups:
            o = paged_attention(q, self.k_cache, self.v_cache, g.query_index, g.key_slots, g.mask, self.scale)
            out.index_copy_(0, g.out_rows, o.flatten(0, 1).index_select(0, g.padded_rows))
        return out

    def _forward_triton(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        # imported here: triton is optional, and only this backend needs it
        from minivllm.kernels import paged_attention as kernels
        from minivllm.kernels.store_kv import store_kv as triton_store_kv

        triton_store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        caches = (self.k_cache, self.v_cache)
        if (d := meta.decodes) is not None:
            kernels.paged_decode_attention(
                q, *caches, d.block_tables, d.context_lens, d.query_starts, self.scale,
                block_size=d.block_size, max_context_len=d.max_context_len, out=out)
        if (p := meta.prefills) is not None:
            kernels.paged_prefill_attention(
                q, *caches, p.block_tables, p.context_lens, p.query_starts, p.query_lens, self.scale,
                block_size=p.block_size, max_query_len=p.max_query_len, out=out)
        return out
