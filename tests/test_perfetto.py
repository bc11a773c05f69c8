"""The Perfetto (Chrome Trace Event Format) export of a step trace: a hand-made trace slice by slice,
then a real engine run (chunked prefill, decodes, a preemption, stop and length finishes) and a
simulator run, written to disk, read back with json and checked against the trace, the engine's
outputs and the block manager's size."""
from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest

from minivllm import LLM, SamplingParams
from minivllm.core.perfetto import to_chrome_trace, write_chrome_trace
from minivllm.core.trace import BlockSnapshot, ChunkRecord, StepRecord
from minivllm.sim import Lengths, SimConfig, Simulator, Workload, get_hardware, get_model

NUM_BLOCKS = 24


def us(t: float, origin: float) -> float:
    return (t - origin) * 1e6


def ns(x_us: float) -> int:
    """The file's microseconds on the nanosecond grid the exporter rounds to."""
    return round(x_us * 1000)


def load(trace, tmp_path, **kw) -> dict:
    path = tmp_path / "trace.json"
    write_chrome_trace(trace, path, **kw)
    with open(path) as f:
        return json.load(f)


def by_track(doc: dict) -> tuple[dict[str, int], dict[int, list[dict]]]:
    """Request id -> thread id (from the thread_name metadata), and each request thread's events
    (metadata left out) in time order."""
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name" and e["pid"] == 2}
    events = defaultdict(list)
    for e in doc["traceEvents"]:
        if e["pid"] == 2 and e["ph"] != "M":
            events[e["tid"]].append(e)
    for evs in events.values():
        evs.sort(key=lambda e: (e["ts"], e["ph"] == "i"))
    return {rid: tid for tid, rid in names.items()}, events


