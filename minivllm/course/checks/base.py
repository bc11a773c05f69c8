"""What every exercise check shares: the result record, the stage runner, the chi-square test,
the engine the checks plug into, and the wording of a token mismatch."""
from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class CheckResult:
    name: str
    passed: bool
    lines: list[str] = field(default_factory=list)  # one "ok ..." line per stage that passed
    failure: str | None = None                      # the first failing case, in words

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        last = f"PASS  {self.name}" if self.passed else f"FAIL  {self.name}: {self.failure}"
        return "\n".join(self.lines + [last])


HISTORY: list[CheckResult] = []


class CheckFailed(Exception):
    """Raised inside a check at the first failing case; its message is what the learner reads."""


def run_stages(name: str, stages: list[Callable[[], str]], verbose: bool) -> CheckResult:
    result = CheckResult(name, passed=False)
    try:
        for stage in stages:
            result.lines.append(f"ok    {stage()}")
        result.passed = True
    except CheckFailed as e:
        result.failure = str(e)
    HISTORY.append(result)
    if verbose:
        print(result)
    return result


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square test of ``counts`` against ``probs`` (tokens with probability 0
    excluded). Bins expected to hold fewer than ``min_expected`` draws are pooled into one."""
    keep = probs > 0
    counts, probs = counts[keep].double(), probs[keep].double()
    expected = probs * counts.sum()
    order = expected.argsort(descending=True)
    counts, expected = counts[order], expected[order]
    small = expected < min_expected
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    dof = len(counts) - 1
    if dof < 1:
        return 1.0
    stat = float(((counts - expected) ** 2 / expected).sum())
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


P_VALUE_THRESHOLD = 1e-4


def pvalue_words(pval: float) -> str:
    """How a failing check reports a chi-square p-value: "p = 3.2e-07, below 0.0001"."""
    return f"p {'< 1e-300' if pval < 1e-300 else f'= {pval:.1e}'}, below {P_VALUE_THRESHOLD:g}"


def token_mismatch(got: list[int], want: list[int], mine: str, theirs: str) -> str | None:
    """Where two outputs first differ, in words (``mine`` and ``theirs`` name them); None if equal."""
    if list(got) == list(want):
        return None
    pos = next((t for t, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return (f"output token {pos} is {got[pos] if pos < len(got) else 'missing'} {mine}, "
            f"{want[pos] if pos < len(want) else 'missing'} {theirs}")


@contextlib.contextmanager
def quiet_engine_logs():
    logger = logging.getLogger("minivllm")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def check_model_folder():
    """The model the checks run: the course's target model when it is there, else a tiny random
    Qwen3 built offline (`minivllm.models.tiny`) in a folder removed afterwards."""
    from minivllm import course
    from minivllm.models.tiny import save_tiny_checkpoint

    try:
        folder = course.model_path("target")
    except FileNotFoundError:  # weights not trained yet
        folder = None
    if folder is not None:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="minivllm-check-") as tmp:
        yield save_tiny_checkpoint(tmp)


ENGINE_PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "import os\nimport"]


def is_not_implemented(e: BaseException) -> bool:
    """Whether ``e`` is, or wraps, the skeleton's NotImplementedError (the Triton interpreter re-raises
    a kernel's exception as an ``InterpreterError``)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, NotImplementedError) or "NotImplementedError" in repr(e):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False
