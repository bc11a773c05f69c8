"""Every chapter's closing self-check: 3-5 questions, each answered with one click and explained on
answering.

A `Question` is a prompt, its choices, the index (or text) of the right one and an explanation. A
chapter builds its questions from its own variables at run time, so a question on a measured number
always quotes the number the chapter printed:

    Question(f"Without the cache the loop computed {work_no_cache} token positions. With it?",
             [f"{work_cache}", f"{n}", f"{work_no_cache // 2}"], answer=0,
             explanation=f"The prefill runs the {P} prompt tokens once, then one token a step: ...")

`SelfCheck` keeps the answers in a plain `SelfCheckState` (testable without a browser) and shows
one RadioButtons control per question and a view of the score and of each answered question's verdict
and explanation.
`SelfCheck.answer` answers from code (as the control does), and `SelfCheck.show` records every
question, the answers given and their explanations as static HTML. Text in backticks is shown as code.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Sequence, Union

import ipywidgets as widgets

from minivllm.lab.base import Lab, LabError

RIGHT_STYLE = "color:#1a7f37"
WRONG_STYLE = "color:#a40000"


def inline_html(text: str) -> str:
    """``text`` escaped, with `backticked` spans as ``<code>``."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


@dataclass(frozen=True)
class Question:
    """One multiple-choice question. ``answer`` is the index of the right choice, or its text (stored
    as the index). A field that cannot make a question raises a ``ValueError`` naming it."""

    prompt: str
    choices: tuple[str, ...]
    answer: Union[int, str]
    explanation: str

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"Question.prompt must be a non-empty string, got {self.prompt!r}")
        if isinstance(self.choices, (str, bytes)) or not isinstance(self.choices, Sequence):
            raise ValueError(f"Question.choices must be a list of strings, got {self.choices!r}")
        choices = tuple(self.choices)
        if len(choices) < 2:
            raise ValueError(f"Question.choices needs at least 2 choices, got {len(choices)}")
        for c in choices:
            if not isinstance(c, str) or not c.strip():
                raise ValueError(f"Question.choices must all be non-empty strings, got {c!r}")
        if len(set(choices)) != len(choices):
            dup = next(c for c in choices if choices.count(c) > 1)
            raise ValueError(f"Question.choices must be distinct: {dup!r} appears more than once")
        answer = self.answer
        if isinstance(answer, str):
            if answer not in choices:
                raise ValueError(f"Question.answer={answer!r} is not one of the choices {list(choices)}")
            answer = choices.index(answer)
        elif isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"Question.answer={answer!r} must be the index of a choice (0 to {len(choices) - 1}) "
                             "or a choice's text")
        if not isinstance(self.explanation, str) or not self.explanation.strip():
            raise ValueError(f"Question.explanation must be a non-empty string, got {self.explanation!r}")
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "answer", answer)

    @property
    def right_choice(self) -> str:
        return self.choices[self.answer]


