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
        assert f"<td>{chunk.request_id}</td>" in lab.view.value
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
