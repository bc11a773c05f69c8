"""The check of exercise 06: the paged decode kernel."""
from __future__ import annotations

from typing import Callable

import torch

from minivllm.course.checks.base import CheckFailed, CheckResult, is_not_implemented, run_stages

DecodeFn = Callable[..., torch.Tensor]

# (what the case is, context lengths, query heads per KV head, head size, block size, query scale);
# none is the exercise notebook's own example. The last one's scores come near 100: exp() of them
# overflows float32 unless the running maximum is subtracted.
DECODE_CASES = [
    ("one sequence of 11 tokens in blocks of 16, 1 query head per KV head", [11], 1, 16, 16, 1.0),
    ("one sequence of 50 tokens over 4 blocks of 16 in shuffled order", [50], 2, 32, 16, 1.0),
    ("5 sequences of ragged lengths, 4 query heads per KV head, blocks of 16", [1, 33, 100, 7, 16], 4, 32, 16, 1.0),
    ("3 sequences, 8 query heads per KV head, blocks of 1 token", [3, 20, 9], 8, 16, 1, 1.0),
    ("2 sequences in blocks of 32, head size 64, scores near 100", [70, 31], 2, 64, 32, 40.0),
]


def _decode_device() -> torch.device:
    """Where the learner's Triton kernel runs: the CPU in the interpreter, else the GPU."""
    import os

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return torch.device("cpu" if interpret or not torch.cuda.is_available() else "cuda")


def _stage_decode_case(decode: DecodeFn, case: tuple, seed: int) -> str:
    from minivllm.kernels.reference import varlen_paged_attention

    what, context_lens, group, head_dim, block_size, q_scale = case
    kv_heads, device = 2, _decode_device()
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(need) + 2  # two spare blocks of noise that no table points to
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in need:
        tables.append(order[used:used + n] + [order[-1]] * (max(need) - n))  # padded with a noise block
        used += n
    k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=g)
    q = q_scale * torch.randn(len(context_lens), kv_heads * group, head_dim, generator=g)
    block_tables = torch.tensor(tables, dtype=torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    scale = head_dim ** -0.5
    ones = torch.ones(len(context_lens), dtype=torch.int32)
    want = varlen_paged_attention(q, k_cache, v_cache, block_tables, lens, torch.arange(len(context_lens)),
                                  ones, scale, block_size)
    args = [t.to(device) for t in (q, k_cache, v_cache, block_tables, lens)]
    try:
        got = decode(*args, scale, block_size)
    except Exception as e:  # the learner's bug is the finding, not a crash of the check
        if is_not_implemented(e):
            raise CheckFailed("your kernel raised NotImplementedError: replace `# YOUR CODE HERE` and "
                              "`raise NotImplementedError` with the loop body") from None
        raise CheckFailed(f"{what}: your kernel raised {type(e).__name__}: {e}") from None
    if not isinstance(got, torch.Tensor) or got.shape != q.shape:
        shape = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise CheckFailed(f"{what}: the output is {shape}, expected {list(q.shape)} [sequences, heads, head size]")
    got = got.float().cpu()
    bad = ~torch.isclose(got, want, atol=1e-4, rtol=1e-4)
    if bad.any():
        s, h, d = bad.nonzero()[0].tolist()
        hint = (" (not a number: exp() of a large score overflowed; subtract the running maximum)"
                if not torch.isfinite(got[s, h]).all() else "")
        raise CheckFailed(f"{what}: sequence {s} (context {context_lens[s]}), query head {h}: output[{d}] is "
                          f"{got[s, h, d].item():.5f}, the reference gives {want[s, h, d].item():.5f}{hint}")
    return f"{what}: matches the reference"


def check_paged_decode(decode: DecodeFn, *, verbose: bool = True) -> CheckResult:
    """Exercise 06: ``decode(q, k_cache, v_cache, block_tables, context_lens, scale, block_size)``
    returns the attention of each sequence's one query (``q``: ``[seqs, heads, head_dim]``) over its
    ``context_lens[s]`` cached tokens (``k_cache``/``v_cache``: ``[slots, kv_heads, head_dim]``), found
    through ``block_tables[s]``. Each stage is a shape the notebook does not use, checked against
    `minivllm.kernels.reference.varlen_paged_attention` (float32, tolerance 1e-4)."""
    return run_stages("check_paged_decode", [lambda c=c, i=i: _stage_decode_case(decode, c, seed=100 + i)
                                       for i, c in enumerate(DECODE_CASES)], verbose)
