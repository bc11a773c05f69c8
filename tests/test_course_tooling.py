"""Workshop tooling: the learners' copies in workspace/ (made once, never overwritten, reset with a
backup), the chapters' links to them, the hand-out without solutions, and the set-up check
(`minivllm.course.doctor`, without loading the model)."""
from __future__ import annotations

import datetime
import os
import re
import socket
import time
from pathlib import Path

import nbformat
import pytest

from minivllm.course import doctor, exercises, workspace
from minivllm.course import handout
from minivllm.course.handout import write_handout

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime.datetime(2026, 1, 2, 3, 4, 5)


def notebook(*sources: str) -> str:
    return nbformat.writes(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])) + "\n"


@pytest.fixture
def course(tmp_path):
    """A course folder: two learner copies in exercises/ (and their solutions), one chapter."""
    (tmp_path / "exercises" / "solutions").mkdir(parents=True)
    (tmp_path / "notebooks").mkdir()
    for name in ("01_first.ipynb", "02_second.ipynb"):
        (tmp_path / "exercises" / "solutions" / name).write_text(
            notebook(f"# {name}\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION"))
    exercises.write_all(str(tmp_path / "exercises"))
    (tmp_path / "notebooks" / "00_intro.ipynb").write_text(notebook("print('chapter')"))
    return tmp_path


# ---- workspace ------------------------------------------------------------------------------------
def test_copies_are_made_once_and_never_overwritten(course):
    ex, ws = str(course / "exercises"), str(course / "workspace")
    assert [os.path.basename(p) for p in workspace.copy_missing(ex, ws)] == ["01_first.ipynb", "02_second.ipynb"]
    mine = course / "workspace" / "01_first.ipynb"
    mine.write_text("my work")
    assert workspace.copy_missing(ex, ws) == []
    assert mine.read_text() == "my work"
    (course / "workspace" / "02_second.ipynb").unlink()  # a deleted copy comes back, the edited one stays
    assert [os.path.basename(p) for p in workspace.copy_missing(ex, ws)] == ["02_second.ipynb"]
    assert mine.read_text() == "my work"


def test_reset_restores_the_original_and_keeps_a_backup(course):
    ex, ws = str(course / "exercises"), str(course / "workspace")
    workspace.copy_missing(ex, ws)
    mine = course / "workspace" / "02_second.ipynb"
    mine.write_text("attempt 1")
    target, backup = workspace.reset(ex, ws, "02", now=NOW)
    assert target == str(mine) and mine.read_text() == (course / "exercises" / "02_second.ipynb").read_text()
    assert backup == str(course / "workspace" / "backups" / "02_second-20260102-030405.ipynb")
    assert Path(backup).read_text() == "attempt 1"
    mine.write_text("attempt 2")  # a second reset within the same second keeps both backups
    _, backup2 = workspace.reset(ex, ws, "2", now=NOW)
    assert backup2.endswith("02_second-20260102-030405-2.ipynb") and Path(backup2).read_text() == "attempt 2"
    (course / "workspace" / "01_first.ipynb").unlink()
    assert workspace.reset(ex, ws, "01_first.ipynb", now=NOW)[1] is None  # nothing to back up


@pytest.mark.parametrize("name", ["1", "01", "01_first", "01_first.ipynb", "exercises/01_first.ipynb"])
def test_an_exercise_is_named_by_number_or_name(course, name):
    assert workspace.find_exercise(str(course / "exercises"), name).endswith("01_first.ipynb")


@pytest.mark.parametrize("name", ["03", "first", "", "1x"])
def test_an_unknown_exercise_is_refused_by_name(course, name):
    with pytest.raises(ValueError, match=f"exercise={name!r} names no exercise.*known numbers: 01, 02"):
        workspace.find_exercise(str(course / "exercises"), name)


