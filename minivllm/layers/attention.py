"""Attention over the paged KV cache, and the per-step metadata that drives it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minivllm.kernels.reference import paged_attention, store_kv


@dataclass
class AttentionGroup:
    """Sequences padded together for the torch reference attention (see ``paged_attention``).
    Decodes form one group (one query each) and prefill chunks another, so that a long prompt
    chunk does not pad hundreds of single-token decodes."""

    query_index: torch.Tensor  # [seqs, q_len] rows of the flat batch
    query_valid: torch.Tensor  # [seqs, q_len] False on padding
    key_slots: torch.Tensor  # [seqs, k_len]
    mask: torch.Tensor  # [seqs, q_len, k_len]


@dataclass
class AttentionMetadata:
    """What every attention layer needs to know about this step's flat batch of tokens."""

    slot_mapping: torch.Tensor  # [tokens] cache slot each new token's K/V is written to
    groups: list[AttentionGroup]


def build_attention_group(query_starts: list[int], query_lens: list[int], context_lens: list[int],
                          block_tables: list[list[int]], block_size: int,
                          device: torch.device) -> AttentionGroup:
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
    return AttentionGroup(query_index.to(device), query_valid.to(device), key_slots.to(device),
                          mask.to(device))


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
            out[g.query_index[g.query_valid]] = o[g.query_valid]
        return out
