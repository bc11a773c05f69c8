"""The scheduler's settings (vLLM's `SchedulerConfig`), shared by the engine and the simulator."""
from __future__ import annotations

from dataclasses import dataclass

from minivllm.config.parts import positive_int
from minivllm.core.block_manager import BlockManagerBase
from minivllm.core.policy import SchedulingPolicy, make_policy
from minivllm.core.scheduler import Scheduler


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's own limit
    enable_chunked_prefill: bool = True
    batching_policy: str | SchedulingPolicy = "continuous"  # "static": the course's baseline; exercise 04 plugs its own in

    def __post_init__(self) -> None:
        positive_int("max_num_seqs", self.max_num_seqs)
        positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.max_model_len is not None:
            positive_int("max_model_len", self.max_model_len)
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(f"enable_chunked_prefill={self.enable_chunked_prefill!r} must be a bool")
        make_policy(self.batching_policy)  # raises ValueError on anything but a name or a SchedulingPolicy

    def make_scheduler(self, block_manager: BlockManagerBase, max_model_len: int,
                       num_speculative_tokens: int = 0) -> Scheduler:
        """The core's `Scheduler` with these settings over ``block_manager``: the engine's and the
        simulator's alike (``max_model_len`` resolved, see `resolve_max_model_len`)."""
        return Scheduler(block_manager, max_num_seqs=self.max_num_seqs,
                         max_num_batched_tokens=self.max_num_batched_tokens,
                         enable_chunked_prefill=self.enable_chunked_prefill, batching_policy=self.batching_policy,
                         num_speculative_tokens=num_speculative_tokens, max_model_len=max_model_len)

    def resolve_max_model_len(self, model_limit: int, limit_name: str = "max_position_embeddings") -> int:
        """``max_model_len``, or the model's ``model_limit`` when unset; refuses a length past the model's
        limit, and (without chunked prefill) a token budget too small for a whole prompt."""
        if self.max_model_len is not None and self.max_model_len > model_limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's {limit_name}={model_limit}")
        max_len = self.max_model_len or model_limit
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < max_len:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} is smaller than "
                             f"max_model_len={max_len}: without chunked prefill a whole prompt must fit "
                             "in one step (raise it, lower max_model_len, or enable chunked prefill)")
        return max_len
