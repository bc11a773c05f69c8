"""Speculative decoding: output tokens/s with and without it, on the course target.

The course target (11M parameters) generates greedily for prompts cut from Python standard library
source (code repeats itself: where n-gram lookup shines), first alone, then with each proposer
(the course draft model, n-gram lookup) and each ``k``, at batch 1 (one request at a time) and
batch 16 (sixteen requests in one ``generate``). Each speculative run is paired with a run without
speculation right before it, in the same process on the same prompts, and the speedup is the ratio
of the pair (on a shared machine, load drifts between rows but less within a pair). Beside it: the
measured acceptance rate ``alpha`` (accepted / proposed drafts, vLLM's figure), the conditional
rate ``alpha_c`` (accepted / drafts actually checked, every draft before them accepted), the tokens
each verifying step emitted, and what the i.i.d. model of Leviathan et al. predicts for it from
``alpha_c``: ``(1 - alpha_c^(k+1)) / (1 - alpha_c)``.

    python -m minivllm.benchmarks.spec_decode [--ks 1 2 3 5] [--batch-sizes 1 16] [--max-tokens 128]
        [--threads 1]
"""
from __future__ import annotations

import argparse
import functools
import inspect
import logging
import time
from typing import Callable

import torch

from minivllm import LLM, SamplingParams, course
from minivllm.benchmarks.offline_throughput import cpu_model, load_average
from minivllm.core.records import SpecDecodeMetrics, expected_tokens_per_step

SOURCE_MODULES = ("textwrap", "json.decoder", "json.encoder", "argparse", "dataclasses", "shlex",
                  "fractions", "statistics", "heapq", "bisect", "calendar", "csv", "difflib",
                  "fnmatch", "glob", "string")


def code_prompts(n: int, num_chars: int = 600) -> list[str]:
    """``n`` prompts, each the start of a function body or class from a standard library module."""
    import importlib

    prompts = []
    for name in SOURCE_MODULES:
        src = inspect.getsource(importlib.import_module(name))
        start = src.find("\ndef ", len(src) // 3)  # past the imports and the module docstring
        prompts.append(src[start + 1:start + 1 + num_chars])
    return prompts[:n]


def timed_run(llm: LLM, prompts: list[str], batch_size: int, params: SamplingParams, *,
              clock: Callable[[], float] = time.perf_counter) -> tuple[float, list]:
    """(output tokens/s, outputs) generating for ``prompts`` ``batch_size`` at a time. ``clock`` is
    read before and after: wall time by default; ``time.process_time`` counts this process's CPU
    time only, which other programs on a shared machine do not inflate (for the one-thread CPU
    engine on an idle machine, the two agree)."""
    outputs, start = [], clock()
    for i in range(0, len(prompts), batch_size):
        outputs += llm.generate(prompts[i:i + batch_size], params, use_tqdm=False)
    elapsed = clock() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed, outputs


def summed(outputs) -> SpecDecodeMetrics:
    return functools.reduce(SpecDecodeMetrics.merge, (o.metrics.spec_decode for o in outputs), SpecDecodeMetrics())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch1-prompts", type=int, default=4, help="prompts run one at a time at batch 1")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("minivllm").setLevel(logging.WARNING)
    target, draft = course.model_path("target"), course.model_path("draft")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    engine_args = dict(num_kv_blocks=2048, seed=0)
    print(f"machine: {cpu_model()}, {args.threads} torch thread(s), {load_average()} (before)")
    print(f"course target, greedy, max_tokens={args.max_tokens}, prompts from the Python standard library\n")
    configs = [("draft", {"method": "draft_model", "model": draft}), ("ngram", {"method": "ngram"})]
    llms = {None: LLM(target, **engine_args)}
    for name, cfg in configs:
        for k in args.ks:
            llms[name, k] = LLM(target, speculative_config={**cfg, "num_speculative_tokens": k}, **engine_args)
    print(f"{'batch':>5} {'method':>6} {'k':>2} {'tok/s':>7} {'plain':>7} {'speedup':>7} {'alpha':>6} "
          f"{'alpha_c':>7} {'tok/step':>8} {'theory':>6}  alpha per position")
    for batch in args.batch_sizes:
        prompts = code_prompts(args.batch1_prompts if batch == 1 else batch)
        for llm in llms.values():  # warm up: first-call allocations, lazy imports
            llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        for name, _ in configs:
            for k in args.ks:
                base_rate, base_out = timed_run(llms[None], prompts, batch, params)
                want = [o.outputs[0].token_ids for o in base_out]
                rate, out = timed_run(llms[name, k], prompts, batch, params)
                assert [o.outputs[0].token_ids for o in out] == want, "speculation changed greedy output"
                m = summed(out)
                alpha_c = m.conditional_acceptance_rate
                per_pos = " ".join(f"{a:.2f}" for a in m.acceptance_rate_per_position)
                print(f"{batch:>5} {name:>6} {k:>2} {rate:>7.1f} {base_rate:>7.1f} {rate / base_rate:>7.2f} "
                      f"{m.acceptance_rate:>6.2f} "
                      f"{alpha_c:>7.2f} {m.mean_accepted_length:>8.2f} {expected_tokens_per_step(alpha_c, k):>6.2f}"
                      f"  {per_pos}")
    print(f"\n{load_average()} (after)")


if __name__ == "__main__":
    main()
