"""The engine's configuration (`LLM(model, **kwargs)`), validated when built."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, fields

import torch

from minivllm.config.model import DTYPE_ALIASES
from minivllm.config.speculative import SpeculativeConfig
from minivllm.core.block_manager import BlockManager, BlockManagerBase
from minivllm.core.policy import SchedulingPolicy, make_policy

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
        if self.dtype != "auto" and self.dtype not in DTYPE_ALIASES:
            raise ValueError(f"dtype={self.dtype!r} must be 'auto' or one of {sorted(DTYPE_ALIASES)}")
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
                             "minivllm.core.block_manager.BlockManagerBase")

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


def resolve_dtype(name: str, model_dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on the CPU (fast and exact there); on CUDA the checkpoint's dtype
    (``ModelConfig.dtype``), with float32 checkpoints served in bfloat16."""
    if name != "auto":
        return _TORCH_DTYPES[DTYPE_ALIASES[name]]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if model_dtype == "float32" else _TORCH_DTYPES[model_dtype]
