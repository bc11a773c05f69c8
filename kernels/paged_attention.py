"""Triton attention over the paged KV cache: decode (with a split-KV, "flash-decoding" variant) and
prefill/extend (variable-length causal attention for new tokens, reading any cached prefix).

Both kernels find a context position ``p`` of sequence ``s`` through the block table:
``slot = block_tables[s, p // block_size] * block_size + p % block_size``, one row of the flat cache
``[slots, kv_heads, head_dim]`` (the layout of ``reference.py``). They walk the context in tiles of
``BLOCK_N`` positions with an online softmax (running max ``m``, running sum ``l``, accumulator
``acc``), so no ``[queries, context]`` score matrix is ever materialised.

A batch is described per sequence: its new tokens are rows ``query_starts[s] ... + query_lens[s]``
of ``q`` and ``out``, and are the last ``query_lens[s]`` of its ``context_lens[s]`` tokens, whose K/V
are already in the cache (the engine stores them first). Decode is the case ``query_lens == 1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minivllm.kernels.store_kv import check_cache


@triton.jit
def _decode_kernel(out_ptr, part_out_ptr, part_lse_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                   query_starts_ptr, context_lens_ptr, scale, tokens_per_split,
                   stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_kv_slot, stride_kv_head,
                   stride_bt, num_heads, num_splits,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    # One program: one sequence, one KV head (its GROUP query heads together, so each key is read
    # once), one split of the context. Decode is memory-bound: the dot products are plain
    # multiply-and-sum in float32, which also keeps bfloat16 exact in the interpreter.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    row = tl.load(query_starts_ptr + seq).to(tl.int64)
    lo = split * tokens_per_split
    hi = tl.minimum(ctx, lo + tokens_per_split)

    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    head = kv_head * GROUP + h
    hd_mask = (h < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + row * stride_q_tok + head[:, None] * stride_q_head + d[None, :], mask=hd_mask, other=0.0)
    q = q.to(tl.float32) * scale

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi
        block = tl.load(block_tables_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_offsets = slot[:, None] * stride_kv_slot + kv_head * stride_kv_head + d[None, :]
        kv_mask = valid[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [BLOCK_H, BLOCK_N]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: every tile has a valid position
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new

    if SPLIT:
        # Partial result of this split, normalised, and its log-sum-exp; an empty split (context
        # shorter than this split's start) writes lse = -inf, which the reduction weighs as zero.
        has_keys = l > 0
        part = (seq * num_heads + head) * num_splits + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :],
                 tl.where(has_keys[:, None], acc / tl.where(has_keys, l, 1.0)[:, None], 0.0), mask=hd_mask)
        tl.store(part_lse_ptr + part, tl.where(has_keys, m + tl.log(tl.where(has_keys, l, 1.0)), float("-inf")),
                 mask=h < GROUP)
    else:
        out = acc / l[:, None]
        tl.store(out_ptr + row * stride_o_tok + head[:, None] * stride_o_head + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=hd_mask)


@triton.jit
def _combine_splits_kernel(out_ptr, part_out_ptr, part_lse_ptr, query_starts_ptr, stride_o_tok, stride_o_head,
                           num_heads, num_splits,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    # out = sum_s exp(lse_s - LSE) * out_s, the exact softmax over the whole context.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    part = (seq * num_heads + head) * num_splits + s
    lse = tl.load(part_lse_ptr + part, mask=s < num_splits, other=float("-inf"))
    weights = tl.exp(lse - tl.max(lse, axis=0))
    weights = weights / tl.sum(weights, axis=0)
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :],
                    mask=(s < num_splits)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(weights[:, None] * parts, axis=0)
    row = tl.load(query_starts_ptr + seq).to(tl.int64)
    tl.store(out_ptr + row * stride_o_tok + head * stride_o_head + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


@triton.jit
def _prefill_kernel(out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_starts_ptr, query_lens_ptr,
                    context_lens_ptr, scale,
                    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_kv_slot, stride_kv_head,
                    stride_bt,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE_FP32: tl.constexpr):
    # One program: BLOCK_M new tokens of one sequence, one query head. Prefill is compute-bound,
    # so the scores and the weighted values go through tl.dot (tensor cores on a GPU).
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    q_len = tl.load(query_lens_ptr + seq)
    if tile * BLOCK_M >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq)
    q_start = tl.load(query_starts_ptr + seq).to(tl.int64)
    kv_head = head // GROUP

    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    q_pos = ctx - q_len + i  # absolute positions; rows past q_len see the whole context (no NaN)
    d = tl.arange(0, BLOCK_D)
    qd_mask = (i < q_len)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + (q_start + i)[:, None] * stride_q_tok + head * stride_q_head + d[None, :], mask=qd_mask,
                other=0.0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(ctx, ctx - q_len + (tile + 1) * BLOCK_M)  # causal: no key past this tile's last query
    for start in range(0, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi
        block = tl.load(block_tables_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_offsets = slot[:, None] * stride_kv_slot + kv_head * stride_kv_head + d[None, :]
        kv_mask = valid[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        if IEEE_FP32:  # float32 in, float32 out, as the torch reference (no TF32 rounding)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        visible = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: position 0 is in the first tile
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        if IEEE_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + (q_start + i)[:, None] * stride_o_tok + head * stride_o_head + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=qd_mask)


def default_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int,
                       min_tokens_per_split: int = 256) -> int:
    """Enough splits that the decode grid fills the GPU about twice over, each split keeping at least
    ``min_tokens_per_split`` positions (shorter ones cost more to combine than they save)."""
    wanted = -(-2 * num_sms // (num_seqs * num_kv_heads))
    return max(1, min(wanted, max_context_len // min_tokens_per_split))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, query_starts: torch.Tensor,
                           scale: float, *, block_size: int, max_context_len: int, num_splits: int | None = None,
                           out: torch.Tensor | None = None, block_n: int = 16) -> torch.Tensor:
    """Attention of one new query per sequence (row ``query_starts[s]`` of ``q``, ``[tokens, heads,
    head_dim]``) over its ``context_lens[s]`` cached tokens. ``num_splits > 1`` cuts each context
    into that many parts run in parallel and combined after (flash-decoding); ``None`` picks it from
    the GPU's size (1 on the CPU). Writes rows ``query_starts`` of ``out`` (new if not given)."""
    num_seqs = _check_batch(q, k_cache, v_cache, block_tables, context_lens, query_starts, block_size)
    if num_splits is None:
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 0
        num_splits = default_num_splits(num_seqs, k_cache.shape[1], max_context_len, num_sms)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits={num_splits!r} must be an int >= 1")
    _check_pow2("block_n", block_n)
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    heads, head_dim = q.shape[1:]
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    tokens_per_split = -(-max(max_context_len, 1) // num_splits)
    split = num_splits > 1
    if split:
        part_out = torch.empty(num_seqs, heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    block_d = triton.next_power_of_2(head_dim)
    _decode_kernel[(num_seqs, kv_heads, num_splits)](
        out, part_out, part_lse, q, k_cache, v_cache, block_tables, query_starts, context_lens, scale,
        tokens_per_split, q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0),
        k_cache.stride(1), block_tables.stride(0), heads, num_splits,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_H=triton.next_power_of_2(group),
        BLOCK_D=block_d, BLOCK_N=block_n, SPLIT=split)
    if split:
        _combine_splits_kernel[(num_seqs, heads)](
            out, part_out, part_lse, query_starts, out.stride(0), out.stride(1), heads, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits))
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, query_starts: torch.Tensor,
                            query_lens: torch.Tensor, scale: float, *, block_size: int, max_query_len: int,
                            out: torch.Tensor | None = None, block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """Causal attention for ``query_lens[s]`` new tokens of each sequence (rows ``query_starts[s] ...``
    of ``q``) over its whole context, cached prefix included (chunked prefill, prefix-cache hits).
    Writes those rows of ``out`` (new if not given)."""
    num_seqs = _check_batch(q, k_cache, v_cache, block_tables, context_lens, query_starts, block_size)
    if query_lens.shape != (num_seqs,):
        raise ValueError(f"query_lens.shape={tuple(query_lens.shape)} must be ({num_seqs},)")
    if isinstance(max_query_len, bool) or not isinstance(max_query_len, int) or max_query_len < 1:
        raise ValueError(f"max_query_len={max_query_len!r} must be an int >= 1")
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        _check_pow2(name, value)
        if value < 16:
            raise ValueError(f"{name}={value} must be >= 16 (tl.dot's smallest tile)")
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    heads, head_dim = q.shape[1:]
    grid = (num_seqs, triton.cdiv(max_query_len, block_m), heads)
    _prefill_kernel[grid](
        out, q, k_cache, v_cache, block_tables, query_starts, query_lens, context_lens, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        block_tables.stride(0),
        GROUP=heads // k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=block_n, IEEE_FP32=q.dtype == torch.float32)
    return out


def _check_batch(q, k_cache, v_cache, block_tables, context_lens, query_starts, block_size) -> int:
    check_cache(k_cache, v_cache, q.dtype)
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"q.shape={tuple(q.shape)} must be [tokens, heads, head_dim], head_dim contiguous")
    if q.shape[2] != k_cache.shape[2]:
        raise ValueError(f"q head_dim={q.shape[2]} differs from the cache's head_dim={k_cache.shape[2]}")
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"q heads={q.shape[1]} is not a multiple of the cache's kv_heads={k_cache.shape[1]}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be an int >= 1")
    num_seqs = context_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables.shape={tuple(block_tables.shape)} must be [{num_seqs}, max_blocks], "
                         "rows contiguous")
    if query_starts.shape != (num_seqs,):
        raise ValueError(f"query_starts.shape={tuple(query_starts.shape)} must be ({num_seqs},)")
    return num_seqs


def _check_pow2(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{name}={value!r} must be a power of two")
