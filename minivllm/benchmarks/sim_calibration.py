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
import os
import platform
import time

import torch

from minivllm import LLM, SamplingParams, course
from minivllm.config.engine import EngineConfig
from minivllm.config.model import ModelConfig
from minivllm.core.block_manager import BlockManager
from minivllm.core.scheduler import ScheduledChunk, SchedulerOutput
from minivllm.core.sequence import Sequence
from minivllm.core.trace import StepRecord
from minivllm.sim import CostModel, Hardware, Lengths, ModelSpec, SimConfig, Simulator, Workload
from minivllm.worker.model_runner import ModelRunner


def measure_this_cpu(model_folder: str | None = None, *, prefill_tokens: int = 256, batch: int = 16,
                     repeats: int = 3) -> Hardware:
    """Time the real model runner (float32, CPU) on ``model_folder`` (default: the course's target
    model) and express this CPU as a `Hardware` (the fastest of ``repeats`` runs of each probe):

    * ``step_overhead``: a one-token decode step, whose model work is negligible;
    * ``flops["fp32"]``: the FLOPs of a ``prefill_tokens``-token prefill (`CostModel.step_flops`)
      over its time beyond the step overhead;
    * ``seq_overhead``: a decode step of ``batch`` requests (contexts spread from 16 to
      ``prefill_tokens``), beyond the step overhead and its FLOPs, per request;
    * ``memory_bandwidth``: a 128 MiB tensor copy (bytes read + written per second).

    Takes a few seconds."""
    if not isinstance(prefill_tokens, int) or prefill_tokens < 16:
        raise ValueError(f"prefill_tokens={prefill_tokens!r} must be an int >= 16")
    if not isinstance(batch, int) or batch < 2:
        raise ValueError(f"batch={batch!r} must be an int >= 2")
    folder = model_folder or course.model_path("target")
    mc = ModelConfig.from_folder(folder)
    if prefill_tokens > mc.max_position_embeddings:
        raise ValueError(f"prefill_tokens={prefill_tokens} exceeds the model's max_position_embeddings="
                         f"{mc.max_position_embeddings}")
    contexts = [16 + (prefill_tokens - 16) * i // (batch - 1) for i in range(batch)]
    num_blocks = sum(-(-c // 16) for c in contexts) + prefill_tokens // 16 + 1
    cfg = EngineConfig.from_args(folder, device="cpu", dtype="float32", block_size=16, num_kv_blocks=num_blocks)
    runner = ModelRunner(cfg, mc, folder, mc.max_position_embeddings)
    spec = ModelSpec.from_folder(folder)
    cost = CostModel(spec, Hardware("probe", 1.0, 1.0, {"fp32": 1.0}), "fp32")

    def best_time(chunks: list[tuple[int, int]]) -> float:
        """Fastest run of one step of (start, num_new_tokens) chunks, one request each."""
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            bm = BlockManager(num_blocks, 16, enable_prefix_caching=False)
            scheduled = []
            for i, (start, n) in enumerate(chunks):
                seq = Sequence(f"probe{i}", [1] * (start + n), SamplingParams(max_tokens=1))
                bm.append_slots(seq, start + n)
                scheduled.append(ScheduledChunk(seq, start, n))
            t0 = time.perf_counter()
            runner.execute(SchedulerOutput(scheduled))
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    def flops(chunks: list[tuple[int, int]]) -> float:
        pairs = sum(n * (2 * s + n + 1) / 2 for s, n in chunks)
        return cost.step_flops(sum(n for _, n in chunks), len(chunks), pairs)

    overhead = best_time([(0, 1)])
    prefill = [(0, prefill_tokens)]
    peak = flops(prefill) / max(best_time(prefill) - overhead, 1e-9)
    decodes = [(c - 1, 1) for c in contexts]
    per_seq = (best_time(decodes) - overhead - flops(decodes) / peak) / (batch - 1)
    src = torch.ones(32 * 2**20)  # 128 MiB, beyond any cache
    dst = torch.empty_like(src)
    copies = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - t0)
    bandwidth = 2 * src.numel() * src.element_size() / min(copies[1:])
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware("this CPU", float(memory), bandwidth, {"fp32": peak}, 0.0, overhead, max(per_seq, 0.0))


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
