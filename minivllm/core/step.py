"""One engine step, shared by every driver of the scheduler: the real engine (the model runner on
the wall clock) and the simulator (a cost model on a virtual clock).

Pure Python, no torch: both drivers get the same bookkeeping (first-scheduled and first-token
times, stops, freeing finished requests) and the same `StepRecord`.
"""
from __future__ import annotations

from typing import Callable

from minivllm.core.scheduler import Scheduler, SchedulerOutput
from minivllm.core.sequence import Sequence
from minivllm.core.trace import StepRecord, StepRecorder


def run_step(scheduler: Scheduler, execute: Callable[[SchedulerOutput], dict[Sequence, int | list[int]]],
             clock: Callable[[], float], check_stop: Callable[[Sequence, int], bool],
             step: int, recorder: StepRecorder, *, allow_empty: bool = False) -> tuple[StepRecord, list[Sequence]]:
    """Schedule one step, ``execute`` it (returns the token sampled for each chunk that samples,
    or with speculative decoding the list of tokens it emits), apply ``check_stop`` (sets
    ``finish_reason`` and returns True to end a request) to every new token in order, and free the
    finished requests. Returns the step's record, written by the driver's ``recorder`` (its finished
    requests include those aborted since the last step), and the requests this step finished. A step
    that schedules nothing while requests wait is a bug, unless ``allow_empty``: blocks held outside
    the scheduler (a P/D decode instance's KV still on the wire) may leave it nothing to run until
    they arrive."""
    if not isinstance(recorder, StepRecorder):
        raise ValueError(f"recorder={recorder!r} must be a StepRecorder")
    start = clock()
    out = scheduler.schedule()
    if out.is_empty and scheduler.has_unfinished() and not allow_empty:
        raise RuntimeError("the scheduler could not schedule any waiting request; this is a bug")
    for chunk in out.chunks:
        if chunk.seq.first_scheduled_time is None:
            chunk.seq.first_scheduled_time = start
    sampled = execute(out) if out.chunks else {}
    scheduler.update(out, sampled)
    now = clock()
    finished = []
    for seq, tokens in sampled.items():
        if seq.first_token_time is None:
            seq.first_token_time = now
        if check_stop(seq, tokens) if isinstance(tokens, int) else _check_stops_in_order(seq, tokens, check_stop):
            finished.append(seq)
    for seq in finished:
        scheduler.finish(seq, seq.finish_reason)
    # the record lists these and any request ended between steps (an abort)
    record = recorder.record(step, start, now, out, sampled, scheduler.take_finished(), scheduler.block_manager,
                             scheduler.running, len(scheduler.waiting))
    return record, finished


def _check_stops_in_order(seq: Sequence, tokens: list[int], check_stop: Callable[[Sequence, int], bool]) -> bool:
    """Check several new tokens (already appended) as if they had come one at a time: a stop drops
    the tokens after it."""
    del seq.token_ids[len(seq.token_ids) - len(tokens):]
    for token in tokens:
        seq.token_ids.append(token)
        if check_stop(seq, token):
            return True
    return False
