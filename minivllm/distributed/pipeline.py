"""Pipeline parallel: passing a micro-batch's hidden states from one stage to the next.

Rank ``r`` of stage ``p`` sends to the rank with the same tensor-parallel index in stage ``p + 1``
(every tensor-parallel rank holds the whole hidden state after its all-reduce). Sends do not block:
a stage starts its next micro-batch while the previous one travels, which is what keeps several
micro-batches in flight.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from minivllm.core.scheduler import ScheduledChunk
from minivllm.distributed.layout import RankLayout


def split_micro_batches(chunks: list[ScheduledChunk], pp_size: int) -> list[list[ScheduledChunk]]:
    """Up to ``pp_size`` contiguous groups of chunks with about equal token counts (each chunk is a
    different sequence, so the groups are independent and may run on different stages at once)."""
    total = sum(c.num_new_tokens for c in chunks)
    groups: list[list[ScheduledChunk]] = [[]]
    done = 0
    for c in chunks:
        if groups[-1] and len(groups) < pp_size and done >= total * len(groups) / pp_size:
            groups.append([])
        groups[-1].append(c)
        done += c.num_new_tokens
    return groups


class StageLink:
    """This rank's neighbours in the pipeline and the sends still in flight."""

    def __init__(self, layout: RankLayout):
        self.layout = layout
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []

    def receive(self, num_tokens: int, hidden_size: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The previous stage's ``(hidden, residual)`` for a micro-batch of ``num_tokens``."""
        src = self.layout.rank - self.layout.tp_size
        out = []
        for _ in range(2):
            t = torch.empty(num_tokens, hidden_size, dtype=dtype, device=device)
            dist.recv(t, src)
            out.append(t)
        return out[0], out[1]

    def send(self, tensors: tuple[torch.Tensor, torch.Tensor]) -> None:
        dst = self.layout.rank + self.layout.tp_size
        for t in tensors:
            t = t.contiguous()
            self.pending.append((dist.isend(t, dst), t))  # keep the tensor alive until it is sent

    def flush(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()
