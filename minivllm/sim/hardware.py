"""Accelerators the simulator can run on: memory, memory bandwidth, dense FLOPs per dtype, links.

Bandwidths and FLOP rates are the vendors' public datasheet figures (dense, i.e. without 2:4
sparsity; SXM parts where both exist). Memory is what the device exposes to CUDA
(``torch.cuda.mem_get_info``'s total, the ``total_gpu_memory`` vLLM logs), not the datasheet's
round number: an H100 "80 GB" shows 79.11 GiB (84.9e9 bytes), an H200 "141 GB" 139.81 GiB
(150.1e9 bytes). The simulator once took 141e9 bytes for the H200 and predicted 68,505 KV blocks
where a real run (Qwen3-0.6B shape, block size 16) had 72,527: 6.5 % more memory than the datasheet
figure, less what the engine's profiled forward pass keeps (the planner now subtracts both).
``non_torch_bytes`` is the memory CUDA itself holds outside PyTorch's allocator (context, cuBLAS
workspaces): vLLM logs 0.05-0.65 GiB on one GPU; 0.35 GiB is taken here.

GPUs within a node (``node_size`` of them) talk over ``interconnect_bandwidth`` (NVLink or PCIe,
the datasheet's figure, which counts both directions); nodes over ``network_bandwidth`` per GPU,
one direction (a 400 Gb/s InfiniBand NIC per GPU is 50 GB/s). Every collective call also costs a
latency (``link_latency`` inside a node, ``network_latency`` between nodes): assumptions of the
order NCCL reaches for small messages. ``launch_overhead`` is the host's cost of launching one
kernel, which CUDA graphs remove (the simulator's ``cuda_graphs=False`` pays it).

``step_overhead`` is the time a step costs besides the model itself
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
    interconnect_bandwidth: float = 0.0  # bytes/s between two devices of a node (NVLink, PCIe), both directions
    step_overhead: float = 1e-3  # seconds per step besides the model
    seq_overhead: float = 0.0  # seconds per scheduled request (chunk) besides the model
    non_torch_bytes: float = 0.0  # memory CUDA holds outside PyTorch (context, workspaces)
    node_size: int = 8  # devices per node, joined by the interconnect
    network_bandwidth: float = 0.0  # bytes/s per device between nodes, one direction
    link_latency: float = 0.0  # seconds per collective call inside a node
    network_latency: float = 0.0  # seconds per collective call between nodes
    launch_overhead: float = 0.0  # seconds to launch one kernel without CUDA graphs

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "memory_bandwidth"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"Hardware.{name}={value!r} must be > 0")
        if self.interconnect_bandwidth < 0:
            raise ValueError(f"Hardware.interconnect_bandwidth={self.interconnect_bandwidth!r} must be >= 0")
        for name in ("step_overhead", "seq_overhead", "non_torch_bytes", "network_bandwidth", "link_latency",
                     "network_latency", "launch_overhead"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Hardware.{name}={getattr(self, name)!r} must be >= 0")
        if isinstance(self.node_size, bool) or not isinstance(self.node_size, int) or self.node_size < 1:
            raise ValueError(f"Hardware.node_size={self.node_size!r} must be an int >= 1")
        bad = {k: v for k, v in self.flops.items() if k not in DTYPE_BYTES or not v > 0}
        if bad or not self.flops:
            raise ValueError(f"Hardware.flops={self.flops!r} must map dtypes from {sorted(DTYPE_BYTES)} to "
                             "FLOP/s > 0")

    def peak_flops(self, dtype: str) -> float:
        if dtype not in self.flops:
            raise ValueError(f"dtype={dtype!r} has no FLOP rate on {self.name}; it has {sorted(self.flops)}")
        return self.flops[dtype]

    def link(self, spans_nodes: bool) -> tuple[float, float]:
        """(bytes/s one direction, seconds per call) between two of its GPUs: the network's across
        nodes; inside a node the interconnect's, half its datasheet figure (which counts both directions)."""
        if spans_nodes:
            return self.network_bandwidth, self.network_latency
        return self.interconnect_bandwidth / 2, self.link_latency


def kv_dtype_of(dtype: str, kv_cache_dtype: str | None) -> str:
    """The KV cache's dtype: ``kv_cache_dtype``, or the weights' ``dtype`` for None or ``"auto"``."""
    kv_dtype = dtype if kv_cache_dtype in (None, "auto") else kv_cache_dtype
    if kv_dtype not in DTYPE_BYTES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} must be 'auto' or one of {sorted(DTYPE_BYTES)}")
    return kv_dtype


GiB = 2 ** 30
# Links and latencies common to the NVLink nodes (8 GPUs, 400 Gb/s InfiniBand per GPU between nodes)
_NVLINK_NODE = dict(node_size=8, network_bandwidth=50 * GB, link_latency=10e-6, network_latency=25e-6,
                    launch_overhead=4.5e-6, non_torch_bytes=0.35 * GiB)

HARDWARE = {
    # H100 SXM5 80GB: HBM3 3.35 TB/s, 989 TFLOP/s bf16/fp16 dense, 1979 fp8, NVLink 4 900 GB/s;
    # 79.11 GiB exposed (vLLM's log for Llama-3.1-8B on an H100)
    "H100-SXM": Hardware("H100-SXM", 79.11 * GiB, 3.35 * TB,
                         {"bf16": 989 * TB, "fp16": 989 * TB, "fp8": 1979 * TB}, 900 * GB, **_NVLINK_NODE),
    # H200 SXM 141GB: HBM3e 4.8 TB/s, same compute as the H100; 139.81 GiB exposed
    "H200": Hardware("H200", 139.81 * GiB, 4.8 * TB,
                     {"bf16": 989 * TB, "fp16": 989 * TB, "fp8": 1979 * TB}, 900 * GB, **_NVLINK_NODE),
    # A100 SXM4 80GB: HBM2e 2.039 TB/s, 312 TFLOP/s bf16/fp16 dense, no fp8, NVLink 3 600 GB/s;
    # 79.15 GiB exposed
    "A100-80GB": Hardware("A100-80GB", 79.15 * GiB, 2.039 * TB,
                          {"bf16": 312 * TB, "fp16": 312 * TB}, 600 * GB, **_NVLINK_NODE),
    # L4 24GB: GDDR6 300 GB/s, 121 TFLOP/s bf16/fp16 dense, 242 fp8, PCIe 4.0 x16 64 GB/s; 22.06 GiB
    # exposed; 8 per node on 100 Gb/s Ethernet (12.5 GB/s)
    "L4": Hardware("L4", 22.06 * GiB, 300 * GB, {"bf16": 121 * TB, "fp16": 121 * TB, "fp8": 242 * TB}, 64 * GB,
                   node_size=8, network_bandwidth=12.5 * GB, link_latency=15e-6, network_latency=30e-6,
                   launch_overhead=4.5e-6, non_torch_bytes=0.05 * GiB),
}


def get_hardware(name: str) -> Hardware:
    if name not in HARDWARE:
        raise ValueError(f"hardware={name!r} is unknown; known: {', '.join(HARDWARE)} "
                         "(or minivllm.benchmarks.sim_calibration.measure_this_cpu())")
    return HARDWARE[name]
