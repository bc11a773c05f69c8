"""The course models' training corpus: the Python standard library plus the sources of a pinned list of
permissively licensed, pure-Python packages, rebuilt from the package registry at training time (never at
run time: the weights ship, the corpus does not).

    from minivllm.course.corpus import collect_corpus
    corpus = collect_corpus(cache="~/.cache/minivllm/corpus")   # pip-downloads the wheels once

Each package comes as its ``py3-none-any`` wheel at the pinned version (``pip download --no-deps``), so
what it holds is exactly what the registry serves for that version; the wheel's SHA-256 and the licence
its metadata declares go to the model card, and a licence outside `PERMISSIVE` stops the recipe.

From every source the ``.py`` files are kept, leaving out
  * folders of test suites (test, tests, testing, idle_test), vendored copies of other projects
    (_vendor, vendor, _vendored; setuptools' _distutils, a copy of the library's distutils),
    site-packages / dist-packages, encodings and pydoc_data (codec tables, generated help text),
    lib-dynload and config-3.*;
  * machine-generated ``_sysconfigdata_*.py`` (build paths of the machine that built Python);
  * files over 300,000 characters, and empty ones;
  * table-like modules: if at least 100 of a file's code lines (non-blank, not comments) and at least
    40% of them are literal-only (nothing left once string and number literals -- hex included -- and
    the punctuation ``,:()[]{}+-`` are removed, like ``'AElig': 0xc6,``), the file is a data table;
  * exact duplicates (same text once trailing whitespace is dropped): the first copy, in source order
    (the standard library first), stays.
Every multi-line docstring of a kept file is cut to its summary line (`summarize_docstrings`), in the
held-out files too, so validation measures the text the models learn.
About 2% of the files (those whose path's SHA-1 is 0 mod 50) are held out for validation. A standard
library file's path is relative to the library (``glob.py``), a package's is its path in the wheel
(``flask/app.py``), so the standard library files held out are the ones the earlier, standard-library-only
course models held out too.
"""
from __future__ import annotations

import ast
import email.message
import email.parser
import hashlib
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass, field

# (distribution, version): pure-Python, permissively licensed, idiomatic code of several styles
# (web frameworks, CLI and text tools, a CAS, graph algorithms, an ORM, networking, packaging).
PACKAGES = (
    ("attrs", "26.1.0"), ("black", "26.10.1"), ("boltons", "26.2.0"), ("bottle", "0.13.5"),
    ("click", "8.5.1"), ("django", "5.2.19"), ("flask", "3.1.3"), ("httpx", "0.29.0"), ("isort", "9.0.2"),
    ("jinja2", "3.1.6"), ("more-itertools", "11.2.1"), ("networkx", "3.6.1"), ("packaging", "26.4"),
    ("pip", "26.3"), ("pygments", "2.21.0"), ("pyparsing", "3.3.3"), ("requests", "2.34.2"),
    ("rich", "15.0.0"), ("scrapy", "2.19.0"), ("setuptools", "84.2.1"), ("sphinx", "9.0.4"),
    ("sqlalchemy", "2.1.9"), ("starlette", "1.10.0"), ("sympy", "1.14.0"), ("toolz", "1.2.0"),
    ("twisted", "26.10.0"), ("werkzeug", "3.1.9"),
)
PERMISSIVE = ("MIT", "BSD", "Apache", "PSF", "ISC")

SKIP_DIRS = {"test", "tests", "testing", "idle_test", "_vendor", "vendor", "_vendored", "_distutils",
             "site-packages", "dist-packages", "encodings", "pydoc_data", "__pycache__", "lib-dynload"}
MAX_FILE_CHARS = 300_000
TABLE_MIN_LINES, TABLE_FRACTION = 100, 0.4
VAL_MODULUS = 50  # a file is held out when sha1(path) % 50 == 0: about 2%
RULE = ("folders of test suites (test/, tests/, testing/, idle_test/), vendored code (_vendor/, vendor/, "
        "_vendored/, _distutils/), site-packages/, dist-packages/, encodings/ (codec tables), pydoc_data/ "
        "(generated help text), lib-dynload/, config-*/; generated `_sysconfigdata_*.py`; empty files and files over "
        f"{MAX_FILE_CHARS:,} characters; table-like files (at least {TABLE_MIN_LINES} and {TABLE_FRACTION:.0%} "
        "of the code lines hold nothing but literals and punctuation, like `'AElig': 0xc6,`); exact duplicates "
        "(the standard library's copy, then the first package's, stays). About 2% of the files (SHA-1 of the "
        "path = 0 mod 50) are held out for validation. In every kept file, each multi-line docstring is cut to its "
        "summary line (`\"\"\"Return the sum.\"\"\"`), where that line needs no escaping: docstrings are English "
        "prose, which a small model writes poorly and loops on inside a string it never closes.")


