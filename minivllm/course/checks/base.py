"""What every exercise check shares: the result record, the stage runner, the chi-square test,
the engine the checks plug into, the wording of a token mismatch, and the module that carries a
learner's functions to other processes."""
from __future__ import annotations

import contextlib
import importlib
import inspect
import itertools
import logging
import os
import sys
import tempfile
import textwrap
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
    """Only the engine's warnings inside the block (its INFO lines are not the check's output)."""
    importlib.import_module("minivllm.llm")  # importing it sets the engine's log level: first, not inside
    logger = logging.getLogger("minivllm")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def torch_threads(threads: int):
    """``torch.set_num_threads(threads)`` inside the block, the number before restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


# ---- a learner's functions in another process -----------------------------------------------------
# Spawned processes start empty, and a function defined in a notebook cell lives in ``__main__``, which
# they cannot import (pickle sends functions and classes by their module and name). So a check that runs
# the learner's code in another process writes the functions' *source* (`inspect.getsource`) into a
# module of its own, in a folder on ``sys.path`` (which spawned processes inherit): the functions may use
# only the names that module imports.
_learner_modules = itertools.count()  # a fresh module name for each learner module built in this process


def learner_source(fn: Callable, what: str) -> str:
    """The source of the learner's function ``fn`` (``what`` names it in the failure), dedented."""
    if not callable(fn) or not hasattr(fn, "__code__") or fn.__name__ == "<lambda>":
        raise CheckFailed(f"{what}={fn!r} must be a function defined with `def`")
    try:
        return textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        raise CheckFailed(f"the source of {what} ({fn.__name__}) cannot be read: define it with `def` in a "
                          "notebook cell or a .py file") from None


@contextlib.contextmanager
def learner_module_folder():
    """A temporary folder on ``sys.path`` for `learner_module`, taken off and removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="minivllm-learner-") as folder:
        sys.path.insert(0, folder)
        try:
            yield folder
        finally:
            sys.path.remove(folder)


def learner_module(folder: str, prefix: str, text: str, what: str):
    """Module ``prefix_N`` (a fresh N) written with ``text`` in ``folder`` (from `learner_module_folder`)
    and imported, so that other processes can import it by name. ``what`` names the learner's functions
    in the failure when the module raises on import."""
    module = f"{prefix}_{next(_learner_modules)}"
    with open(os.path.join(folder, module + ".py"), "w") as f:
        f.write(text)
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module)
    except Exception as e:
        raise CheckFailed(f"{what}, alone in a module, raised {type(e).__name__}: {e}") from None