def check_common(doc: dict, trace: list[StepRecord], arrivals: dict[str, float], num_blocks: int) -> float:
    """What holds for any driver: well-formed events, the step slices, the counters, no overlap on a
    track, the queued slices, the finishes and the preempted spans. Returns the origin."""
    origin = min([trace[0].start_time] + list(arrivals.values()))
    assert doc["displayTimeUnit"] == "ms" and doc["otherData"]["origin_s"] == origin
    events = doc["traceEvents"]
    for e in events:  # what Perfetto's JSON importer needs
        assert {"ph", "ts", "pid", "tid", "name"} <= e.keys(), e
        if e["ph"] == "X":
            assert "dur" in e and e["dur"] >= 0, e
    meta = {(e["pid"], e["tid"], e["name"]) for e in events if e["ph"] == "M"}
    assert {(1, 0, "process_name"), (2, 0, "process_name"), (1, 1, "thread_name"), (1, 1, "thread_sort_index")} <= meta

    steps = [e for e in events if e["ph"] == "X" and e["pid"] == 1]
    assert len(steps) == len(trace)
    for e, rec in zip(sorted(steps, key=lambda e: e["ts"]), trace):
        assert e["name"] == f"step {rec.step}"
        assert e["ts"] == pytest.approx(us(rec.start_time, origin), abs=1e-3)
        assert e["dur"] == pytest.approx(rec.duration * 1e6, abs=2e-3)
        a = e["args"]
        assert (a["batched_tokens"], a["prefill_tokens"], a["decode_tokens"], a["num_requests"]) == (
            sum(c.num_tokens for c in rec.chunks), sum(c.num_tokens for c in rec.chunks if c.is_prefill),
            sum(c.num_tokens for c in rec.chunks if not c.is_prefill), len(rec.chunks))
        assert a["preempted"] == list(rec.preempted) and a["finished"] == [r for r, _ in rec.finished]
        assert a["blocks_allocated"] == len(rec.blocks_allocated) and a["blocks_freed"] == len(rec.blocks_freed)

    # counters: the state after each step, at its end
    counters = defaultdict(list)
    for e in events:
        if e["ph"] == "C":
            counters[e["name"]].append(e)
    assert len(counters["KV blocks"]) == len(counters["requests"]) == len(trace)
    for kv, req, rec in zip(counters["KV blocks"], counters["requests"], trace):
        assert kv["ts"] == req["ts"] == pytest.approx(us(rec.end_time, origin), abs=1e-3)
        assert kv["args"]["used"] == num_blocks - rec.num_free_blocks and kv["args"]["free"] == rec.num_free_blocks
        assert req["args"] == {"running": rec.num_running, "waiting": rec.num_waiting}

    # slices on one track never overlap (compared on the file's nanosecond grid)
    for (pid, tid), group in _groups(e for e in events if e["ph"] == "X").items():
        group.sort(key=lambda e: e["ts"])
        for a, b in zip(group, group[1:]):
            assert ns(a["ts"]) + ns(a["dur"]) <= ns(b["ts"]), (pid, tid, a, b)

    tids, tracks = by_track(doc)
    seen = {c.request_id for rec in trace for c in rec.chunks}
    assert set(tids) == seen
    first_step = {rid: next(r for r in trace if any(c.request_id == rid for c in r.chunks)) for rid in seen}
    finished = {rid: (reason, rec) for rec in trace for rid, reason in rec.finished}
    for rid, tid in tids.items():
        evs = tracks[tid]
        queued = [e for e in evs if e["name"] == "queued"]
        if rid in arrivals:  # from arrival to the step that first schedules it
            assert len(queued) == 1 and queued[0]["ts"] == pytest.approx(us(arrivals[rid], origin), abs=1e-3)
            end = queued[0]["ts"] + queued[0]["dur"]
            assert end == pytest.approx(us(first_step[rid].start_time, origin), abs=2e-3)
        instants = [e for e in evs if e["ph"] == "i"]
        if rid in finished:
            reason, rec = finished[rid]
            assert [(e["name"], e["s"], e["args"]["reason"]) for e in instants] == [("finished", "t", reason)]
            assert instants[0]["ts"] == pytest.approx(us(rec.end_time, origin), abs=1e-3)
            assert instants[0] is evs[-1], "nothing happens to a request after it finishes"
        # a preempted span from the step that preempted it to the start of the step it runs again
        spans = [e for e in evs if e["name"] == "preempted"]
        preempting = [i for i, rec in enumerate(trace) if rid in rec.preempted]
        assert len(spans) == len(preempting)
        for span, i in zip(spans, preempting):
            back = next((r for r in trace[i:] if any(c.request_id == rid for c in r.chunks)), None)
            assert span["ts"] == pytest.approx(us(trace[i].start_time, origin), abs=1e-3)
            end = trace[-1].end_time if back is None else back.start_time
            assert span["ts"] + span["dur"] == pytest.approx(us(end, origin), abs=2e-3)
            if back is not None:
                after = evs[evs.index(span) + 1]
                assert (after["name"], after["args"]["recompute"]) == ("prefill", True)
    return origin


def _groups(events) -> dict[tuple[int, int], list[dict]]:
    groups = defaultdict(list)
    for e in events:
        groups[e["pid"], e["tid"]].append(e)
    return groups


def sampled(evs: list[dict], name: str | None = None) -> int:
    return sum(e["args"]["sampled"] for e in evs if e["ph"] == "X" and (name is None or e["name"] == name)
               and "sampled" in e["args"])


def tokens(evs: list[dict], name: str) -> int:
    return sum(e["args"]["tokens"] for e in evs if e["ph"] == "X" and e["name"] == name)


# ---- a hand-made trace, slice by slice ------------------------------------------------------
def record(step, start, end, chunks, finished=(), preempted=(), free=10):
    return StepRecord(step=step, start_time=start, end_time=end, chunks=tuple(ChunkRecord(*c) for c in chunks),
                      preempted=preempted, finished=finished, blocks_allocated=(), blocks_freed=(),
                      blocks_cache_hit=(), blocks_evicted=(), num_free_blocks=free, num_cached_free_blocks=0,
                      num_running=2, num_waiting=0, blocks=BlockSnapshot(10, 4, (), (), (), ()))


