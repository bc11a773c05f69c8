"""The PagedAttention Cinema (chapters 02 and 03): every frame must be what the real BlockManager held
after that step. The reference is the live BlockManager itself, read after each `engine.step()`, and
hand-checked invariants of paging; the widget is driven like a browser would (values, clicks)."""
from __future__ import annotations

import re

import pytest

from minivllm import LLM, SamplingParams
from minivllm.lab.cinema import Cinema, CinemaLab, LiveCinemaLab, replay

BLOCK_SIZE = 4


def plain(html: str) -> str:
    """The HTML without its style attributes (the tables' padding and borders)."""
    return re.sub(r' style="[^"]*"', "", html)


def run_with_live_state(llm: LLM, prompts: list[list[int]], max_tokens: int):
    """Step the engine by hand; after every step record the BlockManager's own state."""
    engine = llm.llm_engine
    bm = engine.block_manager
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": ids},
                           SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    live = []
    while engine.has_unfinished_requests():
        engine.step()
        live.append({
            "tables": {s.request_id: (tuple(s.block_table), s.num_computed_tokens) for s in engine.scheduler.running},
            "free_queue": tuple(bm.free_queue),
            "cached_free": {b for b in bm.free_queue if bm.blocks[b].block_hash is not None},
        })
    return engine.trace, live


@pytest.fixture(scope="module")
def run(checkpoint):
    # 14 blocks of 4 tokens for prompts sharing an 8-token prefix: prefix hits, preemption, eviction
    llm = LLM(checkpoint("qwen3"), max_model_len=64, block_size=BLOCK_SIZE, num_kv_blocks=14,
              max_num_batched_tokens=16, max_num_seqs=4)
    prefix = [5, 6, 7, 8, 9, 10, 11, 12]
    prompts = [prefix + [20 + i] * (3 + 2 * i) for i in range(5)] + [list(range(30, 43))]
    trace, live = run_with_live_state(llm, prompts, max_tokens=10)
    # a second wave after everything finished: its prompts hit blocks that were freed but kept cached
    more, live2 = run_with_live_state(llm, [prefix + [99] * 5], max_tokens=2)
    return trace, live + live2


def test_frames_replay_exactly_what_the_block_manager_held(run):
    trace, live = run
    frames = replay(trace)
    assert len(frames) == len(live)
    for frame, state in zip(frames, live):
        snap = frame.record.blocks
        tables = {rid: (table, tokens)
                  for rid, tokens, table in zip(snap.request_ids, snap.num_tokens, snap.block_tables)}
        assert tables == state["tables"]
        assert frame.free_queue == state["free_queue"], f"step {frame.record.step}: free queue order"
        assert frame.cached_free == state["cached_free"], f"step {frame.record.step}: cached free blocks"
        assert frame.num_free == frame.record.num_free_blocks
        assert len(frame.cached_free) == frame.record.num_cached_free_blocks


