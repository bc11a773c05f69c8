"""The Triton kernels against their torch references, on the CPU through the Triton interpreter.

Odd shapes on purpose: head sizes 64 and 128, cache blocks of 1, 16 and 32 tokens, ragged lengths,
block tables in shuffled order, GQA ratios 1, 4 and 8, chunks that start and end inside a block.
The references run in float32 on the same (rounded) inputs; a kernel's half-precision output may
differ by its own rounding: TOL below. The interpreter computes bfloat16 arithmetic wrongly, so the
kernels compute in float32 and only load and store bfloat16 (its float32 -> bfloat16 cast
truncates where a GPU rounds: one bfloat16 ulp, inside TOL).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit runs: the kernels then run on numpy

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from minivllm.kernels import reference  # noqa: E402
from minivllm.kernels.fused import rms_norm, rotary_embedding, silu_and_mul  # noqa: E402
from minivllm.kernels.paged_attention import (default_num_splits, paged_decode_attention,  # noqa: E402
                                              paged_prefill_attention)
from minivllm.kernels.store_kv import store_kv  # noqa: E402
from minivllm.layers.activation import SiluAndMul  # noqa: E402
from minivllm.layers.norm import RMSNorm  # noqa: E402
from minivllm.layers.rotary import RotaryEmbedding  # noqa: E402

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
KV_HEADS = 2


def paged_batch(context_lens, query_lens, *, head_dim, block_size, group, dtype, seed=0):
    """A random flat cache and queries: sequence ``s`` owns ``ceil(ctx/block_size)`` blocks taken in
    shuffled order from a pool with spare blocks; its queries sit behind one unused row of ``q``."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(need) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(need)
    tables, used = [], 0
    for n in need:
        tables.append(order[used:used + n] + [0] * (width - n))  # padded with block 0, as the engine does
        used += n
    k_cache = torch.randn(num_blocks * block_size, KV_HEADS, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, KV_HEADS, head_dim, generator=g).to(dtype)
    starts = (1 + torch.tensor([0] + list(query_lens[:-1])).cumsum(0)).tolist()
    q = torch.randn(1 + sum(query_lens), KV_HEADS * group, head_dim, generator=g).to(dtype)
    as_i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=as_i32(tables), context_lens=as_i32(context_lens),
                query_starts=as_i32(starts), query_lens=as_i32(query_lens))


def expected(b, scale, block_size):
    f32 = {k: b[k].float() for k in ("q", "k_cache", "v_cache")}
    return reference.varlen_paged_attention(**f32, block_tables=b["block_tables"], context_lens=b["context_lens"],
                                            query_starts=b["query_starts"], query_lens=b["query_lens"], scale=scale,
                                            block_size=block_size)


def rows_of(b):
    return torch.cat([torch.arange(s, s + n) for s, n in zip(b["query_starts"].tolist(), b["query_lens"].tolist())])


DECODE_CASES = [  # head_dim, block_size, group, dtype
    (64, 1, 1, torch.float32), (128, 16, 4, torch.float32), (64, 32, 8, torch.float32),
    (128, 1, 8, torch.float16), (64, 16, 1, torch.float16), (128, 32, 4, torch.bfloat16),
    (64, 16, 8, torch.bfloat16)]


