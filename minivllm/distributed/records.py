"""What one rank sent and received in one step: the communication part of the step trace.

Pure Python, so the trace and the planner can read it without torch.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CollectiveCount:
    """``calls`` to one collective in a step, and the payload ``bytes`` this rank handed to them:
    the tensor reduced (all_reduce), this rank's own shard (all_gather), the tensor sent or received
    (send, recv). Not the bytes a ring algorithm puts on the wire (an all-reduce of S bytes over n
    ranks moves about 2 (n - 1) / n x S per rank)."""

    op: str
    calls: int
    bytes: int


@dataclass(frozen=True)
class RankComm:
    rank: int  # within its data-parallel replica: pp_rank * tp_size + tp_rank
    tp_rank: int
    pp_rank: int
    collectives: tuple[CollectiveCount, ...]  # sorted by op

    def calls(self, op: str) -> int:
        return sum(c.calls for c in self.collectives if c.op == op)

    def bytes(self, op: str) -> int:
        return sum(c.bytes for c in self.collectives if c.op == op)
