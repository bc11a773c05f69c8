"""Triton kernel writing each new token's K and V into its cache slot (``reference.store_kv``)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                     stride_k_tok, stride_k_head, stride_v_tok, stride_v_head, stride_c_slot, stride_c_head,
                     KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    # One program per token: its kv_heads * head_dim values, read once and written once.
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # a padding token (slot -1, as in vLLM) owns no slot
        return
    i = tl.arange(0, BLOCK)
    head, d = i // HEAD_DIM, i % HEAD_DIM
    mask = i < KV_HEADS * HEAD_DIM
    dst = slot * stride_c_slot + head * stride_c_head + d
    key = tl.load(key_ptr + token * stride_k_tok + head * stride_k_head + d, mask=mask)
    tl.store(k_cache_ptr + dst, key, mask=mask)
    value = tl.load(value_ptr + token * stride_v_tok + head * stride_v_head + d, mask=mask)
    tl.store(v_cache_ptr + dst, value, mask=mask)


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, dtype: torch.dtype) -> None:
    """The flat cache layout every kernel here assumes: ``[slots, kv_heads, head_dim]``, rows contiguous."""
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache.shape={tuple(k_cache.shape)} and v_cache.shape={tuple(v_cache.shape)} "
                         "must be the same [slots, kv_heads, head_dim]")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(2) != 1:
        raise ValueError(f"k_cache.stride()={k_cache.stride()} and v_cache.stride()={v_cache.stride()} must "
                         "match, head_dim contiguous")
    if k_cache.dtype != dtype or v_cache.dtype != dtype:
        raise ValueError(f"cache dtypes {k_cache.dtype}/{v_cache.dtype} differ from the inputs' {dtype}")


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write ``key``/``value`` (``[tokens, kv_heads, head_dim]``) into rows ``slot_mapping`` of the caches."""
    check_cache(k_cache, v_cache, key.dtype)
    for name, t in (("key", key), ("value", value)):
        if t.shape[1:] != k_cache.shape[1:] or t.stride(2) != 1:
            raise ValueError(f"{name}.shape={tuple(t.shape)} must be [tokens, {k_cache.shape[1]}, "
                             f"{k_cache.shape[2]}], head_dim contiguous")
    if value.shape != key.shape or value.dtype != key.dtype:
        raise ValueError(f"value ({tuple(value.shape)}, {value.dtype}) must match key "
                         f"({tuple(key.shape)}, {key.dtype})")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping.shape={tuple(slot_mapping.shape)} must be ({key.shape[0]},)")
    if key.shape[0] == 0:
        return
    kv_heads, head_dim = key.shape[1:]
    _store_kv_kernel[(key.shape[0],)](
        key, value, k_cache, v_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK=triton.next_power_of_2(kv_heads * head_dim))
