"""Accelerators the simulator can run on: memory, memory bandwidth, dense FLOPs per dtype.

The GPU numbers are the vendors' public datasheet figures (dense, i.e. without 2:4 sparsity; SXM
parts where both exist). ``step_overhead`` is the time a step costs besides the model itself
(scheduling, kernel launches) and ``seq_overhead`` what each scheduled request adds to it (input
preparation, its attention call, sampling); for the GPUs they are assumptions of the order a
CUDA-graph engine reaches. "This CPU" is measured instead: `minivllm.benchmarks.sim_calibration.measure_this_cpu`
times the real model runner on a model and fits the same numbers.

The GPU profiles therefore predict a vLLM-class engine, not minivllm's own eager one. Measured on an
H200 (Qwen3-0.6B shape, 256 requests of 512 + 128 tokens, Triton attention): minivllm took 50 ms a
step, where the H200 profile predicts 3.7 ms; the roofline part is about 5 % of the real step.
"""
from __future__ import annotations

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
                         "(or minivllm.benchmarks.sim_calibration.measure_this_cpu())")
    return HARDWARE[name]
