"""Offline throughput: minivllm against ``transformers`` ``generate`` on one mixed workload.

The same tiny random model serves the same requests (random prompt token ids, prompt and output
lengths spread widely, greedy, ``ignore_eos``) twice, with the same dtype and the same number of
torch threads:

* **minivllm**: ``LLM.generate`` on every request at once (continuous batching, chunked prefill,
  paged KV cache, at most ``max_num_seqs`` running);
* **transformers**: the requests in arrival order, cut into static batches of ``max_num_seqs``, each
  batch left-padded to its longest prompt and decoded until its longest output is done. Only the
  tokens each request asked for count as output; a short request's extra tokens are waste.

It prints the workload, the machine, both output-token throughputs and their ratio.

    python -m minivllm.benchmarks.offline_throughput [--num-requests 256] [--max-num-seqs 64]
        [--arch qwen3] [--seed 0] [--model FOLDER] [--threads N]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import random
import tempfile
import time

import torch

from minivllm.models.tiny import ARCHS

# The checkpoint built when --model is not given: larger than the tests' default tiny model, small
# enough that transformers finishes a few hundred requests on a laptop CPU in a minute or two.
BENCH_MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=32, max_position_embeddings=2048)


# ---- workload ---------------------------------------------------------------------------------
def _draw_length(rng: random.Random, lo: int, hi: int, dist: str) -> int:
    if dist == "uniform":
        return rng.randint(lo, hi)
    return min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))  # log-uniform


def make_workload(num_requests: int, vocab_size: int, seed: int, prompt_len: tuple[int, int],
                  output_len: tuple[int, int], dist: str) -> list[tuple[list[int], int]]:
    """``num_requests`` (prompt token ids, output length) pairs, in arrival order."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        n_prompt = _draw_length(rng, *prompt_len, dist)
        n_out = _draw_length(rng, *output_len, dist)
        requests.append(([rng.randrange(vocab_size) for _ in range(n_prompt)], n_out))
    return requests


def _stats(values: list[int]) -> str:
    s = sorted(values)
    return (f"min {s[0]}, median {s[len(s) // 2]}, mean {sum(s) / len(s):.1f}, max {s[-1]}, "
            f"total {sum(s)}")


# ---- the machine ------------------------------------------------------------------------------
def load_average() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except (AttributeError, OSError):
        return "load average unknown"


