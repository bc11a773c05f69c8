"""What the engine needs from whatever runs the model, and the choice between the two that exist.

`minivllm.worker.model_runner.ModelRunner` runs the whole model in this process; `MultiprocExecutor`
runs one worker process per rank (tensor x pipeline parallel). The engine talks to either through
the same seven members, so it never asks which one it has.
"""
from __future__ import annotations

from typing import Protocol

from minivllm.config.engine import EngineConfig
from minivllm.config.model import ModelConfig
from minivllm.core.block_manager import KVCopy
from minivllm.core.records import RankComm, StepLogprobs
from minivllm.core.scheduler import SchedulerOutput
from minivllm.core.sequence import Sequence
from minivllm.distributed.layout import check_parallel_sizes
from minivllm.executor.multiproc import MultiprocExecutor
from minivllm.layers.linear import check_row_parallel_linear_class
from minivllm.worker.model_runner import ModelRunner


class Executor(Protocol):
    num_blocks: int  # KV blocks every rank can hold (the smallest over the ranks)
    last_comm: tuple[RankComm, ...]  # the last step's collectives, one record per rank; () in one process
    last_logprobs: dict[str, StepLogprobs]  # the last step's logprobs, for the requests that asked

    def execute(self, out: SchedulerOutput) -> dict[Sequence, int]:
        """Run the scheduled chunks; the token sampled for each chunk that samples."""

    def copy_kv(self, copies: list[KVCopy]) -> None:
        """Copy K/V between blocks (`KVCopy`), every layer, before the next step's forward pass."""

    def release(self, request_id: str) -> None:
        """Forget a finished request's per-request state (its seeded generator)."""

    def close(self) -> None:
        """Free the model; stop worker processes."""


def make_executor(cfg: EngineConfig, mc: ModelConfig, folder: str, max_model_len: int, dp_rank: int = 0) -> Executor:
    """The model in this process when nothing is split, else one worker process per rank. Sizes and
    the plugged-in layer are checked first, so a bad one raises ValueError before any process starts."""
    check_parallel_sizes(cfg, mc)
    if cfg.row_parallel_linear_class is not None:  # before any process loads a model with it
        check_row_parallel_linear_class(cfg.row_parallel_linear_class)
    if cfg.world_size == 1:
        return ModelRunner(cfg, mc, folder, max_model_len)
    return MultiprocExecutor(cfg, mc, folder, max_model_len, dp_rank)
