"""Chapter 07's lab driven like a browser would: its steps must add up to what the engine emitted,
its colours must follow the acceptance rule's outcome, and bad settings must show in the widget."""
from __future__ import annotations

import re

import pytest

from minivllm import LLM, SamplingParams, course
from minivllm.core.records import expected_tokens_per_step
from minivllm.lab.spec import SpecDecodeLab

PROMPT = "    def push(self, item):\n        self.items.append(item)\n\n    def pop(self):\n"


@pytest.fixture(scope="module")
def lab():
    return SpecDecodeLab(course.model_path("target"), course.model_path("draft"), PROMPT, max_tokens=24)


@pytest.fixture(scope="module")
def plain_greedy():
    llm = LLM(course.model_path("target"), max_model_len=512, num_kv_blocks=256)
    return list(llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
                .outputs[0].token_ids)


def emitted(run) -> list[int]:
    return [t for s in run.steps for t in s.draft_token_ids[:s.num_accepted]
            + ((s.sampled_token,) if s.sampled_token is not None else ())]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
@pytest.mark.parametrize("k", [1, 4])
def test_steps_add_up_to_the_greedy_output_without_speculation(lab, plain_greedy, method, k):
    lab.method.value, lab.temperature.value, lab.k.value = method, 0.0, k
    run = lab.state
    assert lab.error_message == "" and run.settings == (method, k, 0.0)
    assert emitted(run)[:len(plain_greedy)] == run.output_token_ids == plain_greedy
    for step in run.decode_steps:
        assert step.num_accepted <= len(step.draft_token_ids) <= k
        assert step.added_kind == ("plain" if not step.draft_token_ids else
                                   "bonus" if step.num_accepted == len(step.draft_token_ids) else "correction")
    m = run.summary()
    assert m["proposed"] == sum(len(s.draft_token_ids) for s in run.decode_steps)  # the metrics agree with the trace
    assert m["accepted"] == sum(s.num_accepted for s in run.decode_steps)
    assert m["tokens"] == sum(s.num_emitted for s in run.decode_steps) >= len(plain_greedy) - 1


def test_the_view_colours_every_draft_of_the_shown_steps(lab):
    lab.method.value, lab.k.value, lab.temperature.value = "draft_model", 3, 1.0
    shown = lab.state.decode_steps[:lab.max_rows]
    html = lab.view.value.split("</p>", 2)[-1]  # past the summary and the legend
    count = lambda kind: len(re.findall(f'title="{kind}"', html))
    assert count("accepted") == sum(s.num_accepted for s in shown) > 0
    assert count("rejected") == sum(s.num_accepted < len(s.draft_token_ids) for s in shown)
    assert count("bonus") + count("correction") + count("plain") == sum(s.sampled_token is not None for s in shown)
    assert bytes(lab.image.value[:4]) == b"\x89PNG"


def test_the_theory_column_is_the_iid_formula(lab):
    lab.method.value, lab.k.value, lab.temperature.value = "draft_model", 2, 0.0
    steps = lab.state.decode_steps
    accepted = sum(s.num_accepted for s in steps)
    checked = sum(s.num_accepted + (s.num_accepted < len(s.draft_token_ids)) for s in steps)
    alpha = accepted / checked
    assert lab.state.summary()["i.i.d. theory"] == pytest.approx(1 + alpha + alpha ** 2)
    assert expected_tokens_per_step(1.0, 2) == 3.0 and expected_tokens_per_step(0.0, 5) == 1.0


def test_bad_settings_show_in_the_widget_and_keep_the_last_run(lab):
    before = lab.state.steps
    lab.prompt.value = ""
    assert "prompt is empty" in lab.error_message and "the value in effect" in lab.error_message
    assert lab.state.steps is before and lab.prompt.value == PROMPT
    lab.temperature.value = lab.temperature.value + 0.5  # the next accepted setting clears the message
    assert lab.error_message == ""
    with pytest.raises(ValueError, match="method='medusa'"):
        lab.state.llm("medusa", 2)
    with pytest.raises(ValueError, match="alpha=1.5"):
        expected_tokens_per_step(1.5, 2)
