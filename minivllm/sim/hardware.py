"""Accelerators the simulator can run on: memory, memory bandwidth, dense FLOPs per dtype.

The GPU numbers are the vendors' public datasheet figures (dense, i.e. without 2:4 sparsity; SXM
parts where both exist). ``step_overhead`` is the time a step costs besides the model itself
(scheduling, kernel launches) and ``seq_overhead`` what each scheduled request adds to it (input
preparation, its attention call, sampling); for the GPUs they are assumptions of the order a
CUDA-graph engine reaches. "This CPU" is measured instead: `measure_this_cpu` times the real model
runner on a model and fits the same numbers.

The GPU profiles therefore predict a vLLM-class engine, not minivllm's own eager one. Measured on an
H200 (Qwen3-0.6B shape, 256 requests of 512 + 128 tokens, Triton attention): minivllm took 50 ms a
step, where the H200 profile predicts 3.7 ms; the roofline part is about 5 % of the real step.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

GB = 1e9
TB = 1e12
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: float
    memory_bandwidth: float  # bytes/s
    flops: dict[str, float]  # dense peak FLOP/s per dtype
    interconnect_bandwidth: float = 0.0  # bytes/s between two devices (NVLink, PCIe)
    step_overhead: float = 1e-3  # seconds per step besides the model
    seq_overhead: float = 0.0  # seconds per scheduled request (chunk) besides the model

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "memory_bandwidth"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"Hardware.{name}={value!r} must be > 0")
        if self.interconnect_bandwidth < 0:
            raise ValueError(f"Hardware.interconnect_bandwidth={self.interconnect_bandwidth!r} must be >= 0")
        for name in ("step_overhead", "seq_overhead"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Hardware.{name}={getattr(self, name)!r} must be >= 0")
        bad = {k: v for k, v in self.flops.items() if k not in DTYPE_BYTES or not v > 0}
        if bad or not self.flops:
            raise ValueError(f"Hardware.flops={self.flops!r} must map dtypes from {sorted(DTYPE_BYTES)} to "
                             "FLOP/s > 0")

    def peak_flops(self, dtype: str) -> float:
        if dtype not in self.flops:
            raise ValueError(f"dtype={dtype!r} has no FLOP rate on {self.name}; it has {sorted(self.flops)}")
        return self.flops[dtype]


HARDWARE = {
    # H100 SXM5 80GB: HBM3 3.35 TB/s, 989 TFLOP/s bf16/fp16 dense, 1979 fp8, NVLink 4 900 GB/s
    "H100-SXM": Hardware("H100-SXM", 80 * GB, 3.35 * TB,
                         {"bf16": 989 * TB, "fp16": 989 * TB, "fp8": 1979 * TB}, 900 * GB),
    # H200 SXM 141GB: HBM3e 4.8 TB/s, same compute as the H100
    "H200": Hardware("H200", 141 * GB, 4.8 * TB,
                     {"bf16": 989 * TB, "fp16": 989 * TB, "fp8": 1979 * TB}, 900 * GB),
    # A100 SXM4 80GB: HBM2e 2.039 TB/s, 312 TFLOP/s bf16/fp16 dense, no fp8, NVLink 3 600 GB/s
    "A100-80GB": Hardware("A100-80GB", 80 * GB, 2.039 * TB,
                          {"bf16": 312 * TB, "fp16": 312 * TB}, 600 * GB),
    # L4 24GB: GDDR6 300 GB/s, 121 TFLOP/s bf16/fp16 dense, 242 fp8, PCIe 4.0 x16 64 GB/s
    "L4": Hardware("L4", 24 * GB, 300 * GB,
                   {"bf16": 121 * TB, "fp16": 121 * TB, "fp8": 242 * TB}, 64 * GB),
}


def get_hardware(name: str) -> Hardware:
    if name not in HARDWARE:
        raise ValueError(f"hardware={name!r} is unknown; known: {', '.join(HARDWARE)} "
                         "(or measure_this_cpu())")
    return HARDWARE[name]


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

    Takes a few seconds; imports torch (only here)."""
    import torch

    from minivllm import course
    from minivllm.config import EngineConfig, ModelConfig
    from minivllm.engine.block_manager import BlockManager
    from minivllm.engine.scheduler import ScheduledChunk, SchedulerOutput
    from minivllm.engine.sequence import Sequence
    from minivllm.sampling_params import SamplingParams
    from minivllm.sim.cost_model import CostModel
    from minivllm.sim.model_specs import ModelSpec
    from minivllm.worker.model_runner import ModelRunner

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
    cfg = EngineConfig(model=folder, device="cpu", dtype="float32", block_size=16, num_kv_blocks=num_blocks)
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
