"""Triton kernels for the decoder's elementwise steps: RMSNorm fused with the residual add, rotary
embedding, SiLU-and-multiply. Each reads its input once and writes its output once, where the torch
versions make a pass (and a temporary) per operation.

Their references are the engine's torch layers, ``minivllm.layers`` ``RMSNorm``, ``RotaryEmbedding``
and ``SiluAndMul``: the kernels compute in float32 and round where those layers round, so the two
agree to the last bit or nearly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(out_ptr, residual_out_ptr, x_ptr, residual_ptr, weight_ptr, stride_x, stride_r, n, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < n
    x = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + c, mask=mask, other=0.0).to(tl.float32))
        x = x.to(residual_out_ptr.dtype.element_ty)  # the sum is rounded to the model dtype, as in torch
        tl.store(residual_out_ptr + row * n + c, x, mask=mask)
    xf = x.to(tl.float32)
    normed = xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
    weight = tl.load(weight_ptr + c, mask=mask, other=0.0).to(tl.float32)
    y = normed.to(out_ptr.dtype.element_ty).to(tl.float32) * weight
    tl.store(out_ptr + row * n + c, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """``RMSNorm(x)`` over the last dimension; with ``residual``, ``(RMSNorm(x + residual), x + residual)``."""
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight.shape={tuple(weight.shape)} must be ({n},)")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual ({tuple(residual.shape)}, {residual.dtype}) must match x "
                         f"({tuple(x.shape)}, {x.dtype})")
    if not eps > 0:
        raise ValueError(f"eps={eps!r} must be > 0")
    rows = _rows(x, n)
    res_rows = rows if residual is None else _rows(residual, n)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out) if residual is not None else out
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](out, residual_out, rows, res_rows, weight, rows.stride(0),
                                           res_rows.stride(0), n, eps, HAS_RESIDUAL=residual is not None,
                                           BLOCK=triton.next_power_of_2(n))
    return out if residual is None else (out, residual_out)


@triton.jit
def _rotary_kernel(out_ptr, x_ptr, positions_ptr, cos_sin_ptr, stride_x_tok, stride_x_head, stride_cs, heads,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # One program per token, all its heads: x1, x2 (the two halves) -> x1 cos - x2 sin, x2 cos + x1 sin.
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    mask = (h < heads)[:, None] & (j < HALF)[None, :]
    cos = tl.load(cos_sin_ptr + pos * stride_cs + j, mask=j < HALF, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + j, mask=j < HALF, other=0.0)[None, :]
    src = x_ptr + token * stride_x_tok + h[:, None] * stride_x_head + j[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + token * heads * 2 * HALF + h[:, None] * 2 * HALF + j[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor):
    """Rotate ``q`` ``[tokens, heads, head_dim]`` and ``k`` ``[tokens, kv_heads, head_dim]`` (half-split
    "neox" layout) by their positions; ``cos_sin`` is ``RotaryEmbedding.cos_sin``, ``[max_pos, head_dim]``
    (cos half, then sin half, float32). Returns new tensors."""
    head_dim = q.shape[-1]
    if cos_sin.dim() != 2 or cos_sin.shape[1] != head_dim or cos_sin.dtype != torch.float32 or cos_sin.stride(1) != 1:
        raise ValueError(f"cos_sin ({tuple(cos_sin.shape)}, {cos_sin.dtype}) must be float32 [max_pos, {head_dim}]")
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even")
    outs = []
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 3 or x.shape[0] != positions.shape[0] or x.shape[2] != head_dim or x.stride(2) != 1:
            raise ValueError(f"{name}.shape={tuple(x.shape)} must be [{positions.shape[0]}, heads, {head_dim}], "
                             "head_dim contiguous")
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if x.shape[0]:
            _rotary_kernel[(x.shape[0],)](out, x, positions, cos_sin, x.stride(0), x.stride(1), cos_sin.stride(0),
                                          x.shape[1], HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(x.shape[1]),
                                          BLOCK_HALF=triton.next_power_of_2(head_dim // 2))
        outs.append(out)
    return outs[0], outs[1]


@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, stride_x, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < n
    gate = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n + c, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded as F.silu's
    tl.store(out_ptr + row * n + c, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``[..., 2 * d]`` (gate, up) -> ``silu(gate) * up``, ``[..., d]``."""
    if x.shape[-1] % 2:
        raise ValueError(f"x.shape={tuple(x.shape)}: the last dimension must be even (gate and up halves)")
    n = x.shape[-1] // 2
    rows = _rows(x, 2 * n)
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if rows.shape[0] and n:
        block = min(block, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(n, block))](out, rows, rows.stride(0), n, BLOCK=block)
    return out


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` as ``[rows, n]`` with contiguous rows (the kernels index a row as ``start + column``)."""
    rows = x.reshape(-1, n)
    return rows if rows.stride(1) == 1 else rows.contiguous()
