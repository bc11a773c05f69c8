"""One request's state as the scheduler, block manager and model runner see it (no torch)."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from minivllm.core.records import SpecDecodeMetrics
from minivllm.sampling_params import SamplingParams

_arrival_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# The members as plain names for the hot loops: on Python 3.11 each ``SequenceStatus.RUNNING`` is a
# descriptor call, and the scheduler compares a status for every request in every step.
WAITING, RUNNING, FINISHED = SequenceStatus.WAITING, SequenceStatus.RUNNING, SequenceStatus.FINISHED


@dataclass(eq=False, slots=True)  # slots: faster attribute access in the scheduler's loops
class Sequence:
    """A request: its prompt, the tokens generated so far, and how much of it the KV cache holds.

    ``num_computed_tokens`` counts the leading tokens whose K/V sit in the cache. The scheduler
    advances it chunk by chunk; preemption resets it to 0 (the KV is recomputed later), while the
    generated tokens are kept.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = 0.0
    prompt: str | None = None
    arrival_index: int = field(default_factory=lambda: next(_arrival_counter))
    status: SequenceStatus = WAITING
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int | None = None  # prefix-cache hits when first scheduled
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    spec_metrics: SpecDecodeMetrics = field(default_factory=SpecDecodeMetrics)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens
