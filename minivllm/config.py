"""Engine and model configuration, validated when built."""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field, fields

import torch

from minivllm.engine.block_manager import BlockManager, BlockManagerBase
from minivllm.engine.policy import SchedulingPolicy, make_policy
from minivllm.spec_decode.config import SpeculativeConfig

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
    batching_policy: str | SchedulingPolicy = "continuous"  # "static": the course's baseline; exercise 04 plugs its own in
    attention_backend: str = "auto"  # "torch" (reference), "triton" (kernels/); auto: triton on CUDA
    block_manager_class: type = BlockManager  # exercise 02 plugs a learner's subclass in here
    # parallelism (minivllm/distributed/): one process per rank once any size is above 1
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    distributed_backend: str = "auto"  # "gloo" or "nccl"; auto: nccl on CUDA, gloo on the CPU
    speculative_config: SpeculativeConfig | dict | None = None  # a dict is validated into the dataclass

    @classmethod
    def from_args(cls, model: str, **engine_args) -> "EngineConfig":
        """`LLM(model, **engine_args)`: an unknown argument is a ValueError that names it."""
        known = [f.name for f in fields(cls) if f.name != "model"]
        unknown = sorted(set(engine_args) - set(known))
        if unknown:
            raise ValueError(f"unknown engine argument(s) {', '.join(unknown)}; LLM accepts {', '.join(known)}")
        return cls(model=model, **engine_args)

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
        make_policy(self.batching_policy)  # raises ValueError on anything but a name or a SchedulingPolicy
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend={self.attention_backend!r} must be 'auto', 'torch' or 'triton'")
        if self.attention_backend == "triton":
            if importlib.util.find_spec("triton") is None:
                raise ValueError("attention_backend='triton' but triton is not installed")
            if self.torch_device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("attention_backend='triton' on the CPU runs only in the Triton interpreter: "
                                 "set TRITON_INTERPRET=1 before the kernels are imported")
        self._check_parallel()
        if isinstance(self.speculative_config, dict):
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        if self.speculative_config is not None:
            if not isinstance(self.speculative_config, SpeculativeConfig):
                raise ValueError(f"speculative_config={self.speculative_config!r} must be a dict or a SpeculativeConfig")
            if self.world_size > 1:
                raise ValueError(f"speculative_config needs a single process, but the parallel sizes give "
                                 f"{self.world_size} ranks")
        cls = self.block_manager_class
        if not (isinstance(cls, type) and issubclass(cls, BlockManagerBase)):
            raise ValueError(f"block_manager_class={cls!r} must be a subclass of "
                             "minivllm.engine.block_manager.BlockManagerBase")

    def _check_parallel(self) -> None:
        """The sizes that need no model; `minivllm.distributed.layout` checks them against the model."""
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            _positive_int(self, name)
        if not isinstance(self.enable_expert_parallel, bool):
            raise ValueError(f"enable_expert_parallel={self.enable_expert_parallel!r} must be a bool")
        if self.distributed_backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"distributed_backend={self.distributed_backend!r} must be 'auto', 'gloo' or 'nccl'")
        cuda = self.torch_device.type == "cuda"
        if self.distributed_backend == "nccl" and not cuda:
            raise ValueError(f"distributed_backend='nccl' needs CUDA, but device={self.device!r}")
        if cuda and self.world_size > 1:
            if self.device not in ("auto", "cuda"):
                raise ValueError(f"device={self.device!r}: with {self.world_size} ranks use device='cuda' "
                                 "(rank i runs on cuda:i)")
            visible = torch.cuda.device_count()
            if self.world_size > visible:
                raise ValueError(f"tensor_parallel_size x pipeline_parallel_size x data_parallel_size = "
                                 f"{self.world_size} ranks, but only {visible} CUDA devices are visible")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size

    @property
    def resolved_distributed_backend(self) -> str:
        if self.distributed_backend != "auto":
            return self.distributed_backend
        return "nccl" if self.torch_device.type == "cuda" else "gloo"

    @property
    def resolved_attention_backend(self) -> str:
        """``auto``: the Triton kernels on CUDA when triton is installed, else the torch reference."""
        if self.attention_backend != "auto":
            return self.attention_backend
        cuda = self.torch_device.type == "cuda"
        return "triton" if cuda and importlib.util.find_spec("triton") is not None else "torch"

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
            torch_dtype=_DTYPES.get(str(dtype_name), torch.float32), eos_token_ids=eos_ids,
            num_experts=raw.get("num_experts") or raw.get("num_local_experts") or 0,
            num_experts_per_tok=raw.get("num_experts_per_tok", 0),
            moe_intermediate_size=raw.get("moe_intermediate_size", 0),
            norm_topk_prob=raw.get("norm_topk_prob", False), decoder_sparse_step=raw.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()))


def resolve_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: float32 on the CPU (fast and exact there); on CUDA the checkpoint's dtype, with
    float32 checkpoints served in bfloat16."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if model_dtype == torch.float32 else model_dtype
