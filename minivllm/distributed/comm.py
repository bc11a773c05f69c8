"""Counting the collectives a rank calls while it runs the model.

The layers call ``torch.distributed`` directly (``minivllm/layers``); while `count_collectives` is
active those functions are wrapped, so every call is counted whichever layer makes it, a learner's
included, and nothing outside the forward pass (setup, the driver's messages) is.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

from minivllm.core.records import CollectiveCount

# torch.distributed function -> (the op it is counted as, position of the payload argument)
COUNTED = {"all_reduce": ("all_reduce", 0), "all_gather": ("all_gather", 1), "broadcast": ("broadcast", 0),
           "send": ("send", 0), "isend": ("send", 0), "recv": ("recv", 0), "irecv": ("recv", 0)}


@contextmanager
def count_collectives() -> Iterator[dict[str, list[int]]]:
    """Yields ``{op: [calls, bytes]}``, filled in as the collectives run."""
    counts: dict[str, list[int]] = {}
    originals = {fn: getattr(dist, fn) for fn in COUNTED}

    def counted(fn: str):
        original = originals[fn]
        op, arg = COUNTED[fn]

        def call(*args, **kwargs):
            tensor: torch.Tensor = args[arg] if len(args) > arg else kwargs["tensor"]
            entry = counts.setdefault(op, [0, 0])
            entry[0] += 1
            entry[1] += tensor.numel() * tensor.element_size()
            return original(*args, **kwargs)
        return call

    for fn in COUNTED:
        setattr(dist, fn, counted(fn))
    try:
        yield counts
    finally:
        for fn, original in originals.items():
            setattr(dist, fn, original)


def as_records(counts: dict[str, list[int]]) -> tuple[CollectiveCount, ...]:
    return tuple(CollectiveCount(op, calls, nbytes) for op, (calls, nbytes) in sorted(counts.items()))


def smallest_across_ranks(value: int, device: torch.device) -> int:
    """The minimum of ``value`` over every rank of the process group (ranks with fewer layers or less
    free memory could afford more KV blocks than others; all must use the same count)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
