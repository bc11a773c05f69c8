"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minivllm.distributed.parallel_state import tensor_parallel_group


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.shard_size = -(-num_embeddings // tp_size)
        self.vocab_start = tp_rank * self.shard_size
        self.num_embeddings = num_embeddings
        rows = min(self.shard_size, num_embeddings - self.vocab_start)
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        param.data.copy_(loaded.narrow(0, self.vocab_start, param.shape[0]))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.weight.shape[0])
        y = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * mine.unsqueeze(-1)
        dist.all_reduce(y, group=tensor_parallel_group())
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits over this rank's vocabulary slice, then gathers all slices."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.tp_size == 1:
            return logits
        parts = [torch.empty(hidden.shape[0], self.shard_size, dtype=logits.dtype, device=logits.device)
                 for _ in range(self.tp_size)]
        padded = F.pad(logits, (0, self.shard_size - logits.shape[1]))
        dist.all_gather(parts, padded, group=tensor_parallel_group())
        return torch.cat(parts, dim=-1)[:, :self.num_embeddings]
