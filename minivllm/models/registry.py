"""Which Hugging Face architecture is served by which model class."""
from __future__ import annotations

from dataclasses import replace

from minivllm.config.model import ModelConfig
from minivllm.layers.linear import check_row_parallel_linear_class
from minivllm.models.llama import DecoderForCausalLM, Variant

ARCHITECTURES: dict[str, Variant] = {
    "LlamaForCausalLM": Variant(),
    "Qwen2ForCausalLM": Variant(qkv_bias=True),
    "Qwen3ForCausalLM": Variant(qk_norm=True),
    "Qwen3MoeForCausalLM": Variant(qk_norm=True),  # its MoE layers follow from ModelConfig.num_experts
}


def build_model(cfg: ModelConfig, tp_rank: int = 0, tp_size: int = 1, layers: range | None = None,
                expert_parallel: bool = False, row_parallel_linear_class: type | None = None) -> DecoderForCausalLM:
    variant = ARCHITECTURES.get(cfg.architecture)
    if variant is None:
        raise ValueError(f"architectures=[{cfg.architecture!r}] is not supported; "
                         f"supported: {sorted(ARCHITECTURES)}")
    if row_parallel_linear_class is not None:
        check_row_parallel_linear_class(row_parallel_linear_class)
        variant = replace(variant, row_parallel_linear=row_parallel_linear_class)
    return DecoderForCausalLM(cfg, variant, tp_rank, tp_size, layers, expert_parallel)
