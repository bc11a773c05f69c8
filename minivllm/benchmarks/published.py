"""The simulator against published throughput of real serving engines on H100 and H200.

Each row is a measurement someone published, with enough of its setup stated to rerun it here: the
model's shape, the GPU, the layout, the dtype, the engine's batch limits (the engine's defaults of
that version where the source does not state them) and a workload of the stated lengths, every
request sent at once (an offline / "QPS inf" run). The simulator runs it and we compare its
throughput with the published one: ``ratio = predicted / published`` (above 1: the simulator is
optimistic). Nothing is fitted to these numbers.

Sources
-------

1. **vLLM v0.6.0 performance blog** (vLLM team, 2024-09-05),
   https://blog.vllm.ai/2024/09/05/perf-update.html (the post's source:
   https://github.com/vllm-project/vllm-project.github.io/blob/main/_posts/2024-09-05-perf-update.md).
   vLLM v0.6.0 with ``--num-scheduler-steps 10``, Llama 3 8B on 1 x H100 and Llama 3 70B on
   4 x H100 (TP 4), 16-bit weights, 500 prompts sent at once (QPS inf), request throughput in req/s.
   Datasets: "decode-heavy" (sonnet prompts, about 462 input and 256 output tokens) and
   "prefill-heavy" (about 462 input, 16 output). The figures are bar charts without printed values
   (``assets/figures/perf-v060/overall_throughput.png``); the values below were read off them by
   measuring bar heights against the gridlines in pixels (about +-0.2 req/s):

   ==========================  ==========
   Llama 3 8B, decode-heavy    31.0 req/s
   Llama 3 8B, prefill-heavy   59.1 req/s
   Llama 3 70B, decode-heavy   15.4 req/s
   Llama 3 70B, prefill-heavy  25.2 req/s
   ==========================  ==========

   Engine settings simulated: vLLM 0.6.0's defaults for an 8,192-token model: no chunked prefill
   (then on by default only past 32K context), a token budget of ``max(max_model_len, 2048)`` =
   8192, 256 sequences, no prefix caching, block size 16, ``gpu_memory_utilization`` 0.9.

2. **TensorRT-LLM "perf overview"** (NVIDIA; TensorRT-LLM 1.0 docs, PyTorch backend,
   ``trtllm-bench throughput``): NOT vLLM, a different engine on the same GPUs,
   https://github.com/NVIDIA/TensorRT-LLM/blob/00f37686aa854010d68bcbd0f4ab000221541ca6/docs/source/performance/perf-overview.md
   (rendered: https://nvidia.github.io/TensorRT-LLM/performance/perf-overview.html). FP8 weights
   (NVIDIA's ModelOpt checkpoints ``nvidia/Llama-3.1-8B-Instruct-FP8``,
   ``nvidia/Llama-3.3-70B-Instruct-FP8``), synthetic prompts of exactly 1000 input and 1000 output
   tokens, 3000 requests queued at once, "Total Output Throughput" in output tokens/s:

   ========================================  ============
   Llama 3.1 8B FP8, 1 x H100 (TP 1)         15,220 tok/s
   Llama 3.1 8B FP8, 1 x H200 (TP 1)         17,744 tok/s
   Llama 3.3 70B FP8, 2 x H100 (TP 2)         4,205 tok/s
   Llama 3.3 70B FP8, 1 x H200 (TP 1)         2,909 tok/s
   ========================================  ============

   Llama 3.3 70B has Llama 3.1 70B's shape. Engine settings simulated (not stated by the source;
   ``trtllm-bench`` picks its own from a heuristic): a 16-bit KV cache (NVIDIA's FP8 model cards,
   e.g. https://huggingface.co/nvidia/Llama-3.1-405B-Instruct-FP8, say only the linear operators'
   weights and activations are quantized; with an FP8 KV cache instead the predictions rise by
   1.5-1.8x), up to 2048 sequences, an 8192-token budget with chunked prefill,
   ``gpu_memory_utilization`` 0.9, ``max_model_len`` 2048. The run is scaled down from 3000 to
   ``TRT_NUM_REQUESTS`` requests to keep the whole script under a minute on two CPU cores; at 3000
   the predictions move by 0-7 % (ramp-up and drain weigh less).

What the simulator leaves out (why the ratios are not 1): its roofline reaches the datasheet's peak
FLOP/s and bandwidth (real kernels reach perhaps 50-80 %, less for attention); it charges a fixed
per-step overhead instead of vLLM 0.6.0's CPU work (multi-step scheduling, the HTTP server,
detokenisation); the benchmarks ran through a server (vLLM) or TensorRT-LLM's own kernels and
scheduler, which the simulator's minivllm scheduler only approximates; the sonnet datasets' lengths
vary a little around their means, here they are fixed.

    python -m minivllm.benchmarks.published
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from minivllm.sim import (Lengths, ParallelLayout, SimConfig, Simulator, Workload, compute_metrics, get_hardware,
                          get_model)

VLLM_BLOG = "https://blog.vllm.ai/2024/09/05/perf-update.html"
TRT_PERF = ("https://github.com/NVIDIA/TensorRT-LLM/blob/00f37686aa854010d68bcbd0f4ab000221541ca6/"
            "docs/source/performance/perf-overview.md")

# vLLM 0.6.0's defaults for Llama 3 (8,192-token context): see the module
VLLM_060 = dict(max_model_len=8192, enable_chunked_prefill=False, max_num_batched_tokens=8192, max_num_seqs=256,
                enable_prefix_caching=False, block_size=16, gpu_memory_utilization=0.9)
# TensorRT-LLM as simulated (assumed settings, see the module); the KV cache is 16-bit (bf16)
TRT_ENGINE = dict(max_model_len=2048, max_num_seqs=2048, max_num_batched_tokens=8192, gpu_memory_utilization=0.9)
TRT_NUM_REQUESTS = 1000  # published runs used 3000


@dataclass(frozen=True)
class Measurement:
    """One published figure and the simulator setup that reproduces it."""

    name: str
    source_url: str
    published: float
    unit: str  # "req/s" (request throughput) or "tok/s" (output token throughput)
    model: str
    hardware: str
    layout: ParallelLayout
    dtype: str
    kv_cache_dtype: str
    engine: dict
    num_requests: int
    prompt_len: int
    output_len: int
    note: str = ""

    @property
    def setup(self) -> str:
        kv = "" if self.kv_cache_dtype == "auto" else f", KV {self.kv_cache_dtype}"
        e = self.engine
        return (f"{self.model} {self.dtype}{kv} on {self.layout.num_gpus}x{self.hardware} ({self.layout}), "
                f"max_num_seqs={e['max_num_seqs']}, max_num_batched_tokens={e['max_num_batched_tokens']}, "
                f"{self.num_requests} x {self.prompt_len}/{self.output_len} tokens at once")


@dataclass(frozen=True)
class Comparison:
    """A published throughput and the simulator's prediction of it."""

    name: str
    source_url: str
    setup: str
    published: float
    unit: str
    predicted: float
    ratio: float  # predicted / published
    note: str = ""


