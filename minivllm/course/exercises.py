"""Generate the learner copies of the exercises from their solved notebooks.

The solved notebook ``exercises/solutions/NN_topic.ipynb`` is the only source. Solution code sits
between two marker lines (nbgrader style)::

    def sample(logits, params, generator):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

The learner copy ``exercises/NN_topic.ipynb`` is the same notebook with each marked block replaced by

        # YOUR CODE HERE
        raise NotImplementedError

at the indentation of the ``### BEGIN SOLUTION`` line (in a markdown cell: ``YOUR ANSWER HERE``), and
with *every* code cell's outputs and execution count cleared, not only the stripped cells': the
outputs after a stripped cell show the solution's results, and clearing all of them makes the copy
depend on the solution's sources alone, so re-executing a solution never makes its copy stale.
Execution timing, widget state and the executing Python's version are dropped from the metadata for
the same reason.

    python -m minivllm.course.exercises            # write every learner copy
    python -m minivllm.course.exercises --check    # exit 1 if a copy is missing, stale or orphaned
    python -m minivllm.course.handout DIR              # chapters and learner copies, no solutions

Why not nbgrader's ``ClearSolutions`` preprocessor, which instructors know? The markers are
nbgrader's own, so ``nbgrader generate_assignment`` (with ``ClearSolutions.enforce_metadata=False``:
these cells carry no nbgrader metadata) makes the same skeletons, bar its stub's
``raise NotImplementedError()``; checked with nbgrader 0.9.6 and our stub, it gives every solution's
cells the sources `learner_notebook` gives them. As a dependency of ``make test`` it is not worth its
weight: importing ``nbgrader.preprocessors`` imports its gradebook (SQLAlchemy, alembic), and the
package pulls in ``notebook`` 7, ``rapidfuzz`` and more, to replace a 25-line function. It also
matches a marker anywhere in a line (prose that mentions ``BEGIN SOLUTION`` would be cut), ignores a
stray ``END SOLUTION`` that `strip_solution` refuses, and leaves the outputs, widget state and
execution metadata that `learner_notebook` clears anyway (nbgrader's ``ClearOutput`` does the outputs).
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import sys

import nbformat

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
_MARKER = re.compile(r"^(\s*)(### BEGIN SOLUTION|### END SOLUTION)\s*$")
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError")
MARKDOWN_STUB = ("YOUR ANSWER HERE",)


def strip_solution(source: str, stub: tuple[str, ...] = CODE_STUB) -> str:
    """Replace every marked block (markers included) with ``stub``, indented like its BEGIN line."""
    out: list[str] = []
    inside = False
    for lineno, line in enumerate(source.split("\n"), 1):
        m = _MARKER.match(line)
        if m and m.group(2) == BEGIN:
            if inside:
                raise ValueError(f"line {lineno}: {BEGIN} inside another solution block")
            inside = True
            out += [m.group(1) + s for s in stub]
        elif m:
            if not inside:
                raise ValueError(f"line {lineno}: {END} without a {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{BEGIN} without an {END}")
    return "\n".join(out)


def has_solution(source: str) -> bool:
    return any((m := _MARKER.match(line)) and m.group(2) == BEGIN for line in source.split("\n"))


def learner_notebook(solution: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The learner's copy of a solved notebook (see the module docstring)."""
    nb = copy.deepcopy(solution)
    nb.metadata.pop("widgets", None)
    nb.metadata.get("language_info", {}).pop("version", None)  # the executing Python's version
    stripped = 0
    for i, cell in enumerate(nb.cells):
        src = cell.source
        try:
            if cell.cell_type == "code":
                if has_solution(src):
                    stripped += 1
                cell.source = strip_solution(src, CODE_STUB)
                cell.outputs = []
                cell.execution_count = None
            elif cell.cell_type == "markdown":
                stripped += has_solution(src)
                cell.source = strip_solution(src, MARKDOWN_STUB)
        except ValueError as e:
            raise ValueError(f"cell {i}: {e}") from None
        cell.metadata.pop("execution", None)
        cell.metadata.pop("ExecuteTime", None)
    if not stripped:
        raise ValueError(f"no {BEGIN} block: an exercise needs at least one")
    return nb


def _render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def learner_text(solution_path: str) -> str:
    """The learner copy's file contents for ``solution_path``."""
    try:
        return _render(learner_notebook(nbformat.read(solution_path, as_version=4)))
    except ValueError as e:
        raise ValueError(f"{solution_path}: {e}") from None


def pairs(exercises_dir: str) -> list[tuple[str, str]]:
    """(solution, learner copy) paths for every ``solutions/*.ipynb`` under ``exercises_dir``."""
    sol_dir = os.path.join(exercises_dir, "solutions")
    names = sorted(n for n in os.listdir(sol_dir) if n.endswith(".ipynb")) if os.path.isdir(sol_dir) else []
    return [(os.path.join(sol_dir, n), os.path.join(exercises_dir, n)) for n in names]


def problems(exercises_dir: str) -> list[str]:
    """What ``--check`` complains about: missing or stale learner copies, and learner copies
    without a solution. Empty when everything is up to date."""
    found = []
    expected = set()
    for sol, learner in pairs(exercises_dir):
        expected.add(os.path.basename(learner))
        want = learner_text(sol)
        if not os.path.exists(learner):
            found.append(f"{learner} is missing")
        else:
            with open(learner, encoding="utf-8") as f:
                if f.read() != want:
                    found.append(f"{learner} is stale: it differs from what {sol} generates")
    if os.path.isdir(exercises_dir):
        for n in sorted(os.listdir(exercises_dir)):
            if n.endswith(".ipynb") and n not in expected:
                found.append(f"{os.path.join(exercises_dir, n)} has no solutions/{n}")
    return found


def write_all(exercises_dir: str) -> list[str]:
    """Write every learner copy that differs from what its solution generates; return their paths."""
    written = []
    for sol, learner in pairs(exercises_dir):
        text = learner_text(sol)
        old = open(learner, encoding="utf-8").read() if os.path.exists(learner) else None
        if old != text:
            with open(learner, "w", encoding="utf-8") as f:
                f.write(text)
            written.append(learner)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="exercises", help="the exercises folder (default: ./exercises)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a copy is out of date")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.dir, "solutions")):
        print(f"no {os.path.join(args.dir, 'solutions')} folder (run from the repository root or pass --dir)",
              file=sys.stderr)
        return 2
    if args.check:
        found = problems(args.dir)
        for p in found:
            print(p, file=sys.stderr)
        if found:
            print("run `python -m minivllm.course.exercises` to regenerate the learner copies", file=sys.stderr)
            return 1
        print(f"{len(pairs(args.dir))} learner copies up to date")
        return 0
    written = write_all(args.dir)
    for path in written:
        print(f"wrote {path}")
    print(f"{len(pairs(args.dir))} learner copies, {len(written)} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
