"""The course models' corpus recipe (`minivllm.course.corpus`) and quality metrics (`minivllm.course.quality`),
on hand-made files and wheels: no download, no model."""
from __future__ import annotations

import email.parser
import hashlib
import zipfile

import pytest

from minivllm.course import corpus, quality

TABLE = "CODES = {\n" + "".join(f"    'name{i}': 0x{i:02x},\n" for i in range(120)) + "}\n"
CODE = "def add(a, b):\n    return a + b\n"


def make_wheel(folder, name, version, licence_lines, files):
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{licence_lines}\n")
        for rel, text in files.items():
            z.writestr(rel, text)
    return path


@pytest.mark.parametrize("path,text,reason", [
    ("pkg/tests/test_x.py", CODE, "folder tests/"),
    ("pip/_vendor/rich/x.py", CODE, "folder _vendor/"),
    ("setuptools/_distutils/core.py", CODE, "folder _distutils/"),
    ("_sysconfigdata__linux.py", CODE, "generated (_sysconfigdata)"),
    ("pkg/empty.py", "\n  \n", "empty"),
    ("pkg/big.py", "x = 1\n" * 60_000, "over 300,000 characters"),
    ("pkg/table.py", TABLE, "table-like"),
    ("pkg/code.py", CODE * 150, None),
])
def test_skip_reason(path, text, reason):
    assert corpus.skip_reason(path, text) == reason


def test_table_stats_counts_literal_only_lines():
    assert corpus.table_stats("# comment\n\nx = 1\n'a': 0x10,\n(1, 2.5e3, 'b'),\n") == (3, 2)


def wheel_licence(metadata: str) -> str:
    return corpus.wheel_licence(email.parser.HeaderParser().parsestr(metadata))


def test_wheel_licence_prefers_the_expression_then_the_classifiers():
    assert wheel_licence("Name: a\nLicense-Expression: MIT\nLicense: long text\n") == "MIT"
    assert wheel_licence("Name: a\nClassifier: License :: OSI Approved :: BSD License\n"
                                "Classifier: Programming Language :: Python\n") == "BSD License"
    assert wheel_licence("Name: a\nLicense: Apache 2.0\n  more\n") == "Apache 2.0"
    assert wheel_licence("Name: a\nLicense:  \n") == ""  # a blank field: no licence, refused later


MULTI_LINE_DOCS = '''"""Module summary.

Details of the module.
"""
import os


class Stack:
    """A stack.

    Backed by a list.
    """

    def push(self, item):
        """
        Push ``item``.

        Args: item
        """
        self.items.append(item)

    def pop(self):
        """One line already."""
        return self.items.pop()

    def peek(self):
        r"""Top \\alpha
        without popping."""

    def size(self):
        """Says "how many"
        items."""
        return len(self.items)
'''
SUMMARIZED_HEAD = '''"""Module summary."""
import os


class Stack:
    """A stack."""

    def push(self, item):
        """Push ``item``."""
        self.items.append(item)

'''


def test_summarize_docstrings_keeps_each_summary_line_and_every_code_line():
    rest = MULTI_LINE_DOCS[MULTI_LINE_DOCS.index("    def pop"):]  # one-liner, and summaries needing escapes
    assert corpus.summarize_docstrings(MULTI_LINE_DOCS) == SUMMARIZED_HEAD + rest


@pytest.mark.parametrize("text", [
    "def f(): '''shares\n    its line'''\n",  # the docstring starts on the header's line
    "def f():\n    '''doc\n    more'''; x = 1\n",  # another statement shares its last line
    "print 'python 2'\n",  # does not parse: left alone
    'def f():\n    """\n    """\n    return 1\n',  # a blank docstring has no summary to keep
])
def test_summarize_docstrings_leaves_what_it_cannot_rewrite_line_for_line(text):
    assert corpus.summarize_docstrings(text) == text


