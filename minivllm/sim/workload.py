"""Seeded synthetic workloads: when requests arrive, how long their prompts and outputs are.

Arrivals follow `vllm bench serve`: inter-arrival gaps are gamma-distributed with shape
``burstiness`` and mean ``1 / request_rate``; ``burstiness=1`` is a Poisson process, smaller
values bunch requests into bursts, larger ones space them evenly. ``request_rate=inf`` sends every
request at time 0 (an offline batch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LENGTH_KINDS = ("fixed", "uniform", "lognormal")


@dataclass(frozen=True)
class Lengths:
    """A token-length distribution: ``fixed`` at ``mean``; ``uniform`` on
    ``[mean - spread, mean + spread]``; ``lognormal`` with that mean and ``spread`` as the sigma of
    its logarithm. Draws are rounded and clipped to ``[1, maximum]``."""

    kind: str
    mean: int
    spread: float = 0.0
    maximum: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in LENGTH_KINDS:
            raise ValueError(f"Lengths.kind={self.kind!r} must be one of {LENGTH_KINDS}")
        if isinstance(self.mean, bool) or not isinstance(self.mean, int) or self.mean < 1:
            raise ValueError(f"Lengths.mean={self.mean!r} must be an int >= 1")
        if not self.spread >= 0:
            raise ValueError(f"Lengths.spread={self.spread!r} must be >= 0")
        if self.kind == "uniform" and self.spread >= self.mean:
            raise ValueError(f"Lengths.spread={self.spread!r} must be < mean={self.mean} for a uniform "
                             "distribution (lengths start at 1)")
        if self.maximum is not None and self.maximum < self.mean:
            raise ValueError(f"Lengths.maximum={self.maximum!r} must be >= mean={self.mean}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            x = np.full(n, float(self.mean))
        elif self.kind == "uniform":
            x = rng.uniform(self.mean - self.spread, self.mean + self.spread, n)
        else:  # E[exp(N(mu, s^2))] = exp(mu + s^2 / 2)
            x = rng.lognormal(math.log(self.mean) - self.spread ** 2 / 2, self.spread, n)
        return np.clip(np.rint(x), 1, self.maximum or None).astype(np.int64)


@dataclass(frozen=True)
class Request:
    request_id: str
    arrival_time: float
    prompt_token_ids: list[int]
    output_len: int


@dataclass(frozen=True)
class Workload:
    num_requests: int
    request_rate: float  # requests per second; math.inf sends them all at time 0
    prompt_len: Lengths
    output_len: Lengths
    burstiness: float = 1.0
    shared_prefix_len: int = 0  # leading tokens shared by every request of a prefix group
    num_prefix_groups: int = 1
    vocab_size: int = 32000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_requests", "num_prefix_groups", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Workload.{name}={value!r} must be an int >= 1")
        if not self.request_rate > 0:
            raise ValueError(f"Workload.request_rate={self.request_rate!r} must be > 0 (math.inf: all at once)")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"Workload.burstiness={self.burstiness!r} must be a finite number > 0")
        if not isinstance(self.shared_prefix_len, int) or self.shared_prefix_len < 0:
            raise ValueError(f"Workload.shared_prefix_len={self.shared_prefix_len!r} must be an int >= 0")
        if not isinstance(self.seed, int):
            raise ValueError(f"Workload.seed={self.seed!r} must be an int")

    def arrival_times(self, rng: np.random.Generator) -> np.ndarray:
        if math.isinf(self.request_rate):
            return np.zeros(self.num_requests)
        gaps = rng.gamma(self.burstiness, 1.0 / (self.request_rate * self.burstiness), self.num_requests)
        return np.cumsum(gaps) - gaps[0]  # the first request arrives at time 0

    def generate(self) -> list[Request]:
        """The requests, in arrival order; prompts are random token ids after the group's shared
        prefix (``shared_prefix_len`` tokens, counted in the prompt length)."""
        rng = np.random.default_rng(self.seed)
        arrivals = self.arrival_times(rng)
        prompt_lens = np.maximum(self.prompt_len.sample(rng, self.num_requests), self.shared_prefix_len + 1)
        output_lens = self.output_len.sample(rng, self.num_requests)
        prefixes = rng.integers(0, self.vocab_size, (self.num_prefix_groups, self.shared_prefix_len)).tolist()
        groups = rng.integers(0, self.num_prefix_groups, self.num_requests)
        tails = rng.integers(0, self.vocab_size, int(prompt_lens.sum())).tolist()
        requests, pos = [], 0
        for i in range(self.num_requests):
            n = int(prompt_lens[i]) - self.shared_prefix_len
            prompt = prefixes[groups[i]] + tails[pos:pos + n]
            pos += n
            requests.append(Request(f"r{i}", float(arrivals[i]), prompt, int(output_lens[i])))
        return requests


PRESETS = {  # the Batching Lab's workload presets: (prompt lengths, output lengths, burstiness)
    "balanced": (Lengths("lognormal", 512, 0.6, 4096), Lengths("lognormal", 256, 0.6, 2048), 1.0),
    "prompt-heavy": (Lengths("lognormal", 2048, 0.5, 8192), Lengths("lognormal", 64, 0.5, 512), 1.0),
    "decode-heavy": (Lengths("lognormal", 128, 0.5, 1024), Lengths("lognormal", 1024, 0.5, 4096), 1.0),
    "bursty": (Lengths("lognormal", 512, 0.6, 4096), Lengths("lognormal", 256, 0.6, 2048), 0.2),
}


def preset(name: str, num_requests: int, request_rate: float, seed: int = 0) -> Workload:
    """A named workload shape (see `PRESETS`) at the given size and rate."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; known: {', '.join(PRESETS)}")
    prompt, output, burstiness = PRESETS[name]
    return Workload(num_requests, request_rate, prompt, output, burstiness=burstiness, seed=seed)