class SelfCheckState:
    """The questions and the choice given for each (None: not answered yet)."""

    def __init__(self, questions: Sequence[Question]):
        if isinstance(questions, Question) or not isinstance(questions, Sequence) or not questions:
            raise ValueError(f"questions must be a non-empty list of Question, got {questions!r}")
        for i, q in enumerate(questions):
            if not isinstance(q, Question):
                raise ValueError(f"questions[{i}] must be a Question, got {type(q).__name__}")
        self.questions = list(questions)
        self.chosen: list[int | None] = [None] * len(self.questions)

    def choice_index(self, i: int, choice: Union[int, str]) -> int:
        """The index of ``choice`` (an index or a choice's text) in question ``i``'s choices."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.questions):
            raise LabError(f"questions[{i!r}] does not exist: there are {len(self.questions)} questions (0 to "
                           f"{len(self.questions) - 1})")
        choices = self.questions[i].choices
        if isinstance(choice, str):
            if choice not in choices:
                raise LabError(f"{choice!r} is not a choice of questions[{i}]")
            return choices.index(choice)
        if isinstance(choice, bool) or not isinstance(choice, int) or not 0 <= choice < len(choices):
            raise LabError(f"choice {choice!r} of questions[{i}] must be 0 to {len(choices) - 1} or a choice's text")
        return choice

    def answer(self, i: int, choice: Union[int, str]) -> bool:
        """Record ``choice`` for question ``i`` (answering again replaces it); whether it is right."""
        index = self.choice_index(i, choice)
        self.chosen[i] = index
        return index == self.questions[i].answer

    def is_answered(self, i: int) -> bool:
        return self.chosen[i] is not None

    def is_right(self, i: int) -> bool:
        return self.chosen[i] == self.questions[i].answer

    @property
    def num_answered(self) -> int:
        return sum(c is not None for c in self.chosen)

    @property
    def num_right(self) -> int:
        return sum(self.is_right(i) for i in range(len(self.questions)))

    # ---- HTML -----------------------------------------------------------------------------------
    def score_html(self) -> str:
        n = len(self.questions)
        if not self.num_answered:
            return f"<p><b>{n} questions</b>, none answered yet: pick an answer to see why it is right or not.</p>"
        return f"<p><b>{self.num_right} of {n} right</b> ({self.num_answered} answered).</p>"

    def feedback_html(self, i: int, numbered: bool = True) -> str:
        """Question ``i``'s verdict and explanation (after its number unless ``numbered`` is False); "" until
        it is answered."""
        if not self.is_answered(i):
            return ""
        q = self.questions[i]
        if self.is_right(i):
            verdict = f"<b style='{RIGHT_STYLE}'>&#10003; Right.</b>"
        else:
            verdict = (f"<b style='{WRONG_STYLE}'>&#10007; Not quite:</b> the answer is "
                       f"<i>{inline_html(q.right_choice)}</i>.")
        number = f"<b>{i + 1}.</b> " if numbered else ""
        return f"<p class='minivllm-self-check-feedback'>{number}{verdict} {inline_html(q.explanation)}</p>"

    def feedback_view_html(self) -> str:
        """The score, then each answered question's verdict and explanation (the live widget's view,
        under the controls)."""
        return self.score_html() + "".join(self.feedback_html(i) for i in range(len(self.questions)))

    def question_html(self, i: int) -> str:
        q, chosen = self.questions[i], self.chosen[i]
        items = "".join(f"<li>{'&#9673;' if j == chosen else '&#9675;'} {inline_html(c)}"
                        f"{' <i>(your answer)</i>' if j == chosen else ''}</li>" for j, c in enumerate(q.choices))
        return (f"<p><b>{i + 1}.</b> {inline_html(q.prompt)}</p>"
                f"<ul style='list-style:none;padding-left:1.5em;margin:0'>{items}</ul>"
                f"{self.feedback_html(i, numbered=False)}")

    def html(self) -> str:
        """Every question with its choices (the one given marked) and, once answered, its verdict and
        explanation; then the score: the static record of the quiz."""
        body = "".join(self.question_html(i) for i in range(len(self.questions)))
        return f"<div class='minivllm-self-check'>{body}{self.score_html()}</div>"


class SelfCheck(Lab):
    """The widget: each question's prompt above its RadioButtons control, then the view: the score and,
    for each answered question, the verdict and explanation. `show` records the whole quiz (prompts,
    choices, the answers given, verdicts and explanations) as HTML, since a saved notebook keeps no
    controls."""

    def __init__(self, questions: Sequence[Question], title: str = "Self-check"):
        self.state = SelfCheckState(questions)
        self.title = title
        self.radios = [widgets.RadioButtons(options=list(q.choices), value=None,
                                            layout={"width": "max-content"}) for q in self.state.questions]
        controls = [self.on_change(radio, self._handler(i)) for i, radio in enumerate(self.radios)]
        super().__init__(controls)
        base = self.widget  # one question a row, its prompt above its control, instead of one row of controls
        rows = [widgets.VBox([widgets.HTML(f"<p><b>{i + 1}.</b> {inline_html(q.prompt)}</p>"), radio])
                for i, (q, radio) in enumerate(zip(self.state.questions, self.radios))]
        self.widget = widgets.VBox([widgets.HTML(f"<h4>{html.escape(title)}</h4>"), *rows, self.error, self.view])
        for name in base._dom_classes:
            self.widget.add_class(name)

    def _handler(self, i: int):
        def handle(value):
            if value is not None:
                self.state.answer(i, value)
        return handle

    def answer(self, i: int, choice: Union[int, str]) -> bool:
        """Answer question ``i`` (0-based) with ``choice`` (its index or its text), as clicking its
        control does; returns whether it is right. A question or choice that does not exist raises
        `LabError` and changes nothing."""
        index = self.state.choice_index(i, choice)
        self.radios[i].value = self.state.questions[i].choices[index]
        return self.state.is_right(i)

    def render(self) -> str:
        return self.state.feedback_view_html()

    def snapshot_html(self) -> str:
        return self.error.value + f"<h4>{html.escape(self.title)}</h4>" + self.state.html()
