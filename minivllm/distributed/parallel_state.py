"""The tensor-parallel process group of this process, for the layers' collectives.

With tensor parallel alone the group is the whole world (``None``: torch's default group). With
pipeline parallel too, each stage's ranks form their own group: an all-reduce must sum over the
ranks holding shards of the same layer, never across stages.
"""
from __future__ import annotations

import torch.distributed as dist

_tensor_parallel_group: dist.ProcessGroup | None = None


def tensor_parallel_group() -> dist.ProcessGroup | None:
    return _tensor_parallel_group


def init_tensor_parallel_groups(tp_size: int, pp_size: int, pp_rank: int) -> None:
    """Make one group per pipeline stage (every rank takes part in making each) and keep this rank's."""
    global _tensor_parallel_group
    if pp_size == 1:
        return
    for stage in range(pp_size):
        group = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)))
        if stage == pp_rank:
            _tensor_parallel_group = group