# A: a 4-token prompt, a speculative step (3 drafts, 2 accepted), is skipped in step 3, finishes by
# length. B: arrives at 0.5, a 5-token prompt in two chunks, stops in step 4. C: one prompt token,
# one decode, preempted in step 3 and never back.
HAND = [
    record(0, 0, 1, [("A", 0, 4, True, 9), ("C", 0, 1, True, 9)]),
    record(1, 1, 2, [("A", 4, 4, False, 9, (5, 6, 7), 2), ("B", 0, 3, True, None), ("C", 1, 1, False, 9)]),
    record(2, 2, 3, [("A", 8, 1, False, 9), ("B", 3, 2, True, 9)]),
    record(3, 3, 4, [("B", 5, 1, False, 9)], preempted=("C",)),
    record(4, 4, 5, [("A", 9, 1, False, 9), ("B", 6, 1, False, 9)], finished=(("B", "stop"),)),
    record(5, 5, 6, [("A", 10, 1, False, 9)], finished=(("A", "length"),)),
]


def test_a_hand_made_trace_slice_by_slice(tmp_path):
    doc = load(HAND, tmp_path, arrival_times={"A": 0.0, "B": 0.5, "C": 0.0}, name="hand")
    check_common(doc, HAND, {"A": 0.0, "B": 0.5, "C": 0.0}, num_blocks=10)
    tids, tracks = by_track(doc)
    assert tids == {"A": 1, "C": 2, "B": 3}  # in order of first appearance

    def rows(rid):
        return [(e["name"], e["ts"] / 1e6, (e["ts"] + e.get("dur", 0)) / 1e6, e["args"])
                for e in tracks[tids[rid]] if e["name"] != "queued"]

    assert rows("A") == [
        ("prefill", 0, 1, {"tokens": 4, "start": 0, "sampled": 1, "recompute": False}),
        ("decode", 1, 3, {"steps": 2, "tokens": 5, "sampled": 4, "draft_tokens": 3, "accepted_tokens": 2}),
        ("decode", 4, 6, {"steps": 2, "tokens": 2, "sampled": 2}),  # step 3 skipped A: a new slice
        ("finished", 6, 6, {"reason": "length"})]
    assert rows("B") == [
        ("prefill", 1, 2, {"tokens": 3, "start": 0, "sampled": 0, "recompute": False}),
        ("prefill", 2, 3, {"tokens": 2, "start": 3, "sampled": 1, "recompute": False}),
        ("decode", 3, 5, {"steps": 2, "tokens": 2, "sampled": 2}),
        ("finished", 5, 5, {"reason": "stop"})]
    assert rows("C") == [
        ("prefill", 0, 1, {"tokens": 1, "start": 0, "sampled": 1, "recompute": False}),
        ("decode", 1, 2, {"steps": 1, "tokens": 1, "sampled": 1}),
        ("preempted", 3, 6, {})]  # open at the trace's end
    queued_b = next(e for e in tracks[tids["B"]] if e["name"] == "queued")
    assert (queued_b["ts"], queued_b["dur"]) == (500000.0, 500000.0)
    step1 = next(e for e in doc["traceEvents"] if e["name"] == "step 1")
    assert (step1["args"]["draft_tokens"], step1["args"]["accepted_tokens"]) == (3, 2)
    assert {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"} == {
        "hand engine", "hand requests"}


def test_without_arrival_times_there_is_no_queued_slice_and_an_empty_trace_exports():
    doc = to_chrome_trace(HAND)
    assert doc["otherData"]["origin_s"] == 0 and not any(e["name"] == "queued" for e in doc["traceEvents"])
    empty = to_chrome_trace([])
    assert {e["ph"] for e in empty["traceEvents"]} == {"M"} and json.dumps(empty)