def test_collect_corpus_filters_deduplicates_and_splits(tmp_path):
    stdlib = tmp_path / "stdlib"
    (stdlib / "site-packages" / "other").mkdir(parents=True)
    (stdlib / "site-packages" / "other" / "mod.py").write_text(CODE)
    (stdlib / "json").mkdir()
    (stdlib / "json" / "tool.py").write_text(CODE)
    (stdlib / "table.py").write_text(TABLE)
    names = [f"m{i}.py" for i in range(200)]
    for i, name in enumerate(names):
        (stdlib / name).write_text(f"VALUE = {i}\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    make_wheel(cache, "demo", "1.0", "License-Expression: MIT", {
        "demo/__init__.py": CODE.replace("\n", "   \n"),  # the stdlib's json/tool.py up to trailing spaces
        "demo/core.py": "class Demo:\n    pass\n", "demo/tests/test_core.py": CODE, "demo/data.txt": "not python"})

    got = corpus.collect_corpus(str(cache), packages=(("demo", "1.0"),), stdlib_root=str(stdlib))

    kept = {p for p, _ in got.train + got.val}
    assert kept == {"json/tool.py", "demo/core.py", *names}
    assert got.skipped["duplicate"] == ["demo:demo/__init__.py"]
    assert got.skipped["table-like"] == ["Python standard library:table.py"]
    assert got.skipped["folder tests/"] == ["demo:demo/tests/test_core.py"]
    held_out = {p for p in kept if int.from_bytes(hashlib.sha1(p.encode()).digest()[:8], "big") % 50 == 0}
    assert {p for p, _ in got.val} == held_out and 0 < len(held_out) < 20
    assert got.source_of["demo/core.py"] == "demo" and got.source_of["json/tool.py"] == "Python standard library"
    demo = next(s for s in got.sources if s.name == "demo")
    assert demo.licence == "MIT" and len(demo.sha256) == 64
    assert got.by_source("train")["demo"] == (1, len("class Demo:\n    pass\n"))


def test_collect_corpus_refuses_a_copyleft_wheel(tmp_path):
    make_wheel(tmp_path, "gpl", "2.0", "License-Expression: GPL-3.0-only", {"gpl/x.py": CODE})
    with pytest.raises(RuntimeError, match="GPL-3.0-only"):
        corpus.collect_corpus(str(tmp_path), packages=(("gpl", "2.0"),), stdlib_root=str(tmp_path))


# ------------------------------------------------------------------------------------------ quality
def test_cut_to_complete_lines():
    assert quality.cut_to_complete_lines("def f():\n    return 1\n    x = (", finished=False) == \
        "def f():\n    return 1\n"
    assert quality.cut_to_complete_lines("def f():\n    return 1", finished=True) == "def f():\n    return 1"


def test_parses():
    assert quality.parses("def f(n):\n    if n < 2:\n        return n\n    return f(n - 1)\n")
    assert not quality.parses("def f(n):\n    x = 1\n        y = 2\n")
    assert not quality.parses("def f(n):\n")  # a header with no body is not a complete program
    assert not quality.parses("x = 1\0\n")  # a NUL byte: refused without raising


def test_is_degenerate_counts_repeated_4grams():
    assert not quality.is_degenerate([1, 2, 3, 4] * 3 + [5])  # (1, 2, 3, 4) three times: allowed
    assert quality.is_degenerate([1, 2, 3, 4] * 4)  # four times: degenerate
    assert quality.is_degenerate([7] * 7)  # (7, 7, 7, 7) four times
    assert not quality.is_degenerate(list(range(64)))


def test_header_prompts_spread_over_the_files():
    files = [(f"f{i}.py", f"import os\n\ndef fn{i}(a, b):\n    pass\n\n    def inner(self):\n        pass\n"
                          f"class C{i}(Base):\n    x = 1\ndef broken{i}(a,\n         b):\n") for i in range(10)]
    got = quality.header_prompts(files, 5)
    assert got == ["def fn0(a, b):", "def fn2(a, b):", "def fn4(a, b):", "def fn6(a, b):", "def fn8(a, b):"]
    assert len(quality.header_prompts(files, 20)) == 20  # 10 functions and 10 classes
    with pytest.raises(ValueError, match="count=21"):
        quality.header_prompts(files, 21)
