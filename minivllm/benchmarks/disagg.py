"""Disaggregated prefill/decode on the course target model: one `LLM` against a prefill and a decode
instance (`minivllm.disagg.DisaggregatedLLM`), on the same requests, side by side.

It checks that the greedy outputs are equal, then prints each K/V transfer (prompt tokens, positions
sent, decode-side blocks, bytes against the formula 2 x layers x KV heads x head size x dtype bytes,
milliseconds, MB/s) and the wall time of each run, each engine with half the CPU's cores (the
disaggregated run includes the processes' round trips, and its prefill and decode steps overlap).

    python -m minivllm.benchmarks.disagg [--requests 8] [--max-tokens 16] [--block-size 16]
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import time

import torch

from minivllm.course import model_path
from minivllm.disagg import DisaggregatedLLM, DisaggregatedOutputs
from minivllm.llm import LLM
from minivllm.sampling_params import SamplingParams

PROMPTS = ["def fib(n):", "The engine schedules every request in small steps while the cache keeps",
           "import torch\n\nclass Attention(", "def fib(n):\n    if n < 2:\n        return n",
           "for i in range(10):\n    print(i)", "class BlockManager:\n    def __init__(self, num_blocks):",
           "The prefix cache hashes every full block of the prompt", "def add(a, b):\n    return a + b\n\n"]


def transfer_table(outputs: DisaggregatedOutputs, bytes_per_token: int) -> str:
    rows = [f"{'request':>7} {'prompt':>6} {'sent':>5} {'blocks':>6} {'bytes':>9} {'formula':>9} {'ms':>7} {'MB/s':>8}"]
    for t in outputs.transfers:
        rows.append(f"{t.request_id:>7} {t.num_prompt_tokens:>6} {t.num_tokens:>5} {t.num_blocks:>6} "
                    f"{t.num_bytes:>9} {t.num_tokens * bytes_per_token:>9} {t.seconds * 1e3:>7.2f} "
                    f"{t.bytes_per_second / 1e6:>8.1f}")
    return "\n".join(rows)


def run(num_requests: int = 8, max_tokens: int = 16, block_size: int = 16) -> None:
    logging.getLogger("minivllm").setLevel(logging.WARNING)
    folder = model_path("target")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_requests)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    args = dict(block_size=block_size, kv_cache_memory=64 << 20)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # as many as each instance gets
    with LLM(folder, **args) as llm:
        llm.generate(PROMPTS[:1], params, use_tqdm=False)  # warm up: the first forward passes are slow
        start = time.perf_counter()
        single = llm.generate(prompts, params, use_tqdm=False)
        single_s = time.perf_counter() - start
    torch.set_num_threads(threads)
    with DisaggregatedLLM(folder, **args) as dllm:
        dllm.generate(PROMPTS[:1], params, use_tqdm=False)
        start = time.perf_counter()
        split = dllm.generate(prompts, params, use_tqdm=False)
        split.transfers.sort(key=lambda t: int(t.request_id))
        split_s = time.perf_counter() - start
        per_token = dllm.kv_bytes_per_token
    same = [a.outputs[0].token_ids for a in single] == [b.outputs[0].token_ids for b in split]
    print(f"course target model, block_size={block_size}, {num_requests} requests x {max_tokens} tokens, "
          f"on {platform.processor() or platform.machine()} (CPU, gloo)")
    print(f"greedy outputs equal: {same}; K/V bytes per token: {per_token}")
    print(transfer_table(split, per_token))
    total = sum(t.num_bytes for t in split.transfers)
    print(f"moved {total} bytes in {sum(t.seconds for t in split.transfers) * 1e3:.1f} ms of receives; "
          f"wall time: one LLM {single_s:.2f} s, disaggregated {split_s:.2f} s ({split_s / single_s:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=16)
    a = parser.parse_args()
    run(a.requests, a.max_tokens, a.block_size)


if __name__ == "__main__":
    main()
