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
    """
    queries = q[query_index].transpose(1, 2)  # [seqs, heads, q_len, d]
    keys = k_cache[key_slots].transpose(1, 2)  # [seqs, kv_heads, k_len, d]
    values = v_cache[key_slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask.unsqueeze(1),
                                         scale=scale, enable_gqa=True)
    return out.transpose(1, 2)