def _busy(threads: int) -> bool:
    """Is the 1-minute load high enough that ``threads`` more busy threads oversubscribe the CPUs?"""
    try:
        return os.getloadavg()[0] + threads > (os.cpu_count() or 1) + 0.5
    except (AttributeError, OSError):
        return False


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# ---- the two systems --------------------------------------------------------------------------
def run_transformers(folder: str, requests: list[tuple[list[int], int]], max_num_seqs: int,
                     dtype: torch.dtype, pad_token_id: int, warmup: bool = True) -> tuple[float, int, int]:
    """Static batches of ``max_num_seqs`` in arrival order, left-padded; returns (elapsed seconds,
    useful output tokens, generated tokens including the waste)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()

    def run_batch(batch: list[tuple[list[int], int]]) -> int:
        longest = max(len(p) for p, _ in batch)
        input_ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, (prompt, _) in enumerate(batch):
            input_ids[i, longest - len(prompt):] = torch.tensor(prompt)
            attention_mask[i, longest - len(prompt):] = 1
        max_new = max(n for _, n in batch)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                             max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=pad_token_id)
        generated = out.shape[1] - longest
        assert generated == max_new, f"transformers generated {generated} tokens, expected {max_new}"
        return len(batch) * generated

    with torch.inference_mode():
        if warmup:
            run_batch(requests[:2])
        start = time.perf_counter()
        generated = 0
        for i in range(0, len(requests), max_num_seqs):
            generated += run_batch(requests[i:i + max_num_seqs])
        elapsed = time.perf_counter() - start
    useful = sum(n for _, n in requests)
    return elapsed, useful, generated


def run_minivllm(folder: str, requests: list[tuple[list[int], int]], max_num_seqs: int, dtype: str,
                 warmup: bool = True) -> tuple[float, int, int]:
    """Every request at once through ``LLM.generate``; returns (elapsed seconds, output tokens,
    engine steps)."""
    from minivllm import LLM, SamplingParams

    llm = LLM(folder, max_num_seqs=max_num_seqs, dtype=dtype)
    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    if warmup:
        llm.generate(prompts[:2], params[:2], use_tqdm=False)
    steps_before = len(llm.llm_engine.trace)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    expected = sum(n for _, n in requests)
    assert tokens == expected, f"minivllm produced {tokens} output tokens, expected {expected}"
    return elapsed, tokens, len(llm.llm_engine.trace) - steps_before


# ---- main -------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--arch", default="qwen3", choices=ARCHS, help="architecture of the built tiny model")
    p.add_argument("--seed", type=int, default=0, help="seeds the workload and the built model")
    p.add_argument("--model", default=None,
                   help="checkpoint folder; default: build a tiny random one in a temp dir")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--min-prompt-len", type=int, default=8)
    p.add_argument("--max-prompt-len", type=int, default=512)
    p.add_argument("--min-output-len", type=int, default=8)
    p.add_argument("--max-output-len", type=int, default=256)
    p.add_argument("--length-dist", default="loguniform", choices=("loguniform", "uniform"),
                   help="how prompt and output lengths are drawn between their min and max")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up of each side")
    p.add_argument("--skip-transformers", action="store_true", help="time minivllm only (for profiling)")
    args = p.parse_args(argv)
    if args.num_requests < 1 or args.max_num_seqs < 1:
        p.error("--num-requests and --max-num-seqs must be >= 1")
    if not 1 <= args.min_prompt_len <= args.max_prompt_len or not 1 <= args.min_output_len <= args.max_output_len:
        p.error("length ranges must satisfy 1 <= min <= max")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="minivllm-bench-") as tmp:
        if args.model:
            folder, model_desc = args.model, args.model
        else:
            from minivllm.models.tiny import save_tiny_checkpoint
            folder = save_tiny_checkpoint(tmp, args.arch, args.seed, **BENCH_MODEL)
            model_desc = f"tiny random {args.arch} (" + ", ".join(f"{k}={v}" for k, v in BENCH_MODEL.items()) + ")"
        from transformers import AutoTokenizer

        from minivllm.config.model import ModelConfig

        mc = ModelConfig.from_folder(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (
            tok.eos_token_id if tok.eos_token_id is not None else 0)
        limit = mc.max_position_embeddings
        if args.max_prompt_len + args.max_output_len > limit:
            raise SystemExit(f"max prompt + output length {args.max_prompt_len + args.max_output_len} "
                             f"exceeds the model's max_position_embeddings={limit}")
        requests = make_workload(args.num_requests, mc.vocab_size, args.seed,
                                 (args.min_prompt_len, args.max_prompt_len),
                                 (args.min_output_len, args.max_output_len), args.length_dist)

        print("== offline throughput: minivllm vs transformers generate ==")
        print(f"machine : {cpu_model()} ({os.cpu_count()} logical cores), {platform.system()} "
              f"{platform.machine()}, python {platform.python_version()}, torch {torch.__version__}")
        import transformers
        print(f"load    : {load_average()} before the runs")
        if _busy(threads):
            print("WARNING : the machine is busy; other processes skew the timings, and torch threads "
                  "competing for cores can slow either side several times (try --threads 1)")
        print(f"settings: torch threads {torch.get_num_threads()}, dtype {args.dtype}, "
              f"transformers {transformers.__version__}, max_num_seqs {args.max_num_seqs}")
        print(f"model   : {model_desc}; vocab {mc.vocab_size}")
        print(f"workload: {len(requests)} requests, random prompt token ids, greedy, ignore_eos, "
              f"seed {args.seed}, lengths {args.length_dist}")
        print(f"  prompt lengths [{args.min_prompt_len}, {args.max_prompt_len}]: "
              f"{_stats([len(p) for p, _ in requests])}")
        print(f"  output lengths [{args.min_output_len}, {args.max_output_len}]: "
              f"{_stats([n for _, n in requests])}")
        print(f"transformers: static batches of {args.max_num_seqs} in arrival order, left-padded to the "
              f"batch's longest prompt, max_new_tokens = min_new_tokens = the batch's longest output; "
              f"only each request's own max_tokens count", flush=True)

        warmup = not args.no_warmup
        total_start = time.perf_counter()
        m_elapsed, m_tokens, m_steps = run_minivllm(folder, requests, args.max_num_seqs, args.dtype, warmup)
        rows = [("minivllm", m_elapsed, m_tokens, f"{m_steps} engine steps")]
        if not args.skip_transformers:
            t_elapsed, t_tokens, t_generated = run_transformers(
                folder, requests, args.max_num_seqs, dtype, pad_id, warmup)
            rows.append(("transformers", t_elapsed, t_tokens,
                         f"{t_generated} generated, {t_generated - t_tokens} wasted on padding"))

    print()
    print(f"{'system':<14}{'elapsed s':>11}{'output tokens':>15}{'output tok/s':>14}  note")
    for name, elapsed, tokens, note in rows:
        print(f"{name:<14}{elapsed:>11.2f}{tokens:>15}{tokens / elapsed:>14.1f}  {note}")
    if len(rows) == 2:
        ratio = (m_tokens / m_elapsed) / (t_tokens / t_elapsed)
        print(f"ratio minivllm / transformers: {ratio:.2f} x  (bar: 2x, goal: 3x)")
    print(f"total benchmark time {time.perf_counter() - total_start:.1f} s; {load_average()} after")


if __name__ == "__main__":
    main()
