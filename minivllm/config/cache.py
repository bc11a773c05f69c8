"""The paged KV cache's settings (vLLM's `CacheConfig`), shared by the engine and the simulator."""
from __future__ import annotations

from dataclasses import dataclass

from minivllm.config.parts import positive_int


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes, on the CPU (the engine only)
    num_kv_blocks: int | None = None  # overrides the computed cache size

    def __post_init__(self) -> None:
        positive_int("block_size", self.block_size)
        for name in ("kv_cache_memory", "num_kv_blocks"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching={self.enable_prefix_caching!r} must be a bool")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ValueError(f"gpu_memory_utilization={u!r} must be in (0, 1]")
