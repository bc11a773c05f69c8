"""Packaging: a non-editable install ships every package, and the repository's own folders never hide
an installed package (pytest, python and python -m started in the root all put the root on sys.path)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "minivllm").rglob("__init__.py")}
    found.add("minivllm.kernels")  # a namespace package on purpose: no __init__.py (see pyproject.toml)
    assert listed == found


def test_repository_root_does_not_hide_hugging_faces_kernels_package():
    """transformers imports Hugging Face's `kernels` when a model class loads; started in the root, a
    `kernels/__init__.py` of ours would be found first and break every model (transformers 5.25)."""
    try:
        metadata.version("kernels")
    except metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed (transformers < 5.25 does not need it)")
    script = textwrap.dedent("""
        import kernels, torch
        assert kernels.__file__ is not None and "site-packages" in kernels.__file__, kernels.__path__
        from minivllm.kernels import reference  # ours, under its own name
        from transformers import AutoModelForCausalLM
        from minivllm.models.tiny import tiny_config
        model = AutoModelForCausalLM.from_config(tiny_config("qwen3"))
        logits = model(torch.tensor([[1, 2, 3]])).logits
        assert logits.shape == (1, 3, model.config.vocab_size), logits.shape
        print("ok", kernels.__file__)
    """)
    # `python -c` in the root puts the root first on sys.path, as a learner's shell or notebook would.
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok")


def test_a_wheel_ships_the_kernels_as_minivllm_kernels(tmp_path):
    """A wheel built from a copy of the sources ships the kernels as `minivllm.kernels` and no top-level
    `kernels`, and installed (first on sys.path, before the checkout's editable finder) they import."""
    import shutil
    import zipfile

    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("minivllm", "kernels"):  # the link minivllm/kernels -> ../kernels stays a link
        shutil.copytree(ROOT / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("minivllm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    kernels = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("minivllm/kernels/")) == kernels
    assert not any(n.startswith("kernels/") for n in names)
    target = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    script = ("import minivllm, minivllm.kernels.reference as r, importlib.util as u; "
              "print(r.__file__.startswith(r'%s'), u.find_spec('minivllm.kernels.paged_attention') is not None)"
              % target)
    run = subprocess.run([sys.executable, "-c", script], env={"PYTHONPATH": str(target)},
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.stdout.split() == ["True", "True"], run.stderr[-2000:]
