"""A step trace as a Chrome Trace Event Format object: open it in ui.perfetto.dev (or chrome://tracing).

Pure Python (stdlib json only), so the real engine (``LLMEngine.trace``, wall-clock seconds) and the
simulator (``SimResult.trace``, virtual seconds) export the same way. What it draws:

* process "<name> engine": the thread "engine steps", one slice ``step N`` per `StepRecord` (its
  tokens, requests, preemptions, finishes, block events, draft tokens and K/V copies in ``args``), and counters
  sampled at each step's end (the state the record describes): ``KV blocks`` (used, free,
  cached_free) and ``requests`` (running, waiting).
* process "<name> requests": a thread per request id, in order of first appearance, with the slices
  ``queued`` (arrival to first scheduled step; only when ``arrival_times`` are given, because a
  `StepRecord` counts waiting requests but does not name them), ``prefill`` (one per chunk; ``tokens``
  computed, ``sampled`` tokens emitted, ``recompute`` after a preemption), ``decode`` (a run of decode
  steps in consecutive trace steps merged into one slice, so a long generation stays one readable
  bar; ``steps``, ``tokens`` computed, ``sampled`` tokens emitted, drafts), ``preempted`` (from the
  start of the step that preempted it to the start of the step it runs again, or the trace's end),
  and an instant ``finished`` with its ``reason``. An abort happens between steps: the scheduler lists
  it in the next step's record (reason ``abort``), so its instant sits at that step's end.

Times are microseconds from the trace's origin: the first step's start, or the earliest given
arrival of a request in the trace if that is earlier (``otherData.origin_s`` keeps it, in the
trace's seconds). They are rounded to whole nanoseconds, and a slice's ``dur`` is the difference of
its rounded ends, so slices that touch on the driver's clock touch exactly in the file.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

from minivllm.core.trace import ChunkRecord, StepRecord

ENGINE_PID, REQUESTS_PID = 1, 2
STEPS_TID = 1  # the engine's counters are process-wide and need no thread of their own


class _Clock:
    """Trace seconds -> microseconds from ``origin``, on a whole-nanosecond grid."""

    def __init__(self, origin: float):
        self.origin = origin

    def ns(self, t: float) -> int:
        return round((t - self.origin) * 1e9)

    def us(self, t: float) -> float:
        return self.ns(t) / 1000

    def span(self, start: float, end: float) -> tuple[float, float]:
        """(ts, dur) of a slice: dur from the rounded ends, so adjacent slices never overlap."""
        return self.ns(start) / 1000, (self.ns(end) - self.ns(start)) / 1000


def to_chrome_trace(trace: list[StepRecord], *, name: str = "minivllm",
                    arrival_times: Mapping[str, float] | None = None) -> dict:
    """The Chrome Trace Event Format object of ``trace``. ``arrival_times`` (request id -> arrival,
    on the trace's clock: `SimResult.arrival_times`, or ``RequestOutput.metrics.arrival_time``)
    adds each request's ``queued`` slice."""
    arrivals = dict(arrival_times or {})
    tids: dict[str, int] = {}  # request id -> thread id, in order of first appearance
    for rec in trace:
        for rid in [c.request_id for c in rec.chunks] + list(rec.preempted) + [r for r, _ in rec.finished]:
            tids.setdefault(rid, len(tids) + 1)
    origin = min([trace[0].start_time] + [arrivals[r] for r in tids if r in arrivals]) if trace else 0.0
    clock = _Clock(origin)
    events = _metadata(name, tids)
    for rec in trace:
        events += _step_events(rec, clock)
    events += _request_events(trace, clock, tids, arrivals)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"name": name, "origin_s": origin, "num_steps": len(trace)}}


def write_chrome_trace(trace: list[StepRecord], path: str | os.PathLike, **kw) -> None:
    """Write `to_chrome_trace` (``kw`` goes to it) as JSON to ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_chrome_trace(trace, **kw), f, separators=(",", ":"))


def _meta(kind: str, pid: int, tid: int, **args) -> dict:
    return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "ts": 0, "args": args}


def _metadata(name: str, tids: dict[str, int]) -> list[dict]:
    """Name the two processes and their threads; sort indexes keep the steps above the requests."""
    events = [_meta("process_name", ENGINE_PID, 0, name=f"{name} engine"),
              _meta("process_sort_index", ENGINE_PID, 0, sort_index=0),
              _meta("thread_name", ENGINE_PID, STEPS_TID, name="engine steps"),
              _meta("thread_sort_index", ENGINE_PID, STEPS_TID, sort_index=0),
              _meta("process_name", REQUESTS_PID, 0, name=f"{name} requests"),
              _meta("process_sort_index", REQUESTS_PID, 0, sort_index=1)]
    for rid, tid in tids.items():
        events += [_meta("thread_name", REQUESTS_PID, tid, name=rid),
                   _meta("thread_sort_index", REQUESTS_PID, tid, sort_index=tid)]
    return events


def _step_events(rec: StepRecord, clock: _Clock) -> list[dict]:
    """The step's slice, and the counters after it."""
    args = {"step": rec.step, "batched_tokens": rec.num_batched_tokens,
            "prefill_tokens": rec.num_prefill_tokens, "decode_tokens": rec.num_decode_tokens,
            "num_requests": len(rec.chunks), "preempted": list(rec.preempted),
            "finished": [rid for rid, _ in rec.finished],
            "blocks_allocated": len(rec.blocks_allocated), "blocks_freed": len(rec.blocks_freed),
            "blocks_cache_hit": len(rec.blocks_cache_hit), "blocks_evicted": len(rec.blocks_evicted)}
    if rec.num_draft_tokens:
        args.update(draft_tokens=rec.num_draft_tokens, accepted_tokens=rec.num_accepted_tokens)
    if rec.kv_copies:
        args.update(kv_copies=len(rec.kv_copies))
    ts, dur = clock.span(rec.start_time, rec.end_time)
    end = clock.us(rec.end_time)
    # a hand-made record may have no block snapshot, and so no pool size to count used blocks from
    kv = {"used": rec.blocks.num_blocks - rec.num_free_blocks} if rec.blocks is not None else {}
    kv.update(free=rec.num_free_blocks, cached_free=rec.num_cached_free_blocks)
    return [{"ph": "X", "name": f"step {rec.step}", "cat": "step", "pid": ENGINE_PID, "tid": STEPS_TID,
             "ts": ts, "dur": dur, "args": args},
            {"ph": "C", "name": "KV blocks", "pid": ENGINE_PID, "tid": 0, "ts": end, "args": kv},
            {"ph": "C", "name": "requests", "pid": ENGINE_PID, "tid": 0, "ts": end,
             "args": {"running": rec.num_running, "waiting": rec.num_waiting}}]


