"""Engine and model configuration, validated when built."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
           "half": torch.float16, "float": torch.float32}


@dataclass
class EngineConfig:
    """Everything `LLM(...)` accepts besides the model folder; names and defaults follow vLLM."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes, on the CPU
    num_kv_blocks: int | None = None  # overrides the computed cache size
    seed: int = 0
    batching_policy: str = "continuous"  # or "static", the course's baseline

    def __post_init__(self) -> None:
        _positive_int(self, "block_size")
        _positive_int(self, "max_num_seqs")
        _positive_int(self, "max_num_batched_tokens")
        if self.max_model_len is not None:
            _positive_int(self, "max_model_len")
        if self.num_kv_blocks is not None:
            _positive_int(self, "num_kv_blocks")
        if self.kv_cache_memory is not None:
            _positive_int(self, "kv_cache_memory")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization!r} must be in (0, 1]")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be 'auto' or one of {sorted(_DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an int")
        if self.batching_policy not in ("continuous", "static"):
            raise ValueError(f"batching_policy={self.batching_policy!r} must be 'continuous' or 'static'")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def _positive_int(cfg: object, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int >= 1")


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
    torch_dtype: torch.dtype = torch.float32
    eos_token_ids: tuple[int, ...] = ()

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
            torch_dtype=_DTYPES.get(str(dtype_name), torch.float32), eos_token_ids=eos_ids)


def resolve_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: float32 on the CPU (fast and exact there); on CUDA the checkpoint's dtype, with
    float32 checkpoints served in bfloat16."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if model_dtype == torch.float32 else model_dtype
