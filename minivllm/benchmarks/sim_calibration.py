"""Calibration: the simulator's predicted throughput against the real engine's, on this CPU.

1. `measure_this_cpu` times the real model runner on the course model (a one-token step for the
   per-step overhead, a prefill for the FLOP rate, a tensor copy for the memory bandwidth);
2. the real engine (`LLM`, float32 on the CPU) serves a seeded offline workload with
   ``ignore_eos`` (every request runs to its sampled output length);
3. the simulator runs the same requests with the same engine settings and the same number of KV
   blocks, on the measured CPU profile.

Both throughputs are output tokens over the span of the trace (first step's start to last step's
end). It prints both, their ratio, and whether the two traces scheduled identical chunks in every
step (the scheduler is the same code; only the clock differs).

    python -m minivllm.benchmarks.sim_calibration [--num-requests 48] [--threads 1] [--seed 0]
"""
from __future__ import annotations

import argparse
import logging
import math
import platform

import torch

from minivllm import LLM, SamplingParams, course
from minivllm.engine.trace import StepRecord
from minivllm.sim import Lengths, ModelSpec, SimConfig, Simulator, Workload, measure_this_cpu


def schedule_of(trace: list[StepRecord]) -> list[tuple]:
    """What each step ran: (request id, first position, tokens) per chunk, and who was preempted."""
    return [(tuple((c.request_id, c.start, c.num_tokens) for c in r.chunks), r.preempted) for r in trace]


def output_throughput(trace: list[StepRecord]) -> float:
    tokens = sum(1 for r in trace for c in r.chunks if c.sampled_token is not None)
    return tokens / (trace[-1].end_time - trace[0].start_time)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("minivllm").setLevel(logging.WARNING)

    folder = course.model_path("target")
    spec = ModelSpec.from_folder(folder, name="course target")
    requests = Workload(args.num_requests, math.inf, Lengths("lognormal", 96, 0.5, 512),
                        Lengths("lognormal", 48, 0.5, 256), vocab_size=spec.vocab_size, seed=args.seed).generate()

    cpu = measure_this_cpu(folder)
    llm = LLM(folder, device="cpu", dtype="float32", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed)
    engine = llm.llm_engine
    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests],
                 [SamplingParams(max_tokens=r.output_len, ignore_eos=True) for r in requests], use_tqdm=False)
    real = engine.trace

    sim = Simulator(SimConfig(spec, cpu, dtype="fp32", max_num_seqs=args.max_num_seqs,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              num_kv_blocks=engine.block_manager.num_blocks))
    # the engine names requests "0", "1", ... in submission order: so does the simulated copy
    renamed = [type(r)(str(i), r.arrival_time, r.prompt_token_ids, r.output_len) for i, r in enumerate(requests)]
    predicted = sim.run(renamed).trace

    real_tp, sim_tp = output_throughput(real), output_throughput(predicted)
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {args.threads}")
    print(f"this CPU as measured: step overhead {cpu.step_overhead * 1e3:.2f} ms + "
          f"{cpu.seq_overhead * 1e3:.2f} ms per request, "
          f"{cpu.flops['fp32'] / 1e9:.1f} GFLOP/s fp32, memory {cpu.memory_bandwidth / 1e9:.1f} GB/s")
    print(f"workload: {len(requests)} requests at once, prompts mean "
          f"{sum(len(r.prompt_token_ids) for r in requests) / len(requests):.0f} tokens, outputs mean "
          f"{sum(r.output_len for r in requests) / len(requests):.0f} tokens; max_num_seqs={args.max_num_seqs}, "
          f"max_num_batched_tokens={args.max_num_batched_tokens}")
    print(f"real engine:  {len(real)} steps, {real_tp:.1f} output tok/s")
    print(f"simulator:    {len(predicted)} steps, {sim_tp:.1f} output tok/s")
    print(f"ratio simulator / real: {sim_tp / real_tp:.3f}")
    print(f"identical chunks in every step: {schedule_of(real) == schedule_of(predicted)}")


if __name__ == "__main__":
    main()