def test_status_says_which_copies_are_edited_or_outdated(course):
    ex, ws = str(course / "exercises"), str(course / "workspace")
    assert workspace.status(ex, ws) == [("01_first.ipynb", "not copied"), ("02_second.ipynb", "not copied")]
    workspace.copy_missing(ex, ws)
    (course / "workspace" / "01_first.ipynb").write_text("my work")
    (course / "exercises" / "solutions" / "02_second.ipynb").write_text(
        notebook("# changed\n### BEGIN SOLUTION\nx = 2\n### END SOLUTION"))
    exercises.write_all(ex)
    assert workspace.status(ex, ws) == [("01_first.ipynb", "edited"),
                                        ("02_second.ipynb", "untouched, original changed since")]
    workspace.reset(ex, ws, "02", now=NOW)
    assert workspace.status(ex, ws)[1] == ("02_second.ipynb", "untouched")


def test_the_command_line(course, capsys):
    root = str(course)
    assert workspace.main(["--root", root]) == 0
    assert "copied" in capsys.readouterr().out
    assert workspace.main(["--root", root, "reset", "02"]) == 0
    assert "restored" in capsys.readouterr().out
    assert workspace.main(["--root", root, "reset"]) == 2
    assert workspace.main(["--root", root, "reset", "7"]) == 2
    assert "exercise='7'" in capsys.readouterr().err
    assert workspace.main(["--root", str(course / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_the_workspace_is_ignored_and_make_course_fills_it_first():
    assert "workspace/" in (ROOT / ".gitignore").read_text().splitlines()
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\ncourse:"):makefile.index("\nreset-exercise:")]
    assert recipe.index("minivllm.course.workspace") < recipe.index("jupyter lab")
    assert "--allow-root" in recipe
    assert "minivllm.course.workspace reset $(N)" in makefile


CHAPTER_LINK = re.compile(r"\]\(\.\./(exercises|workspace)/([^)]+)\)")


def chapter_links(folder: Path) -> list[tuple[str, str, str]]:
    found = []
    for path in sorted((folder / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "markdown":
                found += [(path.name, where, name) for where, name in CHAPTER_LINK.findall(cell.source)]
    return found


def test_chapters_link_to_the_learners_copies():
    links = chapter_links(ROOT)
    assert links, "no chapter links to an exercise"
    for chapter, where, name in links:
        assert where == "workspace", f"{chapter} links to ../exercises/{name}: learners work in ../workspace/"
        assert (ROOT / "exercises" / name).exists(), f"{chapter} links to {name}, which is no exercise"


# ---- hand-out -------------------------------------------------------------------------------------
def test_the_handout_has_no_solution(course):
    out = course / "handout"
    written = write_handout(str(course / "exercises"), str(course / "notebooks"), str(out))
    names = sorted(str(Path(p).relative_to(out)) for p in written)
    assert names == ["README.md", "exercises/01_first.ipynb", "exercises/02_second.ipynb", "notebooks/00_intro.ipynb",
                     "workspace/01_first.ipynb", "workspace/02_second.ipynb"]
    assert not (out / "exercises" / "solutions").exists()
    for path in out.rglob("*"):
        if path.is_file():
            assert "BEGIN SOLUTION" not in path.read_text() and "x = 1" not in path.read_text(), path
    with pytest.raises(ValueError, match="out_dir=.* exists and is not an empty folder"):
        write_handout(str(course / "exercises"), str(course / "notebooks"), str(out))


def test_the_handout_refuses_a_chapter_holding_a_solution(course):
    (course / "notebooks" / "01_leak.ipynb").write_text(notebook("### BEGIN SOLUTION\nx = 1\n### END SOLUTION"))
    with pytest.raises(ValueError, match="chapter 01_leak.ipynb holds a ### BEGIN SOLUTION"):
        write_handout(str(course / "exercises"), str(course / "notebooks"), str(course / "handout"))
    assert not (course / "handout").exists(), "nothing is written when a chapter is refused"


def test_the_courses_handout_keeps_its_links(tmp_path, capsys):
    out = tmp_path / "handout"
    args = [str(out), "--exercises", str(ROOT / "exercises"), "--notebooks", str(ROOT / "notebooks")]
    assert handout.main(args) == 0
    assert {p.name for p in (out / "notebooks").glob("*.ipynb")} == {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
    for chapter, where, name in chapter_links(out):
        assert (out / where / name).exists(), f"{chapter}: ../{where}/{name} is missing from the hand-out"
    assert (out / "notebooks" / "glossary.md").read_text() == (ROOT / "notebooks" / "glossary.md").read_text(), \
        "the chapters link to the glossary"
    assert handout.main(args) == 2  # never into a folder that is not empty


# ---- doctor ---------------------------------------------------------------------------------------
def test_doctor_runs_in_seconds_and_says_pass_warn_or_fail_per_line(tmp_path, capsys):
    (tmp_path / "constraints.txt").write_text("torch==0.0.1\nipywidgets==8.1.9\n")
    start = time.perf_counter()
    rc = doctor.main(["--skip-model", "--constraints", str(tmp_path / "constraints.txt")])
    assert time.perf_counter() - start < 20
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if re.match(r"^(PASS|WARN|FAIL) ", line)]
    labels = {row[6:24].strip() for row in rows}
    assert {"python", "torch", "transformers", "ipywidgets", "jupyterlab", "widget extension", "python3 kernel",
            "user", "port", "memory", "TRITON_INTERPRET", "cpu", "matmul speed", "matmul threads"} <= labels
    assert any(row.startswith("WARN  torch") and "make test passed with 0.0.1" in row for row in rows)
    assert rc == (1 if any(row.startswith("FAIL") for row in rows) else 0)
    assert re.match(r"^\d+ PASS, \d+ WARN, \d+ FAIL", out[-1])


def test_doctor_lines():
    assert doctor.python_line((3, 10, 4)).status == "FAIL" and doctor.python_line((3, 12, 0)).status == "PASS"
    assert doctor.version_line("torch", "2.13.0+cpu", "2.13.0").status == "PASS"
    assert doctor.version_line("torch", None, "2.13.0").status == "FAIL"
    assert doctor.version_line("jupyterlab", None, None).status == "WARN"
    assert doctor.version_line("transformers", "5.0.0", "5.25.0").status == "WARN"
    assert doctor.kernel_line("python").status == "PASS"
    assert doctor.kernel_line("/usr/bin/python2.7", "/venv/bin/python").status == "WARN"
    assert doctor.kernel_line(None).status == "FAIL"
    assert doctor.memory_line(2 * 2**30).status == "WARN" and doctor.memory_line(16 * 2**30).status == "PASS"
    assert doctor.triton_interpret_line("1").status == "WARN" and doctor.triton_interpret_line(None).status == "PASS"
    slow = doctor.speed_line("model speed", 10.0, 100.0, "tokens/s")
    assert slow.status == "WARN" and "10.0x slower" in slow.detail and "by about 10" in slow.advice
    assert doctor.speed_line("model speed", 200.0, 100.0, "tokens/s").status == "PASS"
    shared = doctor.threads_line("model threads", 8.0, 120.0, 2, "tokens/s")
    assert shared.status == "WARN" and "OMP_NUM_THREADS=1" in shared.advice
    assert doctor.threads_line("model threads", 200.0, 120.0, 2, "tokens/s").status == "PASS"
    assert doctor.threads_line("model threads", 120.0, 120.0, 1, "tokens/s").status == "PASS"
    with pytest.raises(ValueError, match="measured=0"):
        doctor.speed_line("x", 0, 100.0, "tokens/s")
    with pytest.raises(ValueError, match="status='OK'"):
        doctor.Line("OK", "x", "y")


def test_doctor_finds_the_widget_extension(tmp_path):
    assert doctor.widget_extension_line([str(tmp_path)], "8.1.9").status == "FAIL"
    folder = tmp_path / "@jupyter-widgets" / "jupyterlab-manager"
    folder.mkdir(parents=True)
    (folder / "package.json").write_text('{"version": "5.0.16"}')
    assert doctor.widget_extension_line([str(tmp_path)], "8.1.9").status == "PASS"
    assert doctor.widget_extension_line([str(tmp_path)], "7.8.5").status == "WARN"


def test_doctor_sees_a_busy_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert doctor.port_line(s.getsockname()[1]).status == "WARN"


def test_pinned_versions_read_a_constraints_file(tmp_path):
    (tmp_path / "c.txt").write_text("# comment\ntorch==2.13.0\njupyterlab_widgets==3.0.17\nfoo>=1\n")
    assert doctor.pinned_versions(str(tmp_path / "c.txt")) == {"torch": "2.13.0", "jupyterlab-widgets": "3.0.17"}
    assert doctor.pinned_versions(str(tmp_path / "none.txt")) == {}