def _emitted(c: ChunkRecord) -> int:
    """Tokens the chunk emitted: its sample, after the drafts it accepted."""
    return 0 if c.sampled_token is None else 1 + c.num_accepted


def _request_events(trace: list[StepRecord], clock: _Clock, tids: dict[str, int],
                    arrivals: dict[str, float]) -> list[dict]:
    tracks = _RequestTracks(trace, clock, tids, arrivals)
    for i, rec in enumerate(trace):
        # the scheduler preempts before it schedules, so a step's preemptions come before its chunks
        for rid in rec.preempted:
            tracks.preempt(rid, rec)
        for c in rec.chunks:
            tracks.chunk(i, rec, c)
        for rid, reason in rec.finished:
            tracks.finish(rid, reason, rec)
    return tracks.close()


class _RequestTracks:
    """Every request's slices, written in one pass over the trace as each one closes."""

    def __init__(self, trace: list[StepRecord], clock: _Clock, tids: dict[str, int], arrivals: dict[str, float]):
        self.trace, self.clock, self.tids, self.arrivals = trace, clock, tids, arrivals
        self.events: list[dict] = []
        self.decoding: dict[str, list] = {}  # an open run of decode steps: [first index, last index, args]
        self.preempted_at: dict[str, float] = {}  # start of the step that preempted it
        self.recomputing: set[str] = set()  # preempted at least once: its prefill chunks since redo lost KV
        self.seen: set[str] = set()

    def slice(self, rid: str, name: str, t0: float, t1: float, **args) -> None:
        ts, dur = self.clock.span(t0, t1)
        self.events.append({"ph": "X", "name": name, "cat": "request", "pid": REQUESTS_PID, "tid": self.tids[rid],
                            "ts": ts, "dur": dur, "args": args})

    def preempt(self, rid: str, rec: StepRecord) -> None:
        self.close_decode(rid)
        self.preempted_at[rid] = rec.start_time
        self.recomputing.add(rid)

    def chunk(self, i: int, rec: StepRecord, c: ChunkRecord) -> None:
        rid = c.request_id
        if rid not in self.seen:
            self.seen.add(rid)
            if rid in self.arrivals:
                self.slice(rid, "queued", self.arrivals[rid], rec.start_time)
        if rid in self.preempted_at:
            self.slice(rid, "preempted", self.preempted_at.pop(rid), rec.start_time)
        if c.is_prefill:
            self.close_decode(rid)
            self.slice(rid, "prefill", rec.start_time, rec.end_time, tokens=c.num_tokens, start=c.start,
                       sampled=_emitted(c), recompute=rid in self.recomputing)
            return
        run = self.decoding.get(rid)
        if run is None or run[1] != i - 1:  # a step that skipped the request breaks the run
            self.close_decode(rid)
            run = self.decoding[rid] = [i, i, {"steps": 0, "tokens": 0, "sampled": 0}]
        run[1] = i
        args = run[2]
        args["steps"] += 1
        args["tokens"] += c.num_tokens
        args["sampled"] += _emitted(c)
        if c.draft_token_ids:
            args["draft_tokens"] = args.get("draft_tokens", 0) + len(c.draft_token_ids)
            args["accepted_tokens"] = args.get("accepted_tokens", 0) + c.num_accepted

    def finish(self, rid: str, reason: str, rec: StepRecord) -> None:
        self.close_decode(rid)
        self.events.append({"ph": "i", "s": "t", "name": "finished", "cat": "request", "pid": REQUESTS_PID,
                            "tid": self.tids[rid], "ts": self.clock.us(rec.end_time), "args": {"reason": reason}})

    def close_decode(self, rid: str) -> None:
        run = self.decoding.pop(rid, None)
        if run is not None:
            self.slice(rid, "decode", self.trace[run[0]].start_time, self.trace[run[1]].end_time, **run[2])

    def close(self) -> list[dict]:
        """Close what is still open at the trace's end; returns every event."""
        for rid in list(self.decoding):
            self.close_decode(rid)
        for rid, start in self.preempted_at.items():  # never ran again within the trace
            self.slice(rid, "preempted", start, self.trace[-1].end_time)
        return self.events
