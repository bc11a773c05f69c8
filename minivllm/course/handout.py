"""A hand-out of the course without the solutions: what an instructor gives the learners.

    python -m minivllm.course.handout DIR      # or: make handout HANDOUT=DIR

writes, into a new (or empty) folder ``DIR``:

* ``notebooks/``: the chapters as committed, executed, so they read well before anyone runs them, and
  the glossary they link to;
* ``exercises/``: the learner copies, generated afresh from ``exercises/solutions/`` (solution code
  replaced by ``# YOUR CODE HERE``, every output cleared), never the solutions themselves;
* ``workspace/``: the learners' working copies of those (see `minivllm.course.workspace`), so the
  chapters' links to ``../workspace/NN_topic.ipynb`` work in the hand-out as in the repository;
* ``README.md``: how to run it.

Every notebook written is checked for a ``### BEGIN SOLUTION`` marker left in it. The learners
still need minivllm installed (the engine, the labs, the course model and the checks are in the
package, not in the notebooks): ``pip install`` the repository or a wheel built from it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

import nbformat

from minivllm.course import exercises as exercise_tool
from minivllm.course import workspace

HANDOUT_README = """\
# minivllm course: hand-out

- `notebooks/`: the chapters, in order, executed (outputs included). Start with
  `notebooks/00_why_an_engine.ipynb`.
- `workspace/`: your copies of the exercises; work in these. Each chapter links to its exercise there.
- `exercises/`: the originals. `python -m minivllm.course.workspace reset 02` restores
  `workspace/02_*.ipynb` from them (your version is kept in `workspace/backups/`).

Set-up: install minivllm with its course extra, as your instructor says (from a clone,
`pip install -e "/path/to/minivllm[course]"`; from a wheel, `pip install "minivllm-VERSION-py3-none-any.whl[course]"`),
then, in this folder:

```bash
python -m minivllm.course.doctor      # versions, widgets, the course model, CPU speed: PASS/WARN/FAIL
jupyter lab notebooks/00_why_an_engine.ipynb   # add --allow-root when you are root (containers)
```
"""


def _has_marker(nb: nbformat.NotebookNode) -> bool:
    return any(exercise_tool.has_solution(c.source) for c in nb.cells)


def write_handout(exercises_dir: str, notebooks_dir: str, out_dir: str) -> list[str]:
    """Write the hand-out into ``out_dir`` (new or empty); return the paths written."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"out_dir={out_dir!r} exists and is not an empty folder: pick a new one, so that "
                         "nothing is overwritten")
    if not os.path.isdir(notebooks_dir):
        raise ValueError(f"notebooks_dir={notebooks_dir!r} is not a folder (run from the repository root)")
    pairs = exercise_tool.pairs(exercises_dir)
    if not pairs:
        raise ValueError(f"exercises_dir={exercises_dir!r} has no solutions/*.ipynb to make learner copies from")
    chapters = sorted(n for n in os.listdir(notebooks_dir) if n.endswith(".ipynb"))
    for name in chapters:  # refuse before writing anything
        if _has_marker(nbformat.read(os.path.join(notebooks_dir, name), as_version=4)):
            raise ValueError(f"chapter {name} holds a ### BEGIN SOLUTION block: a chapter must not")
    written = []
    os.makedirs(os.path.join(out_dir, "notebooks"))
    pages = sorted(n for n in os.listdir(notebooks_dir) if n.endswith(".md"))  # the glossary the chapters link to
    for name in chapters + pages:
        written.append(shutil.copyfile(os.path.join(notebooks_dir, name), os.path.join(out_dir, "notebooks", name)))
    os.makedirs(os.path.join(out_dir, "exercises"))
    for solution, learner in pairs:
        path = os.path.join(out_dir, "exercises", os.path.basename(learner))
        with open(path, "w", encoding="utf-8") as f:
            f.write(exercise_tool.learner_text(solution))
        written.append(path)
    written += workspace.copy_missing(os.path.join(out_dir, "exercises"), os.path.join(out_dir, workspace.WORKSPACE))
    readme = os.path.join(out_dir, "README.md")
    with open(readme, "w", encoding="utf-8") as f:
        f.write(HANDOUT_README)
    written.append(readme)
    for path in written:
        if path.endswith(".ipynb") and _has_marker(nbformat.read(path, as_version=4)):
            raise ValueError(f"{path} still holds a ### BEGIN SOLUTION block")  # cannot happen; checked anyway
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="the new folder to write the hand-out into")
    parser.add_argument("--exercises", default="exercises", help="the exercises folder (default: ./exercises)")
    parser.add_argument("--notebooks", default="notebooks", help="the chapters' folder (default: ./notebooks)")
    args = parser.parse_args(argv)
    try:
        written = write_handout(args.exercises, args.notebooks, args.out_dir)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {args.out_dir}: notebooks/, exercises/ (learner copies), "
          "workspace/ (the learners' copies), README.md; no solutions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