@pytest.mark.parametrize("head_dim,block_size,group,dtype", DECODE_CASES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode(head_dim, block_size, group, dtype, num_splits):
    ctx = [1, 37, 5, 80, 16] if block_size > 1 else [1, 9, 20]
    b = paged_batch(ctx, [1] * len(ctx), head_dim=head_dim, block_size=block_size, group=group, dtype=dtype)
    scale = head_dim ** -0.5
    out = paged_decode_attention(b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["context_lens"],
                                 b["query_starts"], scale, block_size=block_size, max_context_len=max(ctx),
                                 num_splits=num_splits)
    rows = rows_of(b)
    torch.testing.assert_close(out[rows].float(), expected(b, scale, block_size)[rows], **TOL[dtype])


def test_split_decode_with_more_splits_than_a_short_context_fills():
    """Splits past a sequence's end are empty; the combination must weigh them zero, not NaN."""
    ctx = [3, 200]
    b = paged_batch(ctx, [1, 1], head_dim=64, block_size=16, group=4, dtype=torch.float32, seed=1)
    out = paged_decode_attention(b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["context_lens"],
                                 b["query_starts"], 0.125, block_size=16, max_context_len=200, num_splits=8)
    rows = rows_of(b)
    torch.testing.assert_close(out[rows], expected(b, 0.125, 16)[rows], **TOL[torch.float32])


def test_default_num_splits():
    assert default_num_splits(1, 8, 32768, num_sms=132) == 33  # one sequence: split to fill the GPU
    assert default_num_splits(256, 8, 32768, num_sms=132) == 1  # 2048 programs already
    assert default_num_splits(1, 8, 300, num_sms=132) == 1  # too short to be worth it
    assert default_num_splits(4, 8, 4096, num_sms=0) == 1  # the CPU


PREFILL_CASES = [  # head_dim, block_size, group, dtype, context lengths, new tokens per sequence
    # whole prompts
    (64, 16, 4, torch.float32, [40, 7, 17], [40, 7, 17]),
    # chunks after a cached prefix, starting and ending inside blocks (prefix caching, chunked prefill)
    (128, 16, 1, torch.float32, [45, 33, 70], [13, 33, 20]),
    (64, 1, 8, torch.float32, [21, 9], [5, 9]),
    (64, 32, 4, torch.float16, [50, 90, 31], [18, 1, 31]),
    (128, 16, 8, torch.float16, [60, 19], [27, 3]),
]


@pytest.mark.parametrize("head_dim,block_size,group,dtype,ctx,q_lens", PREFILL_CASES)
def test_paged_prefill(head_dim, block_size, group, dtype, ctx, q_lens):
    b = paged_batch(ctx, q_lens, head_dim=head_dim, block_size=block_size, group=group, dtype=dtype, seed=2)
    scale = head_dim ** -0.5
    out = paged_prefill_attention(b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["context_lens"],
                                  b["query_starts"], b["query_lens"], scale, block_size=block_size,
                                  max_query_len=max(q_lens), block_m=16, block_n=16)
    rows = rows_of(b)
    torch.testing.assert_close(out[rows].float(), expected(b, scale, block_size)[rows], **TOL[dtype])


def test_prefill_with_default_tiles_and_a_small_head():
    """The engine's tile sizes (64 x 64) and the tiny test model's head size 16."""
    b = paged_batch([100, 30], [70, 30], head_dim=16, block_size=16, group=2, dtype=torch.float32, seed=3)
    out = paged_prefill_attention(b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["context_lens"],
                                  b["query_starts"], b["query_lens"], 0.25, block_size=16, max_query_len=70)
    rows = rows_of(b)
    torch.testing.assert_close(out[rows], expected(b, 0.25, 16)[rows], **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_kv(dtype):
    g = torch.Generator().manual_seed(4)
    k_cache, v_cache = torch.zeros(2, 40, 4, 64, dtype=dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(40, generator=g)[:7]
    kv = torch.randn(7, 2, 4, 64, generator=g).to(dtype)
    key, value = kv[:, 0], kv[:, 1]  # strided views, as the engine's q/k/v split gives
    store_kv(key, value, k_cache, v_cache, slots)
    reference.store_kv(key, value, want_k, want_v, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96])
def test_rms_norm_with_and_without_residual(dtype, hidden):
    g = torch.Generator().manual_seed(5)
    norm = RMSNorm(hidden, eps=1e-6).to(dtype)
    norm.weight.copy_(torch.randn(hidden, generator=g))
    x = (3 * torch.randn(5, hidden, generator=g)).to(dtype)
    residual = torch.randn(5, hidden, generator=g).to(dtype)
    torch.testing.assert_close(rms_norm(x, norm.weight, norm.eps), norm(x), **TOL[dtype])
    got_out, got_res = rms_norm(x, norm.weight, norm.eps, residual)
    want_out, want_res = norm(x, residual)
    # x + residual is one rounding: exact, except that the interpreter casts to bfloat16 by truncation
    torch.testing.assert_close(got_res, want_res, **(TOL[dtype] if dtype == torch.bfloat16 else dict(atol=0, rtol=0)))
    torch.testing.assert_close(got_out, want_out, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_embedding(dtype, head_dim):
    g = torch.Generator().manual_seed(6)
    rope = RotaryEmbedding(head_dim, 512, {"rope_theta": 10000.0, "rope_type": "default"})
    positions = torch.tensor([0, 511, 3, 200, 17])
    qkv = torch.randn(5, 12, head_dim, generator=g).to(dtype)
    q, k = qkv[:, :8], qkv[:, 8:]  # 8 query heads and 4 KV heads, strided views of one projection
    got_q, got_k = rotary_embedding(positions, q, k, rope.cos_sin)
    want_q, want_k = rope(positions, q, k)
    torch.testing.assert_close(got_q, want_q, **TOL[dtype])
    torch.testing.assert_close(got_k, want_k, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_silu_and_mul(dtype):
    g = torch.Generator().manual_seed(7)
    x = (2 * torch.randn(3, 5, 2 * 200, generator=g)).to(dtype)
    torch.testing.assert_close(silu_and_mul(x, block=64), SiluAndMul()(x), **TOL[dtype])


def test_bad_input_is_refused():
    b = paged_batch([5], [1], head_dim=64, block_size=16, group=1, dtype=torch.float32)
    args = (b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["context_lens"], b["query_starts"], 0.125)
    with pytest.raises(ValueError, match="num_splits=0"):
        paged_decode_attention(*args, block_size=16, max_context_len=5, num_splits=0)
    with pytest.raises(ValueError, match="cache dtypes"):
        paged_decode_attention(b["q"].half(), *args[1:], block_size=16, max_context_len=5)
    with pytest.raises(ValueError, match="block_m=8"):
        paged_prefill_attention(*args[:6], b["query_lens"], 0.125, block_size=16, max_query_len=1, block_m=8)
    with pytest.raises(ValueError, match="slot_mapping.shape"):
        store_kv(b["k_cache"][:2], b["v_cache"][:2], b["k_cache"], b["v_cache"], torch.tensor([0]))


def test_benchmark_peaks_and_its_refusal_without_a_gpu():
    from minivllm.benchmarks.kernels import device_peaks, main

    assert device_peaks("NVIDIA H100 80GB HBM3") == (3350, 989)
    assert device_peaks("NVIDIA GH200 480GB") == (4000, 989)
    assert device_peaks("NVIDIA H100 PCIe") == (2000, 756)
    assert device_peaks("Some Future GPU") == (None, None)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            main([])
