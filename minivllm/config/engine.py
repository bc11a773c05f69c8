"""The engine's configuration (`LLM(model, **kwargs)`), validated when built."""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch

from minivllm.config.cache import CacheConfig
from minivllm.config.model import DTYPE_ALIASES
from minivllm.config.parallel import ParallelConfig
from minivllm.config.parts import split_args
from minivllm.config.scheduler import SchedulerConfig
from minivllm.config.speculative import SpeculativeConfig
from minivllm.core.block_manager import BlockManager, BlockManagerBase

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EngineConfig:
    """Everything `LLM(model, **engine_args)` accepts, in vLLM's parts: the settings of the model and
    its device here, then the cache, scheduler, parallel and speculative configs. ``from_args`` takes
    vLLM's flat names (``block_size=...``, ``max_num_seqs=...``) and routes each to its part."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    attention_backend: str = "auto"  # "torch" (reference), "triton" (kernels/); auto: triton on CUDA
    # The door for a learner's own piece (the exercises): each replaces the engine's stock one.
    # batching_policy, the fifth, is the scheduler part's (the simulator takes it too).
    sampler: Callable | None = None  # (logits, params, generators, default_generator) -> tokens; None: Sampler()
    block_manager_class: type = BlockManager  # a BlockManagerBase subclass
    rejection_sampler: Callable | None = None  # (draft_tokens, draft_probs, target_probs, generator) -> tokens
    row_parallel_linear_class: type | None = None  # a RowParallelLinear subclass (make_executor checks); None: stock
    detokenizer_class: type | None = None  # an IncrementalDetokenizer subclass (the engine checks); None: stock
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    speculative_config: SpeculativeConfig | None = None

    @classmethod
    def from_args(cls, model: str, **engine_args) -> "EngineConfig":
        """`LLM(model, **engine_args)`: an unknown argument is a ValueError that names it;
        ``speculative_config`` may be a dict (validated into a `SpeculativeConfig`)."""
        own = [f.name for f in fields(cls) if f.name != "model" and f.name not in _PARTS]
        parts = split_args(engine_args, _PARTS, own, "LLM")
        top = {name: engine_args[name] for name in own if name in engine_args}
        if isinstance(top.get("speculative_config"), dict):
            top["speculative_config"] = SpeculativeConfig.from_dict(top["speculative_config"])
        return cls(model=model, **top, **{part: _PARTS[part](**values) for part, values in parts.items()})

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPE_ALIASES:
            raise ValueError(f"dtype={self.dtype!r} must be 'auto' or one of {sorted(DTYPE_ALIASES)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an int")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend={self.attention_backend!r} must be 'auto', 'torch' or 'triton'")
        if self.attention_backend == "triton":
            if importlib.util.find_spec("triton") is None:
                raise ValueError("attention_backend='triton' but triton is not installed")
            if self.torch_device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("attention_backend='triton' on the CPU runs only in the Triton interpreter: "
                                 "set TRITON_INTERPRET=1 before the kernels are imported")
        for part, cls in _PARTS.items():
            if not isinstance(getattr(self, part), cls):
                raise ValueError(f"{part}={getattr(self, part)!r} must be a {cls.__name__}")
        self._check_devices()
        if self.speculative_config is not None:
            if not isinstance(self.speculative_config, SpeculativeConfig):
                raise ValueError(f"speculative_config={self.speculative_config!r} must be a dict or a SpeculativeConfig")
            if self.world_size > 1:
                raise ValueError(f"speculative_config needs a single process, but the parallel sizes give "
                                 f"{self.world_size} ranks")
        self._check_plugged_pieces()

    def _check_plugged_pieces(self) -> None:
        for name in ("sampler", "rejection_sampler"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a function (or None for the stock one)")
        if self.rejection_sampler is not None and self.speculative_config is None:
            raise ValueError("rejection_sampler is used only with speculative_config: set both")
        cls = self.block_manager_class
        if not (isinstance(cls, type) and issubclass(cls, BlockManagerBase)):
            raise ValueError(f"block_manager_class={cls!r} must be a subclass of "
                             "minivllm.core.block_manager.BlockManagerBase")

    def _check_devices(self) -> None:
        """The parallel settings against the devices this machine has."""
        cuda = self.torch_device.type == "cuda"
        if self.parallel_config.distributed_backend == "nccl" and not cuda:
            raise ValueError(f"distributed_backend='nccl' needs CUDA, but device={self.device!r}")
        if cuda and self.world_size > 1:
            if self.device not in ("auto", "cuda"):
                raise ValueError(f"device={self.device!r}: with {self.world_size} ranks use device='cuda' "
                                 "(rank i runs on cuda:i)")
            visible = torch.cuda.device_count()
            if self.world_size > visible:
                raise ValueError(f"tensor_parallel_size x pipeline_parallel_size x data_parallel_size = "
                                 f"{self.world_size} ranks, but only {visible} CUDA devices are visible")

    def for_workers(self) -> "EngineConfig":
        """This config as the worker processes get it: they never allocate blocks or schedule, so the
        block manager class, the batching policy and the detokenizer stay with the driver (a learner's, defined in a
        notebook, could not be pickled to them); the sampler and the row-parallel layer go along."""
        return replace(self, block_manager_class=BlockManager, detokenizer_class=None,
                       scheduler_config=replace(self.scheduler_config, batching_policy="continuous"))

    @property
    def world_size(self) -> int:
        return self.parallel_config.world_size

    @property
    def resolved_distributed_backend(self) -> str:
        if self.parallel_config.distributed_backend != "auto":
            return self.parallel_config.distributed_backend
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


# the parts LLM's flat arguments are routed to (speculative_config is given whole, as in vLLM)
_PARTS = {"cache_config": CacheConfig, "scheduler_config": SchedulerConfig, "parallel_config": ParallelConfig}


def resolve_dtype(name: str, model_dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on the CPU (fast and exact there); on CUDA the checkpoint's dtype
    (``ModelConfig.dtype``), with float32 checkpoints served in bfloat16."""
    if name != "auto":
        return _TORCH_DTYPES[DTYPE_ALIASES[name]]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if model_dtype == "float32" else _TORCH_DTYPES[model_dtype]
