"""The parts of a Hugging Face checkpoint's ``config.json`` the engine and the simulator need.

No torch: the simulator (``ModelSpec.from_folder``) reads checkpoints through this too.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

# dtype names a checkpoint or a user may give, to their canonical names
DTYPE_ALIASES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32",
                 "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


@dataclass
class ModelConfig:
    """The parts of a Hugging Face ``config.json`` that the engine's models need."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_parameters: dict = field(default_factory=dict)  # rope_theta, rope_type and its settings
    attention_bias: bool = False
    mlp_bias: bool = False
    dtype: str = "float32"  # the checkpoint's, canonical name (a key of DTYPE_ALIASES' values)
    eos_token_ids: tuple[int, ...] = ()
    # mixture of experts (Qwen3-MoE); num_experts == 0: every layer has a dense MLP
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_moe_layer(self, index: int) -> bool:
        """Which layers have experts, as transformers decides it for Qwen3-MoE."""
        return (self.num_experts > 0 and index not in self.mlp_only_layers
                and (index + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_folder(cls, folder: str) -> "ModelConfig":
        with open(os.path.join(folder, "config.json")) as f:
            raw = json.load(f)
        archs = raw.get("architectures") or [raw.get("model_type", "?")]
        heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id")
        gen_path = os.path.join(folder, "generation_config.json")
        if os.path.exists(gen_path):  # generation_config's eos list wins, as in transformers
            with open(gen_path) as f:
                eos = json.load(f).get("eos_token_id", eos)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
        rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
        dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        return cls(
            architecture=archs[0], vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False), rope_parameters=rope,
            attention_bias=raw.get("attention_bias", False), mlp_bias=raw.get("mlp_bias", False),
            dtype=DTYPE_ALIASES.get(str(dtype_name), "float32"), eos_token_ids=eos_ids,
            num_experts=raw.get("num_experts") or raw.get("num_local_experts") or 0,
            num_experts_per_tok=raw.get("num_experts_per_tok", 0),
            moe_intermediate_size=raw.get("moe_intermediate_size", 0),
            norm_topk_prob=raw.get("norm_topk_prob", False), decoder_sparse_step=raw.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()))
