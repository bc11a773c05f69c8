"""Lazy package attributes (PEP 562): ``import minivllm`` loads neither torch nor the engine until
`LLM` is first touched, and ``import minivllm.lab`` loads each lab on first use."""
from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_attributes(package: str, homes: dict[str, str]) -> tuple[Callable, Callable]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose attribute ``name`` is defined in the
    module ``homes[name]`` and imported from there on first access."""
    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(homes[name]), name)
        setattr(sys.modules[package], name, value)  # the next access is a plain lookup
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(homes))

    return __getattr__, __dir__