@dataclass(frozen=True)
class Source:
    """Where files came from: the standard library or one wheel."""
    name: str
    version: str
    licence: str
    sha256: str = ""  # of the wheel; empty for the standard library


@dataclass
class Corpus:
    train: list[tuple[str, str]]  # (path, text), path as described in the module docstring
    val: list[tuple[str, str]]
    sources: list[Source]
    source_of: dict[str, str]  # path -> Source.name
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> paths

    def chars(self, split: str) -> int:
        return sum(len(t) for _, t in getattr(self, split))

    def by_source(self, split: str) -> dict[str, tuple[int, int]]:
        """Source name -> (files, characters) in ``split``."""
        counts: dict[str, tuple[int, int]] = {}
        for path, text in getattr(self, split):
            files, chars = counts.get(self.source_of[path], (0, 0))
            counts[self.source_of[path]] = (files + 1, chars + len(text))
        return counts


# --------------------------------------------------------------------------------------- filters
_LITERAL = re.compile(
    r"""[rbuRBUfF]{0,2}('''.*?'''|\"\"\".*?\"\"\"|'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*")"""
    r"""|\b0[xXoObB][0-9a-fA-F_]+\b|\b\d[\d_]*\.?\d*(?:[eE][-+]?\d+)?[jJ]?\b""")
_PUNCT = re.compile(r"[\s,:()\[\]{}+\-]")


def table_stats(text: str) -> tuple[int, int]:
    """(code lines, literal-only code lines) of a Python source."""
    code = literal = 0
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        code += 1
        if not _PUNCT.sub("", _LITERAL.sub("", s)):
            literal += 1
    return code, literal


def is_table_like(text: str) -> bool:
    code, literal = table_stats(text)
    return literal >= TABLE_MIN_LINES and literal >= TABLE_FRACTION * code


def skip_reason(path: str, text: str) -> str | None:
    """Why the file at ``path`` (``/``-separated) stays out of the corpus, or None to keep it."""
    *folders, name = path.split("/")
    for d in folders:
        if d in SKIP_DIRS or d.startswith("config-"):
            return f"folder {d}/"
    if name.startswith("_sysconfigdata"):
        return "generated (_sysconfigdata)"
    if not text.strip():
        return "empty"
    if len(text) > MAX_FILE_CHARS:
        return f"over {MAX_FILE_CHARS:,} characters"
    if is_table_like(text):
        return "table-like"
    return None


DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _summary_line(node: ast.Expr, summary: str, lines: list[str]) -> str | None:
    """The one line that replaces the multi-line docstring statement ``node``: ``summary`` in triple
    quotes, or None where that cannot be written faithfully (the statement shares a line, the summary is
    empty or holds a quote or a backslash that would need escaping)."""
    first, last = lines[node.lineno - 1], lines[node.end_lineno - 1]
    if (node.lineno == node.end_lineno or first[:node.col_offset].strip() or last[node.end_col_offset:].strip()
            or not summary or '"' in summary or "\\" in summary):
        return None
    return first[:node.col_offset] + '"""' + summary + '"""\n'


