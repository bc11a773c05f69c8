"""How fast the simulator runs: requests of a Llama-3.1-8B-on-H100 workload per second of this CPU.

The workload is `vllm bench serve`'s random dataset at its defaults (1024 prompt tokens, 128 output
tokens per request) arriving as a Poisson process; the engine settings are the engine's defaults
(256 sequences, a 2048-token budget, chunked prefill, prefix caching). Prints the wall time and the
CPU time of the simulation alone (workload generation and metrics apart), the steps and chunks it ran,
and the headline metrics. Wall time on a shared machine varies; the CPU time is the steadier figure,
and ``--repeats`` runs the same simulation several times and reports the median.

    python -m minivllm.benchmarks.sim_speed [--num-requests 10000] [--request-rate 30] [--repeats 3]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

from minivllm.sim import Lengths, SimConfig, Simulator, Workload, compute_metrics, get_hardware, get_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=10_000)
    ap.add_argument("--request-rate", type=float, default=30.0)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="simulate this many times; report the median")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats={args.repeats} must be >= 1")

    t0 = time.perf_counter()
    requests = Workload(args.num_requests, args.request_rate, Lengths("fixed", args.prompt_len),
                        Lengths("fixed", args.output_len), seed=args.seed).generate()
    t1 = time.perf_counter()
    sim = Simulator(SimConfig(get_model("Llama-3.1-8B"), get_hardware("H100-SXM")))
    cpus, walls = [], []
    for _ in range(args.repeats):
        result = None  # free the last run's trace before the next
        c0, w0 = time.process_time(), time.perf_counter()
        result = sim.run(requests)
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - w0)
    cpu, wall = statistics.median(cpus), statistics.median(walls)
    t2 = time.perf_counter()
    metrics = compute_metrics(result.trace, result.arrival_times)
    t3 = time.perf_counter()

    chunks = sum(len(r.chunks) for r in result.trace)
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"workload: {args.num_requests} requests, {args.prompt_len} prompt + {args.output_len} output tokens, "
          f"Poisson at {args.request_rate} req/s; Llama-3.1-8B on H100-SXM, KV cache {result.num_blocks} blocks")
    print(f"simulated {len(result.trace)} steps, {chunks} scheduled chunks, {metrics.num_preemptions} preemptions, "
          f"{metrics.duration:.1f} s of virtual time")
    if args.repeats > 1:
        print(f"CPU seconds of each run: {', '.join(f'{c:.2f}' for c in cpus)}; the median below")
    print(f"simulation: {wall:.2f} s wall, {cpu:.2f} s CPU ({cpu / chunks * 1e6:.1f} us CPU per chunk); "
          f"workload generation {t1 - t0:.2f} s, metrics {t3 - t2:.2f} s")
    print(f"virtual/real time ratio: {metrics.duration / wall:.1f}x")
    print(metrics.table())


if __name__ == "__main__":
    main()
