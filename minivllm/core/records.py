"""The records the core carries for the layers above it (pure Python, no torch): what each rank
sent and received in a step (the communication part of the step trace, filled in by the distributed
workers), each request's speculative-decoding counters (updated by the scheduler) and the
log-probabilities a step reports (filled in by the sampling rank)."""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import zip_longest


@dataclass(frozen=True)
class CollectiveCount:
    """``calls`` to one collective in a step, and the payload ``bytes`` this rank handed to them:
    the tensor reduced (all_reduce), this rank's own shard (all_gather), the tensor sent or received
    (send, recv). Not the bytes a ring algorithm puts on the wire (an all-reduce of S bytes over n
    ranks moves about 2 (n - 1) / n x S per rank)."""

    op: str
    calls: int
    bytes: int


@dataclass(frozen=True)
class RankComm:
    rank: int  # within its data-parallel replica: pp_rank * tp_size + tp_rank
    tp_rank: int
    pp_rank: int
    collectives: tuple[CollectiveCount, ...]  # sorted by op

    def calls(self, op: str) -> int:
        return sum(c.calls for c in self.collectives if c.op == op)

    def bytes(self, op: str) -> int:
        return sum(c.bytes for c in self.collectives if c.op == op)


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """Tokens a verifying step emits when each of ``k`` drafts is accepted independently with
    probability ``alpha`` (Leviathan et al.): ``(1 - alpha^(k+1)) / (1 - alpha)``."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r} must be in [0, 1]")
    if k < 0:
        raise ValueError(f"k={k!r} must be >= 0")
    return k + 1.0 if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


@dataclass
class SpecDecodeMetrics:
    """Counts over the steps that verified at least one draft token of a request.

    Position ``i`` is the ``i``-th draft token of a step: ``proposed_per_position[i]`` steps had one,
    ``verified_per_position[i]`` of them got as far as checking it (every draft before it accepted),
    ``accepted_per_position[i]`` accepted it."""

    num_steps: int = 0  # target forward passes that verified drafts
    proposed_per_position: list[int] = field(default_factory=list)
    verified_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, num_proposed: int, num_accepted: int) -> None:
        if not 0 <= num_accepted <= num_proposed:
            raise ValueError(f"num_accepted={num_accepted!r} must be in [0, num_proposed={num_proposed}]")
        if num_proposed == 0:
            return
        grow = num_proposed - len(self.proposed_per_position)
        if grow > 0:
            self.proposed_per_position += [0] * grow
            self.verified_per_position += [0] * grow
            self.accepted_per_position += [0] * grow
        self.num_steps += 1
        for i in range(num_proposed):
            self.proposed_per_position[i] += 1
            self.verified_per_position[i] += i <= num_accepted
            self.accepted_per_position[i] += i < num_accepted

    def merge(self, other: "SpecDecodeMetrics") -> "SpecDecodeMetrics":
        """The counts of both (totals over requests)."""
        total = SpecDecodeMetrics(self.num_steps + other.num_steps)
        for name in ("proposed_per_position", "verified_per_position", "accepted_per_position"):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(total, name, [x + y for x, y in zip_longest(mine, theirs, fillvalue=0)])
        return total

    @property
    def num_proposed(self) -> int:
        return sum(self.proposed_per_position)

    @property
    def num_accepted(self) -> int:
        return sum(self.accepted_per_position)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        """Of the steps that proposed a draft at position i, the share that kept it."""
        return [a / p for a, p in zip(self.accepted_per_position, self.proposed_per_position)]

    @property
    def conditional_acceptance_rate(self) -> float:
        """Accepted drafts per draft actually checked: the ``alpha`` of the i.i.d. model, in which a
        step with ``k`` drafts emits ``(1 - alpha^(k+1)) / (1 - alpha)`` tokens on average."""
        verified = sum(self.verified_per_position)
        return self.num_accepted / verified if verified else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verifying forward pass: the accepted drafts plus the one the target adds."""
        return 1 + self.num_accepted / self.num_steps if self.num_steps else 0.0

    @property
    def forward_passes_saved(self) -> int:
        """Each accepted draft is a token the target did not need a forward pass of its own for."""
        return self.num_accepted


@dataclass(frozen=True, slots=True)
class Logprob:
    """One token's log-probability at one position, as vLLM reports it: ``rank`` 1 is the most likely
    token. The sampling rank fills ``logprob`` and ``rank``; the engine adds ``decoded_token``."""

    logprob: float
    rank: int
    decoded_token: str | None = None


# one position's report: the top-k tokens and the token actually there (sampled, or the prompt's)
PositionLogprobs = dict[int, Logprob]


@dataclass(slots=True)
class StepLogprobs:
    """What one request asked to know about one step: a report per token it sampled (with speculative
    decoding, per token it emitted) and per prompt position computed, ``(position, report)``; the report
    at position ``p`` is about the prompt token at ``p``, given the tokens before it."""

    sampled: list[PositionLogprobs] = field(default_factory=list)
    prompt: list[tuple[int, PositionLogprobs]] = field(default_factory=list)
