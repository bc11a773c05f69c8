"""What `LLM.generate` returns, shaped like vLLM's outputs."""
from __future__ import annotations

from dataclasses import dataclass, field

from minivllm.core.records import Logprob, PositionLogprobs, SpecDecodeMetrics

__all__ = ["CompletionOutput", "Logprob", "RequestMetrics", "RequestOutput"]


@dataclass
class CompletionOutput:
    index: int  # which of the request's ``n`` samples
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs, with ``logprobs``
    logprobs: list[PositionLogprobs] | None = None  # per output token: its report, with ``logprobs=k``


@dataclass
class RequestMetrics:
    """Wall-clock times (``time.time()``) and cache figures of one request (with ``n`` > 1, of its
    first sample to be scheduled and to give a token, of its last to finish, and the cache hits and
    preemptions of all of them summed)."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    spec_decode: SpecDecodeMetrics | None = None  # with speculative decoding: proposed, accepted, ...


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # ``n`` of them, by index
    finished: bool
    metrics: RequestMetrics = field(repr=False, default=None)  # type: ignore[assignment]
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # with ``prompt_logprobs=k``; the first is None
