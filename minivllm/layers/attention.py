"""Attention over the paged KV cache, and the per-step metadata that drives it."""
from __future__ import annotations

from dataclasses import dataclass

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
class AttentionMetadata:
    """What every attention layer needs to know about this step's flat batch of tokens."""

    slot_mapping: torch.Tensor  # [tokens] cache slot each new token's K/V is written to
    groups: list[AttentionGroup]


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
    """Writes this layer's new K/V into the paged cache, then attends over the cache.
    The model runner binds ``k_cache``/``v_cache`` (``[slots, kv_heads, head_dim]``) at start."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        for g in meta.groups:
            o = paged_attention(q, self.k_cache, self.v_cache, g.query_index, g.key_slots, g.mask, self.scale)
            out.index_copy_(0, g.out_rows, o.flatten(0, 1).index_select(0, g.padded_rows))
        return out
