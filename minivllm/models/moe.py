"""The mixture-of-experts MLP of Qwen3-MoE, routed as transformers routes it.

A router (``gate``) scores every expert per token; each token goes to its ``num_experts_per_tok``
best (softmax in float32, optionally renormalised over the chosen ones), and the block's output is
the routing-weighted sum of those experts' SwiGLU MLPs.

Across ranks, two ways (``enable_expert_parallel``):

* tensor parallel: every rank holds every expert, each split Megatron-style (gate/up by columns,
  down by rows);
* expert parallel: each rank holds whole experts, ``num_experts / tp_size`` of them, contiguous.

Either way a rank's output is a partial sum (of shards, or of experts) and one all-reduce over the
tensor-parallel group completes it: one collective per MoE layer, like the dense MLP's down_proj.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minivllm.config.model import ModelConfig
from minivllm.distributed.parallel_state import tensor_parallel_group
from minivllm.layers.activation import SiluAndMul
from minivllm.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class Expert(nn.Module):
    """One expert's SwiGLU MLP (or this rank's shard of it), named as in the checkpoint."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp_rank: int, tp_size: int):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2,
                                                       tp_rank=tp_rank, tp_size=tp_size)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp_rank=tp_rank, tp_size=tp_size)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the down projection without its own all-reduce: the block reduces the sum of all experts once
        return F.linear(self.act(self.gate_up_proj(x)), self.down_proj.weight)


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_rank: int, tp_size: int, expert_parallel: bool):
        super().__init__()
        n = cfg.num_experts
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, n, bias=False)  # the router, on every rank
        if expert_parallel:
            per_rank = n // tp_size
            self.local_experts = range(tp_rank * per_rank, (tp_rank + 1) * per_rank)
            shard = (0, 1)  # whole experts
        else:
            self.local_experts, shard = range(n), (tp_rank, tp_size)
        # other ranks' experts are parameter-free placeholders, so that expert e keeps its checkpoint name
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, cfg.moe_intermediate_size, *shard)
                                     if e in self.local_experts else nn.Identity() for e in range(n))
        self.reduce = tp_size > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [tokens, top_k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e in self.local_experts:
            tokens, slot = torch.where(chosen == e)
            if tokens.numel():
                out.index_add_(0, tokens, self.experts[e](x[tokens]) * weights[tokens, slot, None])
        if self.reduce:
            dist.all_reduce(out, group=tensor_parallel_group())
        return out
