"""Scheduling policies: the decisions of one step, which the `Scheduler` carries out.

The Scheduler owns the queues and the moves that change them (`Scheduler.schedule_chunk`,
`Scheduler.admit`, `Scheduler.preempt`); a policy decides which moves to make each step: which
running requests go on and with how many tokens, whom to preempt when the KV cache is short of
blocks, and whom to admit from the waiting queue. It keeps every step within the token budget
(``max_num_batched_tokens``) and ``max_num_seqs`` running requests, and schedules something whenever
a request is unfinished.

The engine's two policies below, ``continuous`` and ``static``, go through this very seam;
exercise 04 plugs in a learner's (``LLM(..., batching_policy=MyPolicy())``, and the simulator's
``SimConfig(batching_policy=...)``).

Pure Python, no torch.
"""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from minivllm.core.scheduler import Scheduler, SchedulerOutput


class SchedulingPolicy(abc.ABC):
    @abc.abstractmethod
    def schedule(self, scheduler: Scheduler, out: SchedulerOutput) -> None:
        """Decide one step by calling ``scheduler``'s moves, which record the step in ``out``."""


class ContinuousBatching(SchedulingPolicy):
    """vLLM's scheduler. With chunked prefill, running requests go first, oldest first, each taking
    its next token (decode) or its next prompt chunk; waiting requests then fill what is left of the
    budget, FCFS, their prompts cut into chunks if need be. Without it, whole prompts only, and a
    step that admits prompts runs prompts only (decodes wait a step)."""

    def schedule(self, scheduler: Scheduler, out: SchedulerOutput) -> None:
        budget = scheduler.max_num_batched_tokens
        if scheduler.enable_chunked_prefill:
            budget = self.schedule_running(scheduler, out, budget)
            # a step that had to preempt is short of blocks: admitting now would only thrash
            if not out.preempted:
                self.schedule_waiting(scheduler, out, budget, chunked=True)
        else:
            self.schedule_waiting(scheduler, out, budget, chunked=False)
            if out.is_empty:
                self.schedule_running(scheduler, out, budget)

    def schedule_running(self, scheduler: Scheduler, out: SchedulerOutput, budget: int) -> int:
        """Run the running requests, oldest first, while the budget lasts; preempt the newest when
        the cache has no block for the next. Returns the budget left."""
        bm = scheduler.block_manager
        for seq in list(scheduler.running):  # a copy: preemption removes from the end
            if budget == 0 or seq in out.preempted:
                break  # out of budget, or seq was preempted and so was everyone after it
            num_new = scheduler.num_tokens_to_run(seq)
            if num_new > budget:  # chunked prefill: the rest of the prompt waits for the next step
                num_new = budget
            while not bm.can_append(seq, num_new):
                newest = scheduler.running[-1]
                scheduler.preempt(newest, out)
                if newest is seq:
                    return budget  # seq itself had to go, and so had everyone after it
            scheduler.schedule_chunk(seq, num_new, out)
            budget -= num_new
        return budget

    def schedule_waiting(self, scheduler: Scheduler, out: SchedulerOutput, budget: int, *, chunked: bool) -> None:
        """Admit waiting requests in queue order while the budget, ``max_num_seqs`` and the free
        blocks allow; the first that does not fit stops admission (FCFS: no one overtakes it)."""
        if not self.admission_open(scheduler):
            return
        bm = scheduler.block_manager
        while scheduler.waiting and budget > 0 and len(scheduler.running) < scheduler.max_num_seqs:
            seq = scheduler.waiting[0]
            cached = bm.find_cached_prefix(seq)
            remaining = seq.num_tokens - bm.cached_prefix_tokens(seq, cached)
            num_new = min(remaining, budget) if chunked else remaining
            if num_new > budget or not bm.can_allocate(seq, num_new, cached):
                break
            scheduler.admit(seq, cached, num_new, out)
            budget -= num_new

    def admission_open(self, scheduler: Scheduler) -> bool:
        return True


class StaticBatching(ContinuousBatching):
    """The baseline continuous batching is measured against: no request joins until the whole
    running batch has finished."""

    def admission_open(self, scheduler: Scheduler) -> bool:
        """Admit only while the current batch is still being formed, that is, before any of its
        requests has produced a token."""
        return not any(seq.num_output_tokens for seq in scheduler.running)


BATCHING_POLICIES = {"continuous": ContinuousBatching, "static": StaticBatching}


def make_policy(policy: str | SchedulingPolicy) -> SchedulingPolicy:
    """A policy by name (``continuous``, ``static``), or the `SchedulingPolicy` given."""
    if isinstance(policy, SchedulingPolicy):
        return policy
    if isinstance(policy, str) and policy in BATCHING_POLICIES:
        return BATCHING_POLICIES[policy]()
    raise ValueError(f"batching_policy={policy!r} must be one of {tuple(BATCHING_POLICIES)} or a "
                     "minivllm.core.policy.SchedulingPolicy")
