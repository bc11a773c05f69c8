"""Linear layers written for tensor parallelism (Megatron style).

Each rank holds a shard of the weight; the weight loader cuts the full checkpoint tensor down to
this rank's shard. With ``tp_size == 1`` (one process) the shard is the whole weight.

* column parallel: the output features are split; no communication in the forward.
* row parallel: the input features are split; partial outputs are summed by one all-reduce.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minivllm.distributed.parallel_state import tensor_parallel_group


class ColumnParallelLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if output_size % tp_size:
            raise ValueError(f"output_size={output_size} is not divisible by tp_size={tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(torch.empty(output_size // tp_size, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size // tp_size), requires_grad=False) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        shard = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp_rank * shard, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul
    (gate and up of the MLP). ``shard_id`` is the index of the projection being loaded."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp_size)
        self.output_sizes = output_sizes

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """The q, k and v projections fused; each rank gets its own query heads and KV heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        if num_heads % tp_size or num_kv_heads % tp_size:
            raise ValueError(f"num_heads={num_heads} and num_kv_heads={num_kv_heads} must be "
                             f"divisible by tp_size={tp_size}")
        self.head_dim = head_dim
        self.num_heads, self.num_kv_heads = num_heads // tp_size, num_kv_heads // tp_size
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class RowParallelLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if input_size % tp_size:
            raise ValueError(f"input_size={input_size} is not divisible by tp_size={tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size // tp_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if param.dim() == 1:  # the bias is not split; only rank 0 adds it
            param.data.copy_(loaded)
            return
        shard = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp_rank * shard, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        if self.tp_size > 1:
            dist.all_reduce(y, group=tensor_parallel_group())
        return y


def check_row_parallel_linear_class(cls: object) -> None:
    """A learner's row-parallel layer (``row_parallel_linear_class=``) must be a `RowParallelLinear`:
    the model builds it with the stock constructor and loads it with the stock ``weight_loader``."""
    if not (isinstance(cls, type) and issubclass(cls, RowParallelLinear)):
        raise ValueError(f"row_parallel_linear_class={cls!r} must be a subclass of "
                         "minivllm.layers.linear.RowParallelLinear")
