"""Torch reference implementations of the paged-attention operations.

The KV cache of one layer is a flat array of slots, ``[num_blocks * block_size, kv_heads,
head_dim]``; slot ``block * block_size + offset`` holds one token's key (or value). A sequence's
keys are found through its block table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write each new token's K/V (``[tokens, kv_heads, head_dim]``) into its cache slot."""
    k_cache.index_copy_(0, slot_mapping, key)
    v_cache.index_copy_(0, slot_mapping, value)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_index: torch.Tensor, key_slots: torch.Tensor, mask: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Attention for a padded group of sequences, reading every key through the cache.

    q: ``[tokens, heads, head_dim]``, the flat batch; query_index: ``[seqs, q_len]`` rows of ``q``
    for each sequence (padding repeats a valid row); key_slots: ``[seqs, k_len]`` the cache slot of
    every context position; mask: ``[seqs, q_len, k_len]``, True where the query may attend
    (causal, within the context). Returns ``[seqs, q_len, heads, head_dim]``.

    Grouped-query attention: the ``heads // kv_heads`` query heads that share a KV head are folded
    into extra query rows, so the keys are read once per KV head and never repeated.
    """
    seqs, q_len = query_index.shape
    k_len = key_slots.shape[1]
    heads, d = q.shape[1:]
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    queries = q.index_select(0, query_index.flatten()).view(seqs, q_len, kv_heads, group, d)
    queries = queries.permute(0, 2, 1, 3, 4).reshape(seqs, kv_heads, q_len * group, d)
    keys = k_cache.index_select(0, key_slots.flatten()).view(seqs, k_len, kv_heads, d).transpose(1, 2)
    values = v_cache.index_select(0, key_slots.flatten()).view(seqs, k_len, kv_heads, d).transpose(1, 2)
    mask = mask.unsqueeze(2).expand(seqs, q_len, group, k_len).reshape(seqs, 1, q_len * group, k_len)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    return out.view(seqs, kv_heads, q_len, group, d).permute(0, 2, 1, 3, 4).reshape(seqs, q_len, heads, d)


def varlen_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, query_starts: torch.Tensor,
                           query_lens: torch.Tensor, scale: float, block_size: int) -> torch.Tensor:
    """The reference for the Triton kernels' batch layout, one sequence at a time: sequence ``s``'s new
    tokens are rows ``query_starts[s] ... + query_lens[s]`` of ``q``, the last of its ``context_lens[s]``
    tokens, whose K/V are found through ``block_tables[s]``. Returns ``q``-shaped output, those rows set,
    the others zero."""
    out = torch.zeros_like(q)
    for table, ctx, start, q_len in zip(block_tables.tolist(), context_lens.tolist(), query_starts.tolist(),
                                        query_lens.tolist()):
        positions = torch.arange(ctx)
        key_slots = torch.tensor(table)[positions // block_size] * block_size + positions % block_size
        rows = torch.arange(start, start + q_len)
        mask = positions[None, :] <= (ctx - q_len + torch.arange(q_len))[:, None]  # causal
        o = paged_attention(q, k_cache, v_cache, rows[None].to(q.device), key_slots[None].to(q.device),
                            mask[None].to(q.device), scale)
        out[rows.to(q.device)] = o[0]
    return out
