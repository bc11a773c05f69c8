"""How fast chapter 09's tools answer: the Tuning Lab's update after one slider move on the default
preset (chat, 1,000 requests, Llama-3.1-8B on one H100: a new simulation, the metrics, the view and
the PNG figure), a move of a judging knob (the price: no new simulation), and the auto-tuner's default
search (Llama-3.1-8B on 2 x H100, the chat preset at twice its rate: 3 layouts x 3 max_num_seqs x 3
max_num_batched_tokens, in as many processes as there are CPUs). Targets: <= 1 s and <= 60 s.

    python -m minivllm.benchmarks.tuning [--repeats 3] [--workers N]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="slider moves to time; the median is reported")
    ap.add_argument("--workers", type=int, default=None, help="tuner processes (default: the CPUs)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats={args.repeats} must be >= 1")

    from minivllm.lab.tuning import TuningLab
    from minivllm.sim import get_hardware, get_model
    from minivllm.sim.evaluation import PercentileSLO
    from minivllm.sim.presets import TUNING_PRESETS, tuning_workload
    from minivllm.sim.tuner import auto_tune

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}")
    t0 = time.perf_counter()
    lab = TuningLab()
    print(f"lab built (imports, first simulation, view, figure): {time.perf_counter() - t0:.2f} s")
    moves, values = [], [128, 64, 256, 32, 512]
    for value in values[:args.repeats]:
        t = time.perf_counter()
        lab.max_num_seqs.value = value
        moves.append(time.perf_counter() - t)
        assert lab.error_message == "", lab.error_message
    s = lab.state.settings
    print(f"slider move (max_num_seqs; {s.num_requests} {s.preset} requests, {len(lab.state.run.result.trace)} steps): "
          f"median {statistics.median(moves):.2f} s of {', '.join(f'{m:.2f}' for m in moves)}")
    t = time.perf_counter()
    lab.price.value = 3.0
    print(f"judging knob (GPU price, the simulation reused): {time.perf_counter() - t:.2f} s")

    rate = 2 * TUNING_PRESETS["chat"].request_rate
    slo = PercentileSLO(ttft=0.5, tpot=0.05)
    t = time.perf_counter()
    result = auto_tune(get_model("Llama-3.1-8B"), get_hardware("H100-SXM"), 2, tuning_workload("chat", 1000, rate),
                       slo, workers=args.workers)
    print(f"auto-tuner default search (chat at {rate:g} req/s, 1000 requests, 2 x H100): "
          f"{time.perf_counter() - t:.1f} s")
    print(result.report())


if __name__ == "__main__":
    main()
