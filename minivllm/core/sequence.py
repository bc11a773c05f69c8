"""One request's state as the scheduler, block manager and model runner see it (no torch)."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from minivllm.core.records import PositionLogprobs, SpecDecodeMetrics
from minivllm.sampling_params import SamplingParams

_arrival_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
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
    status: SequenceStatus = SequenceStatus.WAITING
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
    # parallel sampling (n > 1): sample ``sample_index`` of request ``parent_id``
    parent_id: str | None = None
    sample_index: int = 0
    # the token rules the engine derives from its tokenizer: tokens banned before ``min_tokens`` (EOS
    # and stop_token_ids), and ``bad_words`` tokenized (the last token is banned after the others)
    min_tokens_stop_ids: tuple[int, ...] = ()
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    # what the request asked to know (None when it did not): a report per output token; per prompt
    # position, the first being None (nothing predicts the first token)
    logprobs: list[PositionLogprobs] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        p = self.sampling_params
        if p.logprobs is not None and self.logprobs is None:
            self.logprobs = []
        if p.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

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

    @property
    def num_outstanding_tokens(self) -> int:
        """Tokens the request still needs computed: its KV backlog plus the outputs it may still make
        (how the data-parallel routers of the engine and the simulator weigh a replica's load)."""
        return self.num_tokens - self.num_computed_tokens + self.sampling_params.max_tokens - self.num_output_tokens

    @property
    def reads_prefix_cache(self) -> bool:
        """A request that wants its prompt's logprobs computes every prompt position itself (vLLM's
        rule: a cached block has K/V but no logits)."""
        return self.sampling_params.prompt_logprobs is None

    def banned_token_ids(self, output_token_ids: list[int]) -> list[int]:
        """Tokens the next position may not take after ``output_token_ids``: EOS and the stop tokens
        while fewer than ``min_tokens`` are out, and the last token of every bad word whose other
        tokens end the output."""
        banned = list(self.min_tokens_stop_ids) if len(output_token_ids) < self.sampling_params.min_tokens else []
        for word in self.bad_words_token_ids:
            head = word[:-1]
            if not head or (len(output_token_ids) >= len(head) and tuple(output_token_ids[-len(head):]) == head):
                banned.append(word[-1])
        return banned


def check_request_fits(num_prompt_tokens: int, max_tokens: int, *, max_model_len: int, block_size: int,
                       num_blocks: int) -> None:
    """Refuse (ValueError) a request that no step could ever finish: a prompt longer than
    ``max_model_len``, or one that with ``max_tokens`` more tokens needs more KV blocks than the whole
    cache has. The engine and the simulator both ask before queueing a request."""
    if num_prompt_tokens > max_model_len:
        raise ValueError(f"prompt of {num_prompt_tokens} tokens is longer than max_model_len={max_model_len}")
    longest = min(num_prompt_tokens + max_tokens, max_model_len)
    need = -(-longest // block_size)
    if need > num_blocks:
        raise ValueError(f"prompt of {num_prompt_tokens} tokens plus max_tokens={max_tokens} needs {need} KV "
                         f"blocks, but the cache has only {num_blocks}")