# ---- a real engine run ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_run(checkpoint):
    """Four requests on a 24-block cache with a 16-token budget: chunked prompts share steps with
    decodes and one request is preempted. A first run finds a token to stop request 1 on late (after
    the preemption), so the exported second run finishes by both stop and length; it is exported on
    its own, so its step numbers do not start at 0."""
    llm = LLM(checkpoint("qwen3"), max_model_len=128, block_size=4, num_kv_blocks=NUM_BLOCKS, max_num_seqs=4,
              max_num_batched_tokens=16, enable_prefix_caching=False)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(1, 200) for _ in range(n)]} for n in (20, 9, 30, 5)]
    max_tokens = (12, 20, 8, 16)
    first = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens],
                         use_tqdm=False)
    out = first[1].outputs[0].token_ids
    stop = next(out[i] for i in range(14, 19) if out.index(out[i]) == i)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True,
                             stop_token_ids=[stop] if i == 1 else None) for i, m in enumerate(max_tokens)]
    before = len(llm.llm_engine.trace)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    trace = llm.llm_engine.trace[before:]
    assert any(r.preempted for r in trace), "the small cache was meant to force a preemption"
    assert any(r.num_prefill_tokens and r.num_decode_tokens for r in trace), "no mixed prefill+decode step"
    assert {o.outputs[0].finish_reason for o in outputs} == {"stop", "length"}
    assert llm.llm_engine.block_manager.num_blocks == NUM_BLOCKS
    return trace, outputs


def test_a_real_engine_trace(engine_run, tmp_path):
    trace, outputs = engine_run
    arrivals = {o.request_id: o.metrics.arrival_time for o in outputs}
    doc = load(trace, tmp_path, arrival_times=arrivals)
    origin = check_common(doc, trace, arrivals, NUM_BLOCKS)
    assert trace[0].step > 0 and origin == min(arrivals.values())
    tids, tracks = by_track(doc)
    assert set(tids) == set(arrivals)
    for o in outputs:
        rid, evs, done = o.request_id, tracks[tids[o.request_id]], o.outputs[0]
        queued = next(e for e in evs if e["name"] == "queued")
        assert queued["ts"] + queued["dur"] == pytest.approx(us(o.metrics.first_scheduled_time, origin), abs=2e-3)
        # every generated token is sampled once: by the prompt's last chunk, by the recompute's last
        # chunk after each preemption, and by one decode step each
        assert sampled(evs) == len(done.token_ids)
        assert sampled(evs, "decode") == tokens(evs, "decode") == len(done.token_ids) - 1 - o.metrics.num_preemptions
        # prefill chunks: the prompt once (no prefix cache), then at each preemption the tokens it
        # held then (prompt and the tokens generated before that step)
        recomputed = 0
        for i, rec in enumerate(trace):
            if rid in rec.preempted:
                recomputed += len(o.prompt_token_ids) + sum(
                    c.sampled_token is not None for r in trace[:i] for c in r.chunks if c.request_id == rid)
        assert tokens(evs, "prefill") == len(o.prompt_token_ids) + recomputed
        assert tokens(evs, "prefill") == sum(c.num_tokens for r in trace for c in r.chunks
                                             if c.request_id == rid and c.is_prefill)
        assert len([e for e in evs if e["name"] == "preempted"]) == o.metrics.num_preemptions
        finish = [e for e in evs if e["ph"] == "i"]
        assert [e["args"]["reason"] for e in finish] == [done.finish_reason]
    assert sum(o.metrics.num_preemptions for o in outputs) >= 1


# ---- a simulator run ------------------------------------------------------------------------
def test_a_simulator_trace(tmp_path):
    workload = Workload(30, 40.0, Lengths("uniform", 300, 200), Lengths("uniform", 60, 40), seed=1).generate()
    sim = Simulator(SimConfig(get_model("Llama-3.1-8B"), get_hardware("L4"), block_size=16, num_kv_blocks=60,
                              max_num_seqs=8, max_num_batched_tokens=256))
    result = sim.run(workload)
    assert any(r.preempted for r in result.trace) and any(
        r.num_prefill_tokens and r.num_decode_tokens for r in result.trace)
    doc = load(result.trace, tmp_path, arrival_times=result.arrival_times, name="sim")
    origin = check_common(doc, result.trace, result.arrival_times, sim.num_blocks)
    assert origin == workload[0].arrival_time
    tids, tracks = by_track(doc)
    for seq, request in zip(result.requests, workload):
        evs = tracks[tids[seq.request_id]]
        assert sampled(evs) == request.output_len == len(seq.output_token_ids)
        assert [e["args"]["reason"] for e in evs if e["ph"] == "i"] == ["length"]
        assert len([e for e in evs if e["name"] == "preempted"]) == seq.num_preemptions
