"""The course's own models, shipped as package data: a small Qwen3 trained on Python source code (the
standard library and pinned open-source packages, `minivllm.course.corpus`) and a much smaller draft
model with the same tokenizer (for speculative decoding).

    from minivllm import LLM
    from minivllm import course
    llm = LLM(course.model_path("target"))

`python -m minivllm.course.train` reproduces them; each folder's README.md is its model card.
"""
from __future__ import annotations

import os

MODEL_NAMES = ("target", "draft")
MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")


def model_path(name: str) -> str:
    """Absolute path of the shipped model folder ``name`` ("target" or "draft")."""
    if name not in MODEL_NAMES:
        raise ValueError(f"name={name!r} is not a course model; known names: {', '.join(MODEL_NAMES)}")
    folder = os.path.join(MODELS_DIR, name)
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        raise FileNotFoundError(
            f"course model {name!r} has no weights in {folder}; train them with "
            f"`python -m minivllm.course.train --out {MODELS_DIR}`")
    return folder


__all__ = ["MODEL_NAMES", "model_path"]
