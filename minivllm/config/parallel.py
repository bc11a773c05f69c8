"""How a pipeline splits a model's layers: shared by the distributed workers, which load their
stage's layers, and by the planner and simulator, which cost them (no torch)."""
from __future__ import annotations


def pipeline_stages(num_layers: int, pp: int) -> tuple[int, ...]:
    """Layers per stage: ``num_layers // pp`` each, the remainder one each on the stages before the
    last, from the second-to-last backwards (vLLM's `get_pp_indices`)."""
    if not 1 <= pp <= num_layers:
        raise ValueError(f"ParallelLayout.pp={pp} must be between 1 and the model's num_layers={num_layers}")
    stages = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        stages[-i] += 1
    return tuple(stages)