def test_frames_keep_the_invariants_of_paging(run):
    trace, _ = run
    frames = replay(trace)
    assert any(f.record.preempted for f in frames), "the workload must force a preemption"
    assert any(f.num_shared for f in frames), "the shared prefix must be shared"
    assert any(f.record.blocks_evicted for f in frames), "the small cache must evict"
    for f in frames:
        snap = f.record.blocks
        assert f.num_used + f.num_free == snap.num_blocks == 14
        holders: dict[int, int] = {}
        for rid, tokens, table in zip(snap.request_ids, snap.num_tokens, snap.block_tables):
            assert len(table) == -(-tokens // BLOCK_SIZE), f"{rid} at step {f.record.step}"
            assert len(set(table)) == len(table)
            for b in table:
                holders[b] = holders.get(b, 0) + 1
        assert {b: r for b, r in enumerate(f.ref_counts) if r} == holders
        fill = f.block_fill()
        assert all(1 <= fill[b] <= BLOCK_SIZE for b in holders) and not any(fill[b] for b in f.free_queue)
        assert all(fill[b] == BLOCK_SIZE for b, r in holders.items() if r > 1), "only full blocks are shared"
        assert f.cached_free <= set(f.free_queue)
        gone = set(f.record.preempted) | {rid for rid, _ in f.record.finished}
        assert not gone & set(snap.request_ids), "a preempted or finished request owns no blocks"


def test_a_later_request_hits_blocks_that_were_freed_but_still_cached(run):
    trace, _ = run
    frames = replay(trace)
    wave2 = next(i for i, f in enumerate(frames) if "r0" in f.record.blocks.request_ids and i > 0
                 and not frames[i - 1].record.blocks.request_ids)
    before = frames[wave2 - 1]
    assert before.num_used == 0 and before.cached_free, "everything finished, cached blocks stay"
    hits = frames[wave2].record.blocks_cache_hit
    assert hits and set(hits) <= before.cached_free


def test_the_widget_is_driven_by_values_and_clicks(run):
    trace, _ = run
    lab = CinemaLab(trace)
    assert "frame 0 of" in lab.view.value and bytes(lab.image.value).startswith(b"\x89PNG")
    lab.step(2)
    assert lab.slider.value == 2 == lab.state.frame_index and "frame 2 of" in lab.view.value
    lab.play.value = 5  # the play button moves the slider, the slider moves the state
    assert lab.slider.value == 5 and lab.state.frame_index == 5
    preempting = lab.first_frame(lambda rec: rec.preempted)
    lab.seek(preempting)
    victim = trace[preempting].preempted[0]
    lab.select(victim)
    assert f"request {victim} holds no blocks in this frame" in lab.view.value
    assert f"preempted: {victim}" in lab.view.value
    lab.seek(preempting - 1)
    table, tokens = lab.state.frame.table(victim)
    assert f"request {victim}: {tokens} tokens in {len(table)} blocks" in lab.view.value
    for i, b in enumerate(table):
        assert f"<tr><td>{i}</td><td>{b}</td>" in plain(lab.view.value)
    lab.seek(len(trace) - 1)
    lab.step()
    assert lab.error_message == "this is the last frame" and lab.state.frame_index == len(trace) - 1


def test_refuses_traces_it_cannot_show(run, checkpoint):
    trace, _ = run
    with pytest.raises(ValueError, match="trace is empty"):
        Cinema([])
    with pytest.raises(ValueError, match="trace starts at step 3"):
        Cinema(trace[3:])
    big = LLM(checkpoint("qwen3"), max_model_len=64, block_size=4, num_kv_blocks=600)
    big.generate(["a b"], SamplingParams(max_tokens=1), use_tqdm=False)
    with pytest.raises(ValueError, match="the cache has 600 blocks"):
        Cinema(big.llm_engine.trace)
    with pytest.raises(ValueError, match="interval_ms=0 must be an int >= 1"):
        CinemaLab(trace, interval_ms=0)
    lab = CinemaLab(trace)
    lab.seek(len(trace) + 5)  # the slider clamps to its last frame
    assert lab.state.frame_index == len(trace) - 1 and lab.error_message == ""
    with pytest.raises(ValueError, match=f"frame=-1 is outside 0..{len(trace) - 1}"):
        lab.state.seek(-1)
    with pytest.raises(ValueError, match="request_id='nope' never held a block"):
        lab.state.select("nope")


def test_the_layout_gives_every_frame_room_and_separates_table_headers(run):
    trace, _ = run
    lab = CinemaLab(trace)
    assert lab.slider.layout.width == "640px", "a slider of ~120 px cannot pick one of 100+ frames"
    assert lab.slider in lab.widget.children[0].children and lab.play in lab.widget.children[0].children
    headers = re.findall(r"<th( style=\"[^\"]*\")?>", lab.view.value)
    assert headers and all("padding" in h for h in headers), "header cells need padding, or they run together"


# ---- the live Cinema: the learner's own run on a real engine ------------------------------------------
def block_manager_state(engine):
    bm = engine.block_manager
    return {"tables": {s.request_id: (tuple(s.block_table), s.num_computed_tokens) for s in engine.scheduler.running},
            "free_queue": tuple(bm.free_queue),
            "cached_free": {b for b in bm.free_queue if bm.blocks[b].block_hash is not None}}


@pytest.fixture
def live(checkpoint):
    return LiveCinemaLab(checkpoint("qwen3"), num_kv_blocks=12, block_size=BLOCK_SIZE, max_model_len=64,
                         max_num_batched_tokens=16, max_num_seqs=4)


def test_live_frames_are_the_block_manager_after_every_step(live):
    engine = live.state.engine
    assert "no step yet" in live.view.value and bytes(live.image.value).startswith(b"\x89PNG")
    for prompt_len in (13, 11, 15, 9):  # 8 tokens of shared prefix each
        live.add(prompt_len=prompt_len, max_tokens=10, shared_prefix=8)
    assert live.error_message == "" and [r.request_id for r in live.state.requests] == ["r0", "r1", "r2", "r3"]
    ids = [engine.requests[f"r{i}"].token_ids for i in range(4)]
    assert all(t[:8] == ids[0][:8] for t in ids) and len({tuple(t[8:10]) for t in ids}) == 4
    steps = 0
    while engine.has_unfinished_requests():
        live.step()
        steps += 1
        frame, state = live.state.frame, block_manager_state(engine)
        assert len(live.state.frames) == steps == len(engine.trace) and live.state.frame_index == steps - 1
        snap = frame.record.blocks
        assert dict(zip(snap.request_ids, zip(snap.block_tables, snap.num_tokens))) == state["tables"]
        assert frame.free_queue == state["free_queue"] and frame.cached_free == state["cached_free"]
        assert live.slider.value == live.slider.max == steps - 1, "the frame slider follows the engine"
        assert f"frame {steps - 1} of {steps - 1}" in live.view.value
    assert live.error_message == ""
    frames = live.state.frames
    assert any(f.num_shared for f in frames), "the shared prefix is shared"
    assert any(f.record.preempted for f in frames), "12 blocks of 4 cannot hold the four requests"
    first = next(f for f in frames if f.record.preempted)
    live.seek(frames.index(first))
    assert f"preempted: {first.record.preempted[0]}" in live.view.value
    assert set(live.state.finished) == {"r0", "r1", "r2", "r3"}
    assert "finished (length)" in plain(live.view.value)
    live.step()
    assert live.error_message == "every request has finished: add another one"


def test_live_settings_make_a_new_engine_and_refusals_put_controls_back(live):
    live.add(prompt_len=10, max_tokens=4)
    live.step()
    first = live.state.engine
    live.set(block_size=8)
    assert live.error_message == "" and live.state.engine is not first
    assert live.state.settings == {"num_kv_blocks": 12, "block_size": 8, "enable_prefix_caching": True}
    assert live.state.requests == [] and live.state.frames == [] and "no step yet" in live.view.value
    assert live.slider.max == 0 and live.request.options == ()
    live.set(enable_prefix_caching=False, num_kv_blocks=5)
    assert live.state.settings == {"num_kv_blocks": 5, "block_size": 8, "enable_prefix_caching": False}
    assert live.state.engine.block_manager.num_blocks == 5 == live.state.num_blocks

    def refused(action, message, control, value):
        engine, requests = live.state.engine, list(live.state.requests)
        action()
        assert message in live.error_message and "Traceback" not in live.error.value
        assert control.value == value, "the control is back at the value in effect"
        assert live.state.engine is engine and live.state.requests == requests

    refused(lambda: live.set(num_kv_blocks=600), "the Cinema draws at most 512", live.num_kv_blocks, 5)
    refused(lambda: live.set(num_kv_blocks=0), "num_kv_blocks=0 must be an int >= 1", live.num_kv_blocks, 5)
    # 5 blocks of 8 tokens: 40 slots, and a request must fit the whole cache by itself
    refused(lambda: live.add(prompt_len=30, max_tokens=20), "needs 7 KV blocks, but the cache has only 5",
            live.prompt_len, 10)  # back at the last request added
    refused(lambda: live.add(prompt_len=4, max_tokens=2, shared_prefix=6), "shared_prefix=6 is longer than the prompt",
            live.shared_prefix, 0)
    live.add(prompt_len=12, max_tokens=3, shared_prefix=4)
    assert live.error_message == "" and (live.prompt_len.value, live.max_tokens.value) == (12, 3)
    refused(lambda: live.add(prompt_len=64, max_tokens=1), "needs 8 KV blocks", live.prompt_len, 12)
    live.step()
    live.reset()
    assert live.state.requests == [] and live.state.settings["num_kv_blocks"] == 5
    live.step()
    assert live.error_message == "nothing to run: add a request first"
    with pytest.raises(ValueError, match="not a cache setting"):
        live.set(max_model_len=32)
