"""Every chapter notebook (notebooks/) and solved exercise (exercises/solutions/) is committed
executed, top to bottom, with clean outputs; `pytest --nbval` (run by `make test`) then re-executes
them and compares the outputs. The learner copies (exercises/*.ipynb) are covered by
tests/test_exercises.py instead: they are committed without outputs and stop at their skeletons."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "exercises" / "solutions").glob("*.ipynb"))
IDS = [str(p.relative_to(ROOT)) for p in NOTEBOOKS]

# Paths of the machine that executed the notebook (temp folders, the checkout, a home directory,
# installed packages) mean an output that differs on every machine.
MACHINE_PATH = re.compile(r"/work/|/tmp/|/root/|/home/|/Users/|site-packages")
FORBIDDEN_MARKERS = ("NBVAL_SKIP", "NBVAL_RAISES_EXCEPTION", "nbval-lax")
DISPLAYING_CALLS = {"print", "display", "show"}


def code_cells(nb):
    return [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()]


def output_texts(output) -> list[str]:
    """The text an output shows (streams, tracebacks, text/* and JSON data; not images)."""
    if output.output_type == "stream":
        return [output.text]
    if output.output_type == "error":
        return [output.ename, output.evalue, *output.traceback]
    return [v if isinstance(v, str) else str(v) for k, v in output.get("data", {}).items()
            if not k.startswith("image/")]


def calls_a_display(source: str) -> bool:
    """Whether the cell calls print(...), display(...) or something.show(...) at any depth."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython magics: no static verdict
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in DISPLAYING_CALLS:
                return True
    return False


def test_the_course_has_notebooks():
    assert NOTEBOOKS, "no notebook in notebooks/ or exercises/solutions/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_committed_executed_and_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", "kernelspec must be python3"
    cells = code_cells(nb)
    assert cells, "a notebook without code"
    counts = [c.execution_count for _, c in cells]
    assert None not in counts, (f"cell {cells[counts.index(None)][0]} was not executed: execute the "
                                "notebook in place before committing it")
    assert counts == list(range(1, len(cells) + 1)), (
        f"execution counts {counts}: execute the whole notebook top to bottom in a fresh kernel")
    for i, cell in cells:
        for marker in FORBIDDEN_MARKERS:
            assert marker not in cell.source, f"cell {i} uses {marker}: every cell runs and is compared"
        if calls_a_display(cell.source):
            assert cell.outputs, f"cell {i} prints or displays something, but its committed output is empty"
        for out in cell.outputs:
            assert out.output_type != "error", f"cell {i} raised {out.ename}: {out.evalue}"
            for text in output_texts(out):
                assert "Traceback (most recent call last)" not in text, f"cell {i} shows a traceback"
                m = MACHINE_PATH.search(text)
                assert m is None, f"cell {i}'s output shows a machine path ({m.group(0)!r}): {text[:300]!r}"
    for i, cell in enumerate(nb.cells):
        assert cell.cell_type != "code" or cell.source.strip() or not cell.outputs, f"empty cell {i} has outputs"


def test_nbval_markers_are_whole_comment_lines():
    """nbval honours `# NBVAL_IGNORE_OUTPUT` (kept for timings) only as a comment line of its own;
    a trailing comment would be silently ignored."""
    for path in NOTEBOOKS:
        for i, cell in code_cells(nbformat.read(path, as_version=4)):
            for line in cell.source.splitlines():
                if "NBVAL_" in line:
                    assert line.strip() == "# NBVAL_IGNORE_OUTPUT", f"{path.name} cell {i}: {line!r}"


def test_sanitize_file_parses():
    text = (ROOT / "notebooks" / "sanitize.cfg").read_text()
    pairs = re.findall(r"^regex: (.*)$\n^replace: (.*)$", text, flags=re.M)
    assert pairs
    for regex, _ in pairs:
        re.compile(regex)
    assert re.sub(pairs[0][0], pairs[0][1], "<object at 0x7f3a1c2b4d90>") == "<object at 0xADDRESS>"


# ---- the glossary (notebooks/glossary.md) ------------------------------------------------------------
GLOSSARY = ROOT / "notebooks" / "glossary.md"
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
GLOSSARY_LINK = re.compile(r"\]\(glossary\.md(?:#([^)\s]*))?\)")


def heading_anchor(text: str) -> str:
    """The anchor JupyterLab gives a heading (rendermime's createHeaderId): its text, spaces turned into
    hyphens, case kept."""
    return text.strip().replace(" ", "-")


def glossary_terms() -> list[str]:
    return re.findall(r"^## (.+)$", GLOSSARY.read_text(encoding="utf-8"), flags=re.M)


def test_glossary_is_alphabetical_and_its_own_links_resolve():
    terms = glossary_terms()
    assert len(terms) >= 30, terms
    assert terms == sorted(terms, key=str.lower), "glossary entries must be in alphabetical order"
    assert len({heading_anchor(t) for t in terms}) == len(terms), "two entries share an anchor"
    anchors = {heading_anchor(t) for t in terms}
    text = GLOSSARY.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(#([^)\s]+)\)", text):
        assert target in anchors, f"glossary.md links to #{target}, which is no entry"
    for entry in re.split(r"^## ", text, flags=re.M)[1:]:
        assert re.search(r"[Cc]hapters? \d\d", entry), f"the entry {entry.splitlines()[0]!r} names no chapter"


def test_chapter_glossary_links_resolve_and_every_term_is_linked():
    """A chapter's markdown links a term's first use (once per chapter) to `glossary.md#Anchor`; every
    link must land on an entry, and every entry must be linked from some chapter."""
    anchors = {heading_anchor(t) for t in glossary_terms()}
    linked = set()
    for path in CHAPTERS:
        seen = set()
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type != "markdown":
                continue
            for target in GLOSSARY_LINK.findall(cell.source):
                if not target:  # a link to the glossary as a whole
                    continue
                assert target in anchors, f"{path.name} cell {i} links to glossary.md#{target}, which is no entry"
                assert target not in seen, f"{path.name} cell {i} links {target} again: only its first use is linked"
                linked.add(target)
                seen.add(target)
    missing = sorted(anchors - linked)
    assert not missing, f"glossary entries no chapter links to: {missing}"