def _vllm(name: str, model: str, tp: int, out: int, published: float) -> Measurement:
    return Measurement(name, VLLM_BLOG, published, "req/s", model, "H100-SXM", ParallelLayout(tp=tp), "bf16",
                       "auto", VLLM_060, 500, 462, out,
                       "vLLM 0.6.0 (multi-step 10) via its server; Llama 3 (8K context); value read off a bar chart")


def _trt(name: str, model: str, hardware: str, tp: int, published: float) -> Measurement:
    return Measurement(name, TRT_PERF, published, "tok/s", model, hardware, ParallelLayout(tp=tp), "fp8", "bf16",
                       TRT_ENGINE, TRT_NUM_REQUESTS, 1000, 1000,
                       "TensorRT-LLM 1.0 (not vLLM); FP8 weights, 16-bit KV cache assumed; "
                       "3000 requests published, fewer simulated")


MEASUREMENTS = [
    _vllm("vLLM 0.6.0, Llama 3 8B, 1xH100, decode-heavy", "Llama-3.1-8B", 1, 256, 31.0),
    _vllm("vLLM 0.6.0, Llama 3 8B, 1xH100, prefill-heavy", "Llama-3.1-8B", 1, 16, 59.1),
    _vllm("vLLM 0.6.0, Llama 3 70B, 4xH100 TP4, decode-heavy", "Llama-3.1-70B", 4, 256, 15.4),
    _vllm("vLLM 0.6.0, Llama 3 70B, 4xH100 TP4, prefill-heavy", "Llama-3.1-70B", 4, 16, 25.2),
    _trt("TRT-LLM 1.0, Llama 3.1 8B FP8, 1xH100, 1000/1000", "Llama-3.1-8B", "H100-SXM", 1, 15220.0),
    _trt("TRT-LLM 1.0, Llama 3.1 8B FP8, 1xH200, 1000/1000", "Llama-3.1-8B", "H200", 1, 17744.0),
    _trt("TRT-LLM 1.0, Llama 3.3 70B FP8, 2xH100 TP2, 1000/1000", "Llama-3.1-70B", "H100-SXM", 2, 4205.0),
    _trt("TRT-LLM 1.0, Llama 3.3 70B FP8, 1xH200, 1000/1000", "Llama-3.1-70B", "H200", 1, 2909.0),
]


def simulate(m: Measurement) -> float:
    """The simulator's throughput for ``m``, in ``m.unit``."""
    config = SimConfig(get_model(m.model), get_hardware(m.hardware), m.dtype, layout=m.layout,
                       kv_cache_dtype=m.kv_cache_dtype, **m.engine)
    requests = Workload(m.num_requests, math.inf, Lengths("fixed", m.prompt_len), Lengths("fixed", m.output_len)
                        ).generate()
    result = Simulator(config).run(requests)
    metrics = compute_metrics(result.trace, result.arrival_times)
    if m.unit == "req/s":
        return metrics.request_throughput
    if m.unit == "tok/s":
        return metrics.output_throughput
    raise ValueError(f"unit={m.unit!r} must be 'req/s' or 'tok/s'")


def comparisons(measurements: list[Measurement] | None = None) -> list[Comparison]:
    """Simulate every measurement (default: `MEASUREMENTS`); under a minute on two CPU cores."""
    out = []
    for m in MEASUREMENTS if measurements is None else measurements:
        predicted = simulate(m)
        out.append(Comparison(m.name, m.source_url, m.setup, m.published, m.unit, predicted,
                              predicted / m.published, m.note))
    return out


def table(rows: list[Comparison]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'measurement':<{width}}  {'published':>16}  {'predicted':>16}  {'ratio':>6}"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.published:>10,.1f} {r.unit:<5}  {r.predicted:>10,.1f} {r.unit:<5}  "
                     f"{r.ratio:>6.2f}")
    return "\n".join(lines)


def main() -> None:
    t0 = time.perf_counter()
    rows = comparisons()
    elapsed = time.perf_counter() - t0
    print(table(rows))
    print()
    for r in rows:
        print(f"- {r.name}: {r.setup}; {r.note}\n  {r.source_url}")
    ratios = [r.ratio for r in rows]
    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    print(f"\nratio predicted/published: geometric mean {geo:.2f}, range {min(ratios):.2f}-{max(ratios):.2f} "
          f"({len(rows)} measurements, simulated in {elapsed:.1f} s)")


if __name__ == "__main__":
    main()
