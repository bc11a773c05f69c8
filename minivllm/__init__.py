"""minivllm: a compact LLM inference engine with vLLM's offline API.

``import minivllm`` is light: the engine (and torch) load when `LLM` or `LLMEngine` is first touched,
so the torch-free core and the simulator (`minivllm.core`, `minivllm.sim`) import without them.
"""
from __future__ import annotations

import importlib

_LAZY = {"LLM": "minivllm.llm", "LLMEngine": "minivllm.engine.llm_engine",
         "SamplingParams": "minivllm.sampling_params", "RequestOutput": "minivllm.outputs",
         "CompletionOutput": "minivllm.outputs", "RequestMetrics": "minivllm.outputs"}

__all__ = list(_LAZY)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'minivllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
