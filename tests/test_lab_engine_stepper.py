"""Chapter 01's lab driven like a browser would: the view must show the real engine's last step and
block tables, and bad settings must appear as messages in the widget."""
from __future__ import annotations

import pytest

from minivllm import LLM
from minivllm.lab import EngineStepperLab


@pytest.fixture
def lab(checkpoint):
    llm = LLM(checkpoint("qwen3"), max_model_len=64, block_size=4, max_num_batched_tokens=8)
    return EngineStepperLab(llm.llm_engine)


def test_steps_show_the_engines_own_schedule_and_blocks(lab):
    engine = lab.state.engine
    lab.add("the engine schedules every request", max_tokens=3)
    lab.add("def", max_tokens=2)
    assert lab.error_message == ""
    lab.step()
    rec = engine.trace[-1]
    assert rec.num_batched_tokens <= 8
    for chunk in rec.chunks:
        assert f">{chunk.request_id}</td>" in lab.view.value
    for seq in engine.scheduler.running:
        assert str(seq.block_table) in lab.view.value, "the view shows the BlockManager's real table"
    while engine.has_unfinished_requests():
        lab.step()
    assert set(lab.state.finished) == {"r0", "r1"}
    assert all(reason.startswith(("length", "stop")) for reason in lab.state.finished.values())
    assert f"KV blocks used 0 of {engine.block_manager.num_blocks}" in lab.view.value


@pytest.mark.parametrize("action,message", [
    (lambda lab: lab.step(), "nothing to run: add a request first"),
    (lambda lab: lab.add("", 4), "is empty"),
    (lambda lab: lab.add("x " * 200, 4), "longer than max_model_len=64"),
    (lambda lab: lab.add("def", 0), "max_tokens=0 must be at least 1"),
])
def test_bad_settings_show_a_message_and_change_nothing(lab, action, message):
    steps = len(lab.state.engine.trace)
    controls = (lab.prompt.value, lab.max_tokens.value)
    action(lab)
    assert message in lab.error_message
    assert "Traceback" not in lab.error.value
    assert len(lab.state.engine.trace) == steps and not lab.state.engine.has_unfinished_requests()
    assert (lab.prompt.value, lab.max_tokens.value) == controls, "the controls never keep a refused request"


def test_reset_and_cache_size_make_a_new_engine(lab):
    first = lab.state.engine
    lab.add("def", max_tokens=2)
    lab.step()
    lab.reset()
    engine = lab.state.engine
    assert engine is not first and not engine.trace and not engine.has_unfinished_requests()
    assert engine.block_manager.num_blocks == first.block_manager.num_blocks and lab.state.finished == {}
    assert "no step has run yet" in lab.view.value
    # a cache of 6 blocks of 4 tokens: two requests of 13 and 9 prompt tokens outgrow it and one is preempted
    lab.num_kv_blocks.value = 6
    engine = lab.state.engine
    assert engine.block_manager.num_blocks == 6 and "KV blocks used 0 of 6" in lab.view.value
    lab.add("the engine schedules every request", max_tokens=8)
    lab.add("def fibonacci(n):", max_tokens=8)
    preempted = []
    while engine.has_unfinished_requests():
        lab.step()
        preempted += engine.trace[-1].preempted
        if engine.trace[-1].preempted:
            assert f"preempted: {engine.trace[-1].preempted[0]}" in lab.view.value
    assert preempted and lab.error_message == ""
    lab.add("x " * 30, max_tokens=4)  # 31+ tokens need 8+ blocks: longer than the whole cache
    assert "but the cache has only 6" in lab.error_message and not engine.has_unfinished_requests()


@pytest.mark.parametrize("value", [0, 10 ** 9])
def test_a_refused_cache_size_puts_the_control_back(lab, value):
    engine = lab.state.engine
    n = engine.block_manager.num_blocks
    lab.num_kv_blocks.value = value
    assert f"num_kv_blocks={value} must be an int in 1..{n}" in lab.error_message
    assert lab.num_kv_blocks.value == n and lab.state.engine is engine
