"""The chapters' closing self-check (minivllm.lab.self_check), driven as a notebook and a browser drive
it: answer from code or set a control's value, then read the state and the rendered HTML."""
from __future__ import annotations

import pytest

from minivllm.lab import LabError, Question, SelfCheck
from minivllm.lab.self_check import SelfCheckState


def questions() -> list[Question]:
    tokens = 108  # as a chapter would: the numbers come from its variables
    return [Question(f"How many token positions did the loop compute with the `KV cache`? ({tokens}?)",
                     [f"{tokens}", f"{tokens * 54}", "0"], answer=0,
                     explanation="The prefill once, then one new token a step."),
            Question("Which is memory-bound on an H100?", ["decode attention", "a 2048-token prefill"],
                     answer="decode attention", explanation="About 4 FLOP/byte, far left of the ridge <295>."),
            Question("Is the KV cache an approximation?", ["yes", "no"], answer=1,
                     explanation="Greedy tokens are identical with and without it.")]


def test_question_normalises_its_fields():
    q = Question("p?", ["a", "b", "c"], "c", "because")
    assert q.choices == ("a", "b", "c") and q.answer == 2 and q.right_choice == "c"
    assert Question("p?", ("a", "b"), 0, "e").answer == 0


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt=""), "prompt"),
    (dict(prompt=3), "prompt"),
    (dict(choices=["only one"]), "choices"),
    (dict(choices="ab"), "choices"),
    (dict(choices=["a", "a"]), "choices"),
    (dict(choices=["a", ""]), "choices"),
    (dict(answer=2), "answer"),
    (dict(answer=-1), "answer"),
    (dict(answer=True), "answer"),
    (dict(answer="c"), "answer"),
    (dict(explanation=" "), "explanation"),
])
def test_bad_questions_are_refused_naming_the_field(kwargs, field):
    args = dict(prompt="p?", choices=["a", "b"], answer=0, explanation="e") | kwargs
    with pytest.raises(ValueError, match=rf"Question\.{field}"):
        Question(**args)


def test_bad_question_lists_are_refused():
    for bad in ([], None, questions()[0], ["not a question"]):
        with pytest.raises(ValueError, match="questions"):
            SelfCheck(bad)


def test_nothing_answered_shows_no_explanation():
    lab = SelfCheck(questions())
    assert "none answered yet" in lab.view.value
    record = lab.snapshot_html()  # what show() records: every question and its choices
    assert record.count("<ul") == 3 and "<code>KV cache</code>" in record
    for text in (lab.view.value, record):
        assert "The prefill once" not in text and "identical" not in text and "ridge" not in text
    assert all(r.value is None for r in lab.radios)


def test_a_right_answer_shows_right_and_only_its_explanation():
    lab = SelfCheck(questions())
    assert lab.answer(0, "108") is True
    assert lab.radios[0].value == "108", "the control shows the answer given from code"
    for text in (lab.view.value, lab.snapshot_html()):
        assert "Right." in text and "The prefill once, then one new token a step." in text
        assert "identical" not in text and "ridge" not in text, "unanswered questions keep their explanation hidden"
        assert "1 of 3 right" in text
    assert "(your answer)" in lab.snapshot_html()


def test_a_wrong_answer_shows_wrong_the_right_choice_and_the_explanation():
    lab = SelfCheck(questions())
    assert lab.answer(1, 1) is False
    view = lab.view.value
    assert "Not quite" in view and "the answer is <i>decode attention</i>" in view
    assert "ridge &lt;295&gt;" in view, "explanations are escaped"
    assert "0 of 3 right" in view and "1 answered" in view
    # answering again replaces the answer
    lab.answer(1, "decode attention")
    assert "Not quite" not in lab.view.value and "1 of 3 right" in lab.view.value


def test_the_control_answers_as_code_does():
    lab = SelfCheck(questions())
    lab.radios[2].value = "no"  # as a click in the browser
    assert lab.state.chosen == [None, None, 1] and lab.state.num_right == 1
    assert "Greedy tokens are identical" in lab.view.value


def test_the_widget_shows_each_prompt_above_its_control_then_the_view():
    lab = SelfCheck(questions(), title="Self-check: chapter 00")
    children = lab.widget.children
    assert "Self-check: chapter 00" in children[0].value
    assert [row.children[1] for row in children[1:4]] == lab.radios
    assert "How many token positions" in children[1].children[0].value
    assert children[-2:] == (lab.error, lab.view)


def test_answers_to_nothing_are_refused_and_change_nothing():
    lab = SelfCheck(questions())
    lab.answer(0, 0)
    before = lab.view.value
    with pytest.raises(LabError, match=r"questions\[3\] does not exist"):
        lab.answer(3, 0)
    with pytest.raises(LabError, match=r"choice 5 of questions\[0\]"):
        lab.answer(0, 5)
    with pytest.raises(LabError, match=r"'maybe' is not a choice of questions\[1\]"):
        lab.answer(1, "maybe")
    assert lab.view.value == before and lab.state.chosen == [0, None, None]


def test_state_alone_without_widgets():
    state = SelfCheckState(questions())
    assert state.answer(0, 1) is False and state.answer(2, "no") is True
    assert (state.num_answered, state.num_right) == (2, 1)
    assert "Not quite" in state.feedback_html(0) and state.feedback_html(1) == ""
    assert state.html().count("(your answer)") == 2


def test_callbacks_never_print_and_show_records_the_state(capsys, monkeypatch):
    lab = SelfCheck(questions(), title="Self-check: chapter 00")
    lab.radios[0].value = "0"
    lab.answer(1, 0)
    assert capsys.readouterr().out == ""
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    lab.show()
    assert len(shown) == 1
    html = shown[0].data
    assert "Self-check: chapter 00" in html and "Not quite" in html and "Right." in html
    assert capsys.readouterr().out == ""
