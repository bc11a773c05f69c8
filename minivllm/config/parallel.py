"""How the model is split over processes (vLLM's `ParallelConfig`), and how a pipeline splits its
layers: shared by the workers, which load their stage's layers, and by the planner and simulator,
which cost them (no torch; the checks that need the devices are `EngineConfig`'s)."""
from __future__ import annotations

from dataclasses import dataclass

from minivllm.config.parts import positive_int


@dataclass(frozen=True)
class ParallelConfig:
    """One process per rank once any size is above 1 (`minivllm.executor`)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    distributed_backend: str = "auto"  # "gloo" or "nccl"; auto: nccl on CUDA, gloo on the CPU

    def __post_init__(self) -> None:
        """The sizes that need no model; `minivllm.distributed.layout` checks them against the model."""
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            positive_int(name, getattr(self, name))
        if not isinstance(self.enable_expert_parallel, bool):
            raise ValueError(f"enable_expert_parallel={self.enable_expert_parallel!r} must be a bool")
        if self.distributed_backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"distributed_backend={self.distributed_backend!r} must be 'auto', 'gloo' or 'nccl'")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size


def pipeline_stages(num_layers: int, pp: int) -> tuple[int, ...]:
    """Layers per stage: ``num_layers // pp`` each, the remainder one each on the stages before the
    last, from the second-to-last backwards (vLLM's `get_pp_indices`)."""
    if not 1 <= pp <= num_layers:
        raise ValueError(f"ParallelLayout.pp={pp} must be between 1 and the model's num_layers={num_layers}")
    stages = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        stages[-i] += 1
    return tuple(stages)
