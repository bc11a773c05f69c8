"""The workloads of the prefix-cache benchmark (`minivllm.benchmarks.prefix_cache`): where the radix
cache and the hash cache differ, that is where prompts share a prefix that ends inside a block.

A workload runs in *waves*, each wave sent once the one before has finished (a user reads the answer
before replying), so a wave's prompts may extend the previous wave's outputs:

* ``multi_turn``: chats that share a system prompt; each turn is the last turn's prompt, its answer
  and a new user message;
* ``few_shot``: an instruction and the first ``k`` of a fixed list of examples (``k`` varies), then a
  question: prompts part at example boundaries, inside blocks;
* ``branching``: ``n`` samples of each prompt, follow-ups on every sample, then on the first sample
  of each follow-up (a tree of continuations);
* ``unaligned_prefix``: one long document, not a whole number of blocks, then a question.

Token ids are random in ``[1, vocab_size)``; lengths are drawn from a seeded generator.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptSpec:
    """One request of a wave: ``n`` samples of ``max_tokens`` tokens each."""

    prompt: tuple[int, ...]
    max_tokens: int
    n: int = 1


# what a wave gets from the waves before it: each request of the last wave, with its samples' outputs
History = list[tuple[PromptSpec, list[list[int]]]]


@dataclass(frozen=True)
class Scale:
    """How big a workload is: requests per wave, the shared prefix's length, message and output
    lengths (inclusive ranges), waves, samples per prompt (``branching``)."""

    requests: int
    prefix: int
    message: tuple[int, int]
    output: tuple[int, int]
    waves: int
    samples: int


# the prefix lengths are not multiples of 16 (the default block size): the shared part ends mid-block
SCALES = {
    "small": Scale(requests=6, prefix=45, message=(6, 20), output=(4, 8), waves=3, samples=3),  # seconds, CPU
    "medium": Scale(requests=16, prefix=205, message=(10, 60), output=(16, 64), waves=4, samples=4),  # the course model
    "large": Scale(requests=64, prefix=1013, message=(20, 200), output=(32, 256), waves=6, samples=8),  # the simulator
}


@dataclass(frozen=True)
class PrefixWorkload:
    """``num_waves`` waves; ``wave(k, history)`` gives wave ``k``'s requests from the last wave's."""

    name: str
    num_waves: int
    wave: Callable[[int, History], list[PromptSpec]]


def make_workload(name: str, size: str = "small", seed: int = 0, vocab_size: int = 4096) -> PrefixWorkload:
    """The workload ``name`` (one of `WORKLOADS`) at ``size`` (one of `SCALES`)."""
    if name not in WORKLOADS:
        raise ValueError(f"workload={name!r} must be one of {tuple(WORKLOADS)}")
    if size not in SCALES:
        raise ValueError(f"size={size!r} must be one of {tuple(SCALES)}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size!r} must be an int >= 2")
    rng = random.Random(f"{name}-{size}-{seed}")  # a string seed: the same draws in every process
    return WORKLOADS[name](_Draw(rng, vocab_size, SCALES[size]))


@dataclass
class _Draw:
    rng: random.Random
    vocab_size: int
    scale: Scale

    def tokens(self, n: int) -> tuple[int, ...]:
        return tuple(self.rng.randrange(1, self.vocab_size) for _ in range(n))

    def message(self) -> tuple[int, ...]:
        return self.tokens(self.rng.randint(*self.scale.message))

    def output_len(self) -> int:
        return self.rng.randint(*self.scale.output)


def _multi_turn(d: _Draw) -> PrefixWorkload:
    system = d.tokens(d.scale.prefix)

    def wave(k: int, history: History) -> list[PromptSpec]:
        if k == 0:
            return [PromptSpec(system + d.message(), d.output_len()) for _ in range(d.scale.requests)]
        return [PromptSpec(spec.prompt + tuple(outs[0]) + d.message(), d.output_len()) for spec, outs in history]

    return PrefixWorkload("multi_turn", d.scale.waves, wave)


def _few_shot(d: _Draw) -> PrefixWorkload:
    instruction = d.tokens(d.scale.prefix // 3)
    examples = [d.tokens(d.scale.prefix // 3 + d.rng.randint(-5, 5)) for _ in range(6)]

    def wave(k: int, history: History) -> list[PromptSpec]:
        specs = []
        for _ in range(d.scale.requests):
            shots = sum(examples[:d.rng.randint(1, len(examples))], ())
            specs.append(PromptSpec(instruction + shots + d.message(), d.output_len()))
        return specs

    return PrefixWorkload("few_shot", d.scale.waves, wave)


def _branching(d: _Draw) -> PrefixWorkload:
    system = d.tokens(d.scale.prefix)

    def wave(k: int, history: History) -> list[PromptSpec]:
        if k == 0:
            return [PromptSpec(system + d.message(), d.output_len(), d.scale.samples)
                    for _ in range(max(1, d.scale.requests // 2))]
        # wave 1 follows every sample up, later waves the first sample of each request
        return [PromptSpec(spec.prompt + tuple(out) + d.message(), d.output_len(), 2)
                for spec, outs in history for out in (outs if k == 1 else outs[:1])]

    return PrefixWorkload("branching", min(d.scale.waves, 3), wave)


def _unaligned_prefix(d: _Draw) -> PrefixWorkload:
    document = d.tokens(d.scale.prefix)

    def wave(k: int, history: History) -> list[PromptSpec]:
        return [PromptSpec(document + d.message(), d.output_len()) for _ in range(d.scale.requests)]

    return PrefixWorkload("unaligned_prefix", d.scale.waves, wave)


WORKLOADS: dict[str, Callable[[_Draw], PrefixWorkload]] = {
    "multi_turn": _multi_turn, "few_shot": _few_shot, "branching": _branching, "unaligned_prefix": _unaligned_prefix}
