"""The learners' own copies of the exercises, in ``workspace/`` at the repository root.

``exercises/NN_topic.ipynb`` are committed (generated from the solutions by
`minivllm.course.exercises`, checked by ``make test``), so a learner who typed into them would see
``git status`` complain, lose the work to the next ``git pull`` or regeneration, and could not start an
exercise over. Learners work in ``workspace/NN_topic.ipynb`` instead, a folder git ignores:

    python -m minivllm.course.workspace              # copy every exercise not copied yet (make course runs it)
    python -m minivllm.course.workspace reset 02     # restore one from exercises/, keeping a backup
    python -m minivllm.course.workspace status       # which copies are edited, and which have a newer original

A copy is made once and never overwritten: ``make course`` runs the first command every time, and an
existing copy, edited or not, is left alone. ``reset`` moves the learner's version to
``workspace/backups/NN_topic-YYYYmmdd-HHMMSS.ipynb`` before it copies the committed learner copy
again. ``workspace/`` sits beside ``exercises/``, at the same depth, so a relative link in an exercise
(``../notebooks/...``) works from both, and the notebook's kernel starts in a folder of the same kind.
``workspace/.originals.json`` records the hash of the committed copy each copy was made from, so that
``status`` (and the copy command) can say when the course has changed an exercise since.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import sys

WORKSPACE = "workspace"
BACKUPS = "backups"
ORIGINALS = ".originals.json"
_NUMBER = re.compile(r"^\d{1,2}$")


def learner_copies(exercises_dir: str) -> list[str]:
    """The committed learner copies ``exercises_dir/NN_topic.ipynb``, sorted by name."""
    if not os.path.isdir(exercises_dir):
        raise ValueError(f"exercises_dir={exercises_dir!r} is not a folder (run from the repository root)")
    return sorted(os.path.join(exercises_dir, n) for n in os.listdir(exercises_dir)
                  if n.endswith(".ipynb") and re.match(r"\d\d_", n))


def find_exercise(exercises_dir: str, exercise: str) -> str:
    """The learner copy that ``exercise`` names: its number ("02", "2"), its name
    ("02_block_manager") or its file name ("02_block_manager.ipynb")."""
    name = os.path.basename(str(exercise).strip())
    if _NUMBER.match(name):
        name = f"{int(name):02d}_"
    elif name.endswith(".ipynb"):
        name = name[:-len(".ipynb")]
    paths = learner_copies(exercises_dir)
    found = [p for p in paths if os.path.basename(p)[:-len(".ipynb")] == name
             or (name.endswith("_") and os.path.basename(p).startswith(name))]
    if len(found) != 1:
        known = ", ".join(os.path.basename(p)[:2] for p in paths)
        raise ValueError(f"exercise={exercise!r} names {'no' if not found else 'more than one'} exercise "
                         f"in {exercises_dir}; known numbers: {known}")
    return found[0]


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _read_originals(workspace_dir: str) -> dict[str, str]:
    path = os.path.join(workspace_dir, ORIGINALS)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_originals(workspace_dir: str, originals: dict[str, str]) -> None:
    with open(os.path.join(workspace_dir, ORIGINALS), "w", encoding="utf-8") as f:
        json.dump(originals, f, indent=1, sort_keys=True)
        f.write("\n")


def _copy_one(source: str, workspace_dir: str, originals: dict[str, str]) -> str:
    target = os.path.join(workspace_dir, os.path.basename(source))
    shutil.copyfile(source, target)
    originals[os.path.basename(source)] = _sha256(source)
    return target


def copy_missing(exercises_dir: str, workspace_dir: str) -> list[str]:
    """Copy every learner copy that ``workspace_dir`` does not hold yet; return the new copies' paths.
    An existing copy is never touched."""
    sources = learner_copies(exercises_dir)
    os.makedirs(workspace_dir, exist_ok=True)
    originals = _read_originals(workspace_dir)
    copied = [_copy_one(src, workspace_dir, originals) for src in sources
              if not os.path.exists(os.path.join(workspace_dir, os.path.basename(src)))]
    if copied:
        _write_originals(workspace_dir, originals)
    return copied


def reset(exercises_dir: str, workspace_dir: str, exercise: str,
          now: datetime.datetime | None = None) -> tuple[str, str | None]:
    """Restore one exercise in ``workspace_dir`` from the committed learner copy. The learner's
    version, if any, is moved to ``workspace_dir/backups/`` first. Returns (copy, backup or None)."""
    source = find_exercise(exercises_dir, exercise)
    name = os.path.basename(source)
    target = os.path.join(workspace_dir, name)
    backup = None
    os.makedirs(workspace_dir, exist_ok=True)
    if os.path.exists(target):
        stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
        os.makedirs(os.path.join(workspace_dir, BACKUPS), exist_ok=True)
        stem, n = name[:-len(".ipynb")], 1
        backup = os.path.join(workspace_dir, BACKUPS, f"{stem}-{stamp}.ipynb")
        while os.path.exists(backup):  # two resets within a second
            n += 1
            backup = os.path.join(workspace_dir, BACKUPS, f"{stem}-{stamp}-{n}.ipynb")
        shutil.move(target, backup)
    originals = _read_originals(workspace_dir)
    _copy_one(source, workspace_dir, originals)
    _write_originals(workspace_dir, originals)
    return target, backup


def status(exercises_dir: str, workspace_dir: str) -> list[tuple[str, str]]:
    """(exercise file name, state) for every exercise: "not copied", "untouched", "edited", and
    ", original changed since" appended when the committed learner copy is newer than the copy's."""
    originals = _read_originals(workspace_dir) if os.path.isdir(workspace_dir) else {}
    rows = []
    for source in learner_copies(exercises_dir):
        name = os.path.basename(source)
        target = os.path.join(workspace_dir, name)
        if not os.path.exists(target):
            rows.append((name, "not copied"))
            continue
        current = _sha256(source)
        copied_from = originals.get(name, current)  # no record: compare with today's original
        state = "untouched" if _sha256(target) == copied_from else "edited"
        if copied_from != current:
            state += ", original changed since"
        rows.append((name, state))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="copy", choices=("copy", "reset", "status"),
                        help="copy (default): copy the exercises not copied yet; reset N: restore one; "
                             "status: list the copies")
    parser.add_argument("exercise", nargs="?", help="with reset: the exercise's number, e.g. 02")
    parser.add_argument("--root", default=".", help="the course's folder, holding exercises/ (default: .)")
    args = parser.parse_args(argv)
    exercises_dir = os.path.normpath(os.path.join(args.root, "exercises"))
    workspace_dir = os.path.normpath(os.path.join(args.root, WORKSPACE))
    try:
        if args.command == "reset":
            if not args.exercise:
                raise ValueError("reset needs the exercise's number, e.g. `reset 02`")
            target, backup = reset(exercises_dir, workspace_dir, args.exercise)
            print(f"restored {target} from {find_exercise(exercises_dir, args.exercise)}"
                  + (f"; your version is in {backup}" if backup else ""))
            return 0
        if args.exercise:
            raise ValueError(f"exercise={args.exercise!r} is only for `reset`")
        if args.command == "status":
            for name, state in status(exercises_dir, workspace_dir):
                print(f"{os.path.join(workspace_dir, name)}: {state}")
            return 0
        copied = copy_missing(exercises_dir, workspace_dir)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    for path in copied:
        print(f"copied {path}")
    changed = [n for n, s in status(exercises_dir, workspace_dir) if s.endswith("original changed since")]
    print(f"{WORKSPACE}/: your copies of {len(learner_copies(exercises_dir))} exercises "
          f"({len(copied)} new); `make reset-exercise N=02` starts one over")
    for name in changed:
        print(f"  note: exercises/{name} changed since you copied it; `make reset-exercise N={name[:2]}` "
              "takes the new one (your version is kept in workspace/backups/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
