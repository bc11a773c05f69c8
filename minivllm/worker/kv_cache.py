"""How many KV blocks the cache gets, and the cache tensor itself."""
from __future__ import annotations

import logging

import torch

from minivllm.config.engine import EngineConfig
from minivllm.config.model import ModelConfig
from minivllm.distributed.layout import RankLayout

logger = logging.getLogger("minivllm")

DEFAULT_CPU_KV_CACHE_BYTES = 4 << 30  # cap when kv_cache_memory is not given on the CPU


def bytes_per_block(mc: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1,
                    num_layers: int | None = None) -> int:
    """K and V, every layer (of this pipeline stage: ``num_layers``), ``block_size`` tokens, this
    rank's KV heads."""
    kv_heads = mc.num_key_value_heads // tp_size
    layers = mc.num_hidden_layers if num_layers is None else num_layers
    return 2 * layers * block_size * kv_heads * mc.head_dim * dtype.itemsize


def choose_num_blocks(cfg: EngineConfig, mc: ModelConfig, max_model_len: int, dtype: torch.dtype,
                      device: torch.device, peak_forward_bytes: int | None = None,
                      layout: RankLayout = RankLayout()) -> int:
    """``num_kv_blocks`` if given; on CUDA what ``gpu_memory_utilization`` leaves after the weights and
    a profiled forward pass (``peak_forward_bytes``); on the CPU ``kv_cache_memory`` bytes (default:
    enough for ``max_num_seqs`` requests at ``max_model_len``, at most 4 GiB). Budgets are per rank: a
    rank holds only its KV heads (tensor parallel) of its layers (pipeline parallel)."""
    cache = cfg.cache_config
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    per_block = bytes_per_block(mc, cache.block_size, dtype, layout.tp_size,
                                len(layout.stage_layers(mc.num_hidden_layers)))
    if device.type == "cuda":
        total = torch.cuda.mem_get_info(device)[1]
        budget = int(total * cache.gpu_memory_utilization) - (peak_forward_bytes or 0)
        source = f"gpu_memory_utilization={cache.gpu_memory_utilization}"
    elif cache.kv_cache_memory is not None:
        budget, source = cache.kv_cache_memory, f"kv_cache_memory={cache.kv_cache_memory}"
    else:
        wanted = -(-cfg.scheduler_config.max_num_seqs * max_model_len // cache.block_size) * per_block
        budget, source = min(wanted, DEFAULT_CPU_KV_CACHE_BYTES), "the CPU default"
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ValueError(f"{source} leaves {budget} bytes for the KV cache, less than one block "
                         f"({per_block} bytes)")
    return num_blocks


def allocate_kv_cache(mc: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device, layout: RankLayout = RankLayout()) -> torch.Tensor:
    """``[2 (K, V), layers, slots, kv_heads, head_dim]`` for this rank's layers and KV heads, zeroed so
    that padding reads stay finite."""
    layers = len(layout.stage_layers(mc.num_hidden_layers))
    return torch.zeros(2, layers, num_blocks * block_size, mc.num_key_value_heads // layout.tp_size,
                       mc.head_dim, dtype=dtype, device=device)
