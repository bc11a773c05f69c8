"""The paged KV cache's settings (vLLM's `CacheConfig`), shared by the engine and the simulator."""
from __future__ import annotations

from dataclasses import dataclass

from minivllm.config.parts import positive_int
from minivllm.core.block_manager import BlockManager, BlockManagerBase
from minivllm.core.radix_block_manager import RadixBlockManager

# the prefix caches `prefix_caching` names: vLLM's chained block hashes, SGLang's radix tree
PREFIX_CACHES: dict[str, type[BlockManagerBase]] = {"hash": BlockManager, "radix": RadixBlockManager}


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    prefix_caching: str = "hash"  # which prefix cache: "hash" (whole blocks) or "radix" (token by token)
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
        if not isinstance(self.prefix_caching, str) or self.prefix_caching not in PREFIX_CACHES:
            raise ValueError(f"prefix_caching={self.prefix_caching!r} must be one of {tuple(PREFIX_CACHES)}")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ValueError(f"gpu_memory_utilization={u!r} must be in (0, 1]")

    def make_block_manager(self, num_blocks: int) -> BlockManagerBase:
        """The block manager these settings choose, over ``num_blocks`` KV blocks: the engine's and
        the simulator's alike."""
        positive_int("num_blocks", num_blocks)
        return PREFIX_CACHES[self.prefix_caching](num_blocks, self.block_size, self.enable_prefix_caching)
