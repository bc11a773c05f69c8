"""The Triton kernels on a GPU at realistic shapes, against the torch reference the engine runs
otherwise.

Shapes follow Qwen3-8B's attention (32 query heads, 8 KV heads, head size 128, hidden 4096, MLP
12288) in bfloat16, KV blocks of 16 tokens with shuffled block tables. For every case it prints the
kernel's time (CUDA events, median over repetitions, L2 flushed between them), the bytes it must
move and the bandwidth that gives as a fraction of the device's peak (memory-bound kernels), or
TFLOP/s as a fraction of the dense bf16 peak (prefill), the torch reference's time and the speed-up
over it, and the largest difference from the reference (a first check that the kernel is right on
this GPU). The decode kernel runs twice: one program per (sequence, KV head), and split-KV. Shapes
whose inputs exceed 45 % of the free GPU memory are skipped, and the torch reference where its
gathered copy of the cache would not fit.

    python -m minivllm.benchmarks.kernels [--quick] [--reps 20] [--peak-gbps N] [--peak-tflops N]
    TRITON_INTERPRET=1 python -m minivllm.benchmarks.kernels --smoke   # tiny shapes, CPU, interpreter

``--smoke`` checks the script itself without a GPU (its times are the interpreter's, meaningless).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

# (name fragment as torch.cuda.get_device_name reports it, HBM GB/s, dense bf16 TFLOP/s); first match wins
DEVICE_PEAKS = [
    ("GH200", 4000, 989), ("H200", 4800, 989), ("H100 NVL", 3900, 835), ("H100 PCIe", 2000, 756),
    ("H100", 3350, 989), ("H800", 3350, 989), ("B200", 8000, 2250), ("A100-SXM4-80GB", 2039, 312),
    ("A100 80GB PCIe", 1935, 312), ("A100", 1555, 312), ("L40S", 864, 362), ("L40", 864, 181), ("L4", 300, 121),
    ("A10G", 600, 70), ("A10", 600, 125), ("RTX 4090", 1008, 165), ("RTX 3090", 936, 71), ("T4", 320, 65),
]


def device_peaks(name: str) -> tuple[float | None, float | None]:
    """(GB/s, bf16 TFLOP/s) of a device by its name, or (None, None) when not in ``DEVICE_PEAKS``."""
    for fragment, gbps, tflops in DEVICE_PEAKS:
        if fragment in name:
            return gbps, tflops
    return None, None


Fn = Callable[[], torch.Tensor]


@dataclass
class Case:
    """One kernel at one shape. ``build`` makes the inputs and returns (kernel call, reference call or
    None where the reference would not fit in memory): the inputs live only while the case runs."""

    kernel: str
    shape: str
    bytes_moved: int  # what the kernel must read and write at least
    flops: int  # 0 where the kernel is memory-bound
    build: Callable[[], tuple[Fn, Fn | None]]


@dataclass(frozen=True)
class Shapes:
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    hidden: int = 4096
    intermediate: int = 12288
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16


def _paged_cache(batch: int, ctx: int, s: Shapes, device, g: torch.Generator):
    """A cache holding ``batch`` contexts of ``ctx`` tokens in shuffled blocks, and their block tables."""
    per_seq = -(-ctx // s.block_size)
    num_blocks = batch * per_seq
    k_cache = torch.randn(num_blocks * s.block_size, s.kv_heads, s.head_dim, generator=g, device=device,
                          dtype=s.dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, generator=g, device=device).view(batch, per_seq).to(torch.int32)
    return k_cache, v_cache, tables


def decode_cases(batches, contexts, s: Shapes, device, memory_budget: int) -> list[Case]:
    from minivllm.kernels.paged_attention import paged_decode_attention
    from minivllm.kernels.reference import paged_attention
    from minivllm.layers.attention import build_attention_group

    scale = s.head_dim ** -0.5

    def build(batch: int, ctx: int, num_splits: int | None, with_reference: bool):
        g = torch.Generator(device).manual_seed(0)
        k_cache, v_cache, tables = _paged_cache(batch, ctx, s, device, g)
        q = torch.randn(batch, s.heads, s.head_dim, generator=g, device=device, dtype=s.dtype)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        starts = torch.arange(batch, dtype=torch.int32, device=device)

        def run():
            return paged_decode_attention(q, k_cache, v_cache, tables, lens, starts, scale, block_size=s.block_size,
                                          max_context_len=ctx, num_splits=num_splits)

        if not with_reference:
            return run, None
        group = build_attention_group(tuple(range(batch)), (1,) * batch, (ctx,) * batch, tuple(tables.tolist()),
                                      block_size=s.block_size, device=device)

        def reference():
            return paged_attention(q, k_cache, v_cache, group.query_index, group.key_slots, group.mask, scale)[:, 0]

        return run, reference

    cases = []
    for ctx in contexts:
        for batch in batches:
            kv_bytes = 2 * batch * ctx * s.kv_heads * s.head_dim * s.dtype.itemsize
            if kv_bytes > memory_budget:
                continue
            moved = kv_bytes + 2 * batch * s.heads * s.head_dim * s.dtype.itemsize + batch * -(-ctx // s.block_size) * 4
            with_reference = 2 * kv_bytes <= memory_budget  # the reference gathers every key and value again
            for splits, label in ((1, "decode"), (None, "decode split-KV")):
                cases.append(Case(label, f"batch {batch}, context {ctx}", moved, 0,
                                  lambda b=batch, c=ctx, sp=splits, r=with_reference: build(b, c, sp, r)))
    return cases


def prefill_cases(workloads, s: Shapes, device, memory_budget: int) -> list[Case]:
    """``workloads``: (sequences, new tokens each, cached prefix each)."""
    from minivllm.kernels.paged_attention import paged_prefill_attention
    from minivllm.kernels.reference import paged_attention
    from minivllm.layers.attention import build_attention_group

    scale = s.head_dim ** -0.5

    def build(seqs: int, new: int, prefix: int, with_reference: bool):
        g = torch.Generator(device).manual_seed(1)
        ctx = prefix + new
        k_cache, v_cache, tables = _paged_cache(seqs, ctx, s, device, g)
        q = torch.randn(seqs * new, s.heads, s.head_dim, generator=g, device=device, dtype=s.dtype)
        starts = torch.arange(0, seqs * new, new, dtype=torch.int32, device=device)
        q_lens = torch.full((seqs,), new, dtype=torch.int32, device=device)
        ctx_lens = torch.full((seqs,), ctx, dtype=torch.int32, device=device)

        def run():
            return paged_prefill_attention(q, k_cache, v_cache, tables, ctx_lens, starts, q_lens, scale,
                                           block_size=s.block_size, max_query_len=new)

        if not with_reference:
            return run, None
        group = build_attention_group(tuple(starts.tolist()), (new,) * seqs, (ctx,) * seqs, tuple(tables.tolist()),
                                      block_size=s.block_size, device=device)

        def reference():
            o = paged_attention(q, k_cache, v_cache, group.query_index, group.key_slots, group.mask, scale)
            return o.flatten(0, 1).index_select(0, group.padded_rows)

        return run, reference

    cases = []
    for seqs, new, prefix in workloads:
        ctx = prefix + new
        # causal: query i of a chunk sees prefix + i + 1 keys; QK^T and PV, 2 FLOPs per multiply-add each
        flops = 4 * seqs * (new * prefix + new * (new + 1) // 2) * s.heads * s.head_dim
        moved = (2 * seqs * ctx * s.kv_heads + 2 * seqs * new * s.heads) * s.head_dim * s.dtype.itemsize
        scores = seqs * new * ctx * (1 + 4 * s.heads)  # the reference's boolean mask and float32 scores
        with_reference = scores + 2 * moved <= memory_budget
        cases.append(Case("prefill" if prefix == 0 else "extend", f"{seqs} x {new} new tokens after {prefix} cached",
                          moved, flops, lambda a=seqs, n=new, p=prefix, r=with_reference: build(a, n, p, r)))
    return cases


def elementwise_cases(token_counts, s: Shapes, device) -> list[Case]:
    from minivllm.kernels import reference as ref
    from minivllm.kernels.fused import rms_norm, rotary_embedding, silu_and_mul
    from minivllm.kernels.store_kv import store_kv
    from minivllm.layers.activation import SiluAndMul
    from minivllm.layers.norm import RMSNorm
    from minivllm.layers.rotary import RotaryEmbedding

    item = s.dtype.itemsize

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=s.dtype)

    def build_store(t: int):
        kv, caches = randn(t, 2, s.kv_heads, s.head_dim), randn(2, 2 * t, s.kv_heads, s.head_dim)
        ref_caches = caches.clone()
        slots = torch.randperm(2 * t, device=device)[:t]

        def run():
            store_kv(kv[:, 0], kv[:, 1], caches[0], caches[1], slots)
            return caches

        def reference():
            ref.store_kv(kv[:, 0], kv[:, 1], ref_caches[0], ref_caches[1], slots)
            return ref_caches

        return run, reference

    def build_norm(t: int):
        norm = RMSNorm(s.hidden).to(device=device, dtype=s.dtype)
        x, residual = randn(t, s.hidden), randn(t, s.hidden)
        return (lambda: rms_norm(x, norm.weight, norm.eps, residual)[0]), (lambda: norm(x, residual)[0])

    def build_rotary(t: int):
        rope = RotaryEmbedding(s.head_dim, 32768, {"rope_theta": 1e6, "rope_type": "default"}).to(device)
        qk = randn(t, s.heads + s.kv_heads, s.head_dim)  # q and k: views of one projection, as in the model
        q, k = qk[:, :s.heads], qk[:, s.heads:]
        positions = torch.randint(0, 32768, (t,), device=device)
        return (lambda: rotary_embedding(positions, q, k, rope.cos_sin)[0]), (lambda: rope(positions, q, k)[0])

    def build_silu(t: int):
        gate_up = randn(t, 2 * s.intermediate)
        return (lambda: silu_and_mul(gate_up)), (lambda: SiluAndMul()(gate_up))

    cases = []
    for t in token_counts:
        heads = s.heads + s.kv_heads
        cases += [
            Case("store K/V", f"{t} tokens", 4 * t * s.kv_heads * s.head_dim * item + 8 * t, 0,
                 lambda t=t: build_store(t)),
            Case("add + RMSNorm", f"{t} x {s.hidden}", 4 * t * s.hidden * item, 0, lambda t=t: build_norm(t)),
            Case("rotary", f"{t} tokens x {heads} heads", 2 * t * heads * s.head_dim * item, 0,
                 lambda t=t: build_rotary(t)),
            Case("SiLU and mul", f"{t} x {s.intermediate}", 3 * t * s.intermediate * item, 0,
                 lambda t=t: build_silu(t)),
        ]
    return cases


def cuda_time(fn: Callable[[], object], reps: int, flush: torch.Tensor) -> float:
    """Median seconds of ``fn`` over ``reps`` runs, each after overwriting a buffer larger than L2."""
    fn()  # compile / warm up
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def wall_time(fn: Callable[[], object], reps: int, flush: torch.Tensor | None = None) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def run_cases(cases: list[Case], timer, reps: int, peak_gbps: float | None, peak_tflops: float | None,
              flush: torch.Tensor | None) -> list[str]:
    """Run every case; print (as each is measured) and return the markdown table."""
    rows = ["| kernel | shape | time (us) | GB/s | % of peak BW | TFLOP/s | % of peak bf16 | torch ref (us) "
            "| speed-up | max abs diff |", "|" + "---|" * 10]
    print("\n".join(rows), flush=True)
    for c in cases:
        run, reference = c.build()
        t = timer(run, reps, flush)
        gbps = c.bytes_moved / t / 1e9
        tflops = c.flops / t / 1e12 if c.flops else None
        ref_t = diff = None
        if reference is not None:
            diff = (run().float() - reference().float()).abs().max().item()
            ref_t = timer(reference, reps, flush)
        del run, reference
        rows.append(" | ".join([
            f"| {c.kernel}", c.shape, f"{t * 1e6:.1f}", f"{gbps:.0f}",
            f"{100 * gbps / peak_gbps:.0f} %" if peak_gbps and not c.flops else "",
            f"{tflops:.1f}" if tflops else "", f"{100 * tflops / peak_tflops:.0f} %" if tflops and peak_tflops else "",
            f"{ref_t * 1e6:.1f}" if ref_t else "n/a (memory)", f"{ref_t / t:.2f}x" if ref_t else "",
            f"{diff:.2e} |" if diff is not None else "|"]))
        print(rows[-1], flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # this case's inputs, before the next case allocates its own
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes (a couple of minutes)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, in the Triton interpreter")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--peak-gbps", type=float, help="the device's HBM bandwidth, if not in the table")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 TFLOP/s, if not in the table")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps={args.reps} must be >= 1")
    try:
        import triton
    except ImportError:
        sys.exit("The kernel benchmark needs triton (pip install triton; the CUDA build of torch brings it).")

    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke runs in the Triton interpreter: set TRITON_INTERPRET=1")
        device, timer, flush = torch.device("cpu"), wall_time, None
        shapes = Shapes(heads=4, kv_heads=2, head_dim=64, hidden=128, intermediate=96, dtype=torch.float32)
        batches, contexts, workloads, tokens = [1, 3], [40], [(2, 20, 0), (1, 9, 30)], [5]
        name, peak_gbps, peak_tflops = "CPU (Triton interpreter; times are not GPU timings)", None, None
        budget = 1 << 30
        args.reps = 1
    else:
        if not torch.cuda.is_available():
            sys.exit("The kernel benchmark needs a CUDA GPU (this torch sees none). To check the script "
                     "itself on the CPU: TRITON_INTERPRET=1 python -m minivllm.benchmarks.kernels --smoke")
        device, timer = torch.device("cuda"), cuda_time
        flush = torch.empty(256 << 20, dtype=torch.int8, device=device)
        shapes = Shapes()
        name = torch.cuda.get_device_name(device)
        peak_gbps, peak_tflops = device_peaks(name)
        peak_gbps, peak_tflops = args.peak_gbps or peak_gbps, args.peak_tflops or peak_tflops
        budget = int(0.45 * torch.cuda.mem_get_info(device)[0])  # a case's inputs; shapes beyond are skipped
        if args.quick:
            batches, contexts, tokens = [1, 64, 256], [512, 8192, 32768], [4096]
            workloads = [(1, 4096, 0), (4, 512, 8192)]
        else:
            batches, contexts, tokens = [1, 8, 32, 64, 128, 256], [512, 2048, 8192, 32768], [256, 4096, 16384]
            workloads = [(1, 2048, 0), (1, 8192, 0), (8, 1024, 0), (4, 512, 8192), (1, 2048, 30720)]
    print(f"Device: {name}; peak {peak_gbps or '?'} GB/s, {peak_tflops or '?'} bf16 TFLOP/s; "
          f"heads {shapes.heads}/{shapes.kv_heads}, head size {shapes.head_dim}, {shapes.dtype}, "
          f"block size {shapes.block_size}; torch {torch.__version__}, triton {triton.__version__}")
    cases = (decode_cases(batches, contexts, shapes, device, budget)
             + prefill_cases(workloads, shapes, device, budget) + elementwise_cases(tokens, shapes, device))
    run_cases(cases, timer, args.reps, peak_gbps, peak_tflops, flush)


if __name__ == "__main__":
    main()
