"""What the server costs: the same requests through `LLM.generate` and through the OpenAI-compatible
server (``minivllm serve`` in a process of its own, on 127.0.0.1) read by the bench client from this
process, at 1, 8 and 32 concurrent clients, side by side in one run. Both engines get the same number
of torch threads.

Offline, the engine runs with ``max_num_seqs`` equal to the client count, so both sides batch the
same number of requests. Printed per concurrency: output tokens per second both ways and their
ratio; at concurrency 1, the median time to first token the client sees against the engine's own
(first scheduled to first token, offline), whose difference is what HTTP, the event loop and the
engine thread's hand-offs add.

    python -m minivllm.benchmarks.serving [--num-prompts 64] [--input-len 64] [--output-len 64]
        [--concurrency 1 8 32] [--threads 1]
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import time
from dataclasses import replace

import torch

from minivllm import LLM, SamplingParams, course
from minivllm.bench.serve import BenchConfig, run
from minivllm.benchmarks.offline_throughput import cpu_model, load_average
from minivllm.entrypoints.openai.local import serve_process


def offline(requests, concurrency: int) -> tuple[float, float]:
    """Output tokens per second of `LLM.generate`, and the median engine-side TTFT (ms)."""
    llm = LLM(course.model_path("target"), max_model_len=512, max_num_seqs=concurrency)
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    llm.close()
    ttft = statistics.median(1000 * (o.metrics.first_token_time - o.metrics.first_scheduled_time) for o in outs)
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed, ttft


def served(config: BenchConfig, requests, threads: int) -> tuple[float, float, int]:
    """Output tokens per second through the server, the median client-side TTFT (ms), failures."""
    with serve_process("--max-model-len", "512", "--served-model-name", config.model,
                       env={"OMP_NUM_THREADS": str(threads)}) as url:  # torch's thread count in the server
        results, duration = asyncio.run(run(replace(config, base_url=url), requests))
    done = [r.record for r in results if r.record is not None]
    return (sum(r.num_output_tokens for r in done) / duration, statistics.median(1000 * r.ttft for r in done),
            len(results) - len(done))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("minivllm").setLevel(logging.WARNING)
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s), "
          f"{load_average()} (before)")
    print(f"course target, {args.num_prompts} requests of {args.input_len} prompt and {args.output_len} output "
          "tokens (random ids, ignore_eos, greedy)\n")
    print(f"{'clients':>7} {'offline tok/s':>14} {'server tok/s':>13} {'ratio':>6} {'TTFT offline ms':>16} "
          f"{'TTFT client ms':>15} {'failed':>6}")
    for c in args.concurrency:
        config = BenchConfig("", "course", num_prompts=args.num_prompts, max_concurrency=c,
                             random_input_len=args.input_len, random_output_len=args.output_len)
        requests = config.workload().generate()
        off_tps, off_ttft = offline(requests, c)
        srv_tps, srv_ttft, failed = served(config, requests, args.threads)
        print(f"{c:>7} {off_tps:>14.1f} {srv_tps:>13.1f} {srv_tps / off_tps:>6.2f} {off_ttft:>16.1f} "
              f"{srv_ttft:>15.1f} {failed:>6}")
    print(f"\n{load_average()} (after)")


if __name__ == "__main__":
    main()
