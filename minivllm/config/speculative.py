"""`speculative_config`: how the engine guesses tokens ahead. Names follow vLLM."""
from __future__ import annotations

from dataclasses import dataclass, fields

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """``method``: ``"ngram"`` (prompt lookup) or ``"draft_model"`` (a small model with the target's
    vocabulary, in folder ``model``); ``num_speculative_tokens``: at most this many guesses per request
    and step; ``prompt_lookup_min``/``_max``: the n-gram lengths the lookup tries (ngram only)."""

    method: str
    num_speculative_tokens: int
    model: str | None = None
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method={self.method!r} must be one of {METHODS}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"speculative_config.num_speculative_tokens={k!r} must be an int >= 1")
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config.model is required for method='draft_model': the draft's folder")
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError(f"speculative_config.model={self.model!r} is only for method='draft_model'")
            try:
                check_ngram_sizes(k, self.prompt_lookup_max, self.prompt_lookup_min)
            except ValueError as e:
                raise ValueError(f"speculative_config.{e}") from None

    @classmethod
    def from_dict(cls, raw: dict) -> "SpeculativeConfig":
        if not isinstance(raw, dict):
            raise ValueError(f"speculative_config={raw!r} must be a dict")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known: {sorted(known)}")
        for key in ("method", "num_speculative_tokens"):
            if key not in raw:
                raise ValueError(f"speculative_config.{key} is required")
        return cls(**raw)


def check_ngram_sizes(num_speculative_tokens: int, prompt_lookup_max: int, prompt_lookup_min: int) -> None:
    """The n-gram proposer's sizes (`minivllm.spec_decode.ngram.NgramProposer` checks them here too)."""
    for name, value in (("num_speculative_tokens", num_speculative_tokens),
                        ("prompt_lookup_min", prompt_lookup_min), ("prompt_lookup_max", prompt_lookup_max)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if prompt_lookup_min > prompt_lookup_max:
        raise ValueError(f"prompt_lookup_min={prompt_lookup_min} must be <= prompt_lookup_max={prompt_lookup_max}")
