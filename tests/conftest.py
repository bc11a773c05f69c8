"""Shared fixtures: tiny real checkpoints built offline, and transformers as the reference."""
from __future__ import annotations

import logging

import pytest
import torch

from minivllm.models.tiny import save_tiny_checkpoint
from tests.reference import Reference

logging.getLogger("minivllm").setLevel(logging.WARNING)  # keep the cache-size line out of test logs


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(arch, **config)`` -> folder of a tiny random checkpoint, built once per session."""
    cache: dict = {}

    def make(arch: str = "qwen3", **overrides) -> str:
        key = repr((arch, sorted(overrides.items(), key=str)))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = save_tiny_checkpoint(str(folder), arch, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def reference():
    """``reference(folder)`` -> a cached `Reference` for that checkpoint."""
    cache: dict = {}

    def get(folder: str, dtype=torch.float32) -> Reference:
        if (folder, dtype) not in cache:
            cache[folder, dtype] = Reference(folder, dtype)
        return cache[folder, dtype]

    return get
