"""Per-request sampling settings, named and validated as in vLLM."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops.

    ``temperature=0`` is greedy. ``top_k=-1``, ``top_p=1`` and ``min_p=0`` turn those filters off.
    A request with a ``seed`` draws from its own generator, so its tokens do not depend on what
    else shares the batch.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(self.temperature >= 0, "temperature", self.temperature, "must be >= 0")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _check(isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1),
               "top_k", self.top_k, "must be -1 (off) or an int >= 1")
        _check(0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1]")
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               "max_tokens", self.max_tokens, "must be an int >= 1")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "must hold non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", self.stop_token_ids, "must hold token ids >= 0")
        _check(self.seed is None or isinstance(self.seed, int), "seed", self.seed, "must be an int or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check(ok: bool, field: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{field}={value!r} {rule}")
