"""A non-editable install ships every package: pyproject.toml lists each folder of minivllm/ that
has an __init__.py (a package left out installs fine and fails only at import)."""
from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "minivllm").rglob("__init__.py")}
    found.add("minivllm.kernels")  # kernels/ is installed under this name through package-dir
    assert listed == found