def summarize_docstrings(text: str) -> str:
    """``text`` with each multi-line docstring cut to its summary line (PEP 257's one-line form).
    Docstrings are English prose, which a small model trained for an hour writes poorly and loops on
    inside an unclosed string; their first lines still teach it to document and close a docstring.
    A file that does not parse, or would not parse afterwards, is returned unchanged."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return text
    lines = text.splitlines(keepends=True)
    replacements = []
    for scope in ast.walk(tree):
        doc = ast.get_docstring(scope) if isinstance(scope, DOCSTRING_OWNERS) else None
        if doc and (line := _summary_line(scope.body[0], doc.split("\n")[0].strip(), lines)):
            replacements.append((scope.body[0].lineno - 1, scope.body[0].end_lineno, line))
    for start, end, line in sorted(replacements, reverse=True):
        lines[start:end] = [line]
    out = "".join(lines)
    try:
        ast.parse(out)
    except (SyntaxError, ValueError):
        return text
    return out


def is_held_out(path: str) -> bool:
    return int.from_bytes(hashlib.sha1(path.encode()).digest()[:8], "big") % VAL_MODULUS == 0


# --------------------------------------------------------------------------------------- sources
def stdlib_files(root: str | None = None):
    """(path relative to the library, text) of the standard library's UTF-8 ``.py`` files, sorted."""
    root = os.path.realpath(root or sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        # third-party packages installed into the interpreter are not the library
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "site-packages", "dist-packages"))
        for name in files:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    for rel in sorted(found):
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                yield rel, f.read()
        except (UnicodeDecodeError, OSError):
            yield rel, None


def download_wheels(cache: str, packages=PACKAGES) -> dict[str, str]:
    """``{name: wheel path}``, pip-downloading into ``cache`` the pure-Python wheels not there yet."""
    os.makedirs(cache, exist_ok=True)

    def find(name, version):
        stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
        return next((os.path.join(cache, w) for w in sorted(os.listdir(cache)) if w.lower().startswith(stem)
                     and w.endswith(".whl")), None)

    missing = [f"{n}=={v}" for n, v in packages if find(n, v) is None]
    if missing:
        print(f"pip download: {len(missing)} wheels into {cache}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--platform", "any", "--implementation", "py", "--abi", "none",
                        "--python-version", "3.11", "-d", cache, *missing], check=True)
    wheels = {}
    for name, version in packages:
        wheels[name] = find(name, version)
        if wheels[name] is None:
            raise RuntimeError(f"pip download gave no wheel for {name}=={version} in {cache}")
    return wheels


def wheel_licence(meta: email.message.Message) -> str:
    """The licence a wheel's METADATA declares: its License-Expression, else its licence classifiers,
    else the first line of its License field."""
    if meta.get("License-Expression"):
        return meta["License-Expression"].strip()
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or []
                   if c.startswith("License ::") and c.strip() != "License :: OSI Approved"]
    if classifiers:
        return " / ".join(classifiers)
    lines = (meta.get("License") or "").strip().splitlines()
    return lines[0] if lines else ""


def wheel_files(path: str):
    """(Source, [(path in the wheel, text or None)]) of a wheel's ``.py`` files, sorted."""
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".py"))
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.HeaderParser().parsestr(z.read(meta_name).decode("utf-8"))
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        source = Source(meta["Name"], meta["Version"], wheel_licence(meta), digest)
        files = []
        for n in names:
            try:
                files.append((n, z.read(n).decode("utf-8")))
            except UnicodeDecodeError:
                files.append((n, None))
    return source, files


# ---------------------------------------------------------------------------------------- corpus
def collect_corpus(cache: str, packages=PACKAGES, stdlib_root: str | None = None) -> Corpus:
    """The filtered, deduplicated and split corpus (see the module docstring)."""
    python = Source("Python standard library", sys.version.split()[0], "PSF-2.0")
    sources_files = [(python, list(stdlib_files(stdlib_root)))]
    for name, wheel in download_wheels(os.path.expanduser(cache), packages).items():
        source, files = wheel_files(wheel)
        if not any(word in source.licence for word in PERMISSIVE):
            raise RuntimeError(f"{name}: licence {source.licence!r} is not one of {PERMISSIVE}")
        sources_files.append((source, files))

    corpus = Corpus([], [], [s for s, _ in sources_files], {})
    seen: set[bytes] = set()
    for source, files in sources_files:
        for path, text in files:
            reason = "not UTF-8" if text is None else skip_reason(path, text)
            if reason is None:
                text = summarize_docstrings(text)
                key = hashlib.sha1("\n".join(line.rstrip() for line in text.splitlines()).encode()).digest()
                reason = "duplicate" if key in seen or path in corpus.source_of else None
                seen.add(key)
            if reason:
                corpus.skipped.setdefault(reason, []).append(f"{source.name}:{path}")
                continue
            corpus.source_of[path] = source.name
            (corpus.val if is_held_out(path) else corpus.train).append((path, text))
    return corpus
