"""Speculative decoding in the simulator: how many drafts a step accepts, and what proposing costs.

The engine's scheduler reserves up to ``k`` draft slots after each decoding request's token (the
same `Scheduler` the simulator drives); the target verifies them all in one step. What the drafts
would be is unknown here, so each is accepted with probability ``acceptance_rate``, independently,
until the first rejection (the i.i.d. model of Leviathan et al., 2023): a request's step emits
``a + 1`` tokens, ``P(a >= j) = alpha^j``, ``E[a + 1] = (1 - alpha^(k+1)) / (1 - alpha)``.

Proposing costs nothing for ``ngram`` (a lookup on the host) and, for ``draft_model``, one pass of
the draft over the step's chunks (it must see the prompts too) and ``k - 1`` decode passes of the
decoding requests, each priced by the same `DeploymentCost` on the target's tensor-parallel GPUs.
The draft's weights and KV cache are left out of the memory: a 1B draft beside an 8B target is
about 15 % of its weights.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from minivllm.sim.model_specs import MODELS, ModelSpec

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SimSpeculation:
    method: str
    num_speculative_tokens: int
    acceptance_rate: float
    draft: ModelSpec | None = None  # draft_model only; default: the smallest known model with the target's vocabulary
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative.method={self.method!r} must be one of {METHODS}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"speculative.num_speculative_tokens={k!r} must be an int >= 1")
        a = self.acceptance_rate
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a < 1:
            raise ValueError(f"speculative.acceptance_rate={a!r} must be in [0, 1)")
        if self.method == "ngram" and self.draft is not None:
            raise ValueError(f"speculative.draft={self.draft.name!r} is only for method='draft_model'")

    @property
    def expected_tokens_per_step(self) -> float:
        """Tokens a decoding request emits per step on average: ``(1 - a^(k+1)) / (1 - a)``."""
        a, k = self.acceptance_rate, self.num_speculative_tokens
        return (1 - a ** (k + 1)) / (1 - a)

    def draft_for(self, target: ModelSpec) -> ModelSpec | None:
        """The draft model ``draft_model`` runs beside ``target`` (None for ``ngram``)."""
        if self.method == "ngram":
            return None
        if self.draft is not None:
            if self.draft.vocab_size != target.vocab_size:
                raise ValueError(f"speculative.draft={self.draft.name!r} has vocab_size={self.draft.vocab_size}, "
                                 f"but {target.name} has {target.vocab_size}: a draft must share the vocabulary")
            return self.draft
        smaller = [m for m in MODELS.values() if m.vocab_size == target.vocab_size and m.num_params < target.num_params]
        if not smaller:
            raise ValueError(f"speculative.draft: no known model shares {target.name}'s vocabulary and is smaller; "
                             "pass one (a ModelSpec)")
        return min(smaller, key=lambda m: m.num_params)

    def num_accepted(self, rng: random.Random, num_drafts: int) -> int:
        """Drafts accepted out of ``num_drafts``: each with probability ``acceptance_rate`` until the
        first rejection."""
        accepted = 0
        while accepted < num_drafts and rng.random() < self.acceptance_rate:
            accepted += 1
        return accepted
