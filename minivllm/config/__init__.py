"""The engine's configuration, in vLLM's parts: `model.ModelConfig` (the checkpoint's config.json),
`speculative.SpeculativeConfig`, `parallel` (how a pipeline splits the layers) and `engine.EngineConfig`
(everything `LLM(model, **kwargs)` takes). Only `engine` imports torch, so the simulator can read a
checkpoint's shape through `model` without it; ``from minivllm.config import EngineConfig`` loads it lazily.
"""
from __future__ import annotations

import importlib

_LAZY = {"EngineConfig": "engine", "resolve_dtype": "engine", "ModelConfig": "model",
         "SpeculativeConfig": "speculative"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'minivllm.config' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"minivllm.config.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
