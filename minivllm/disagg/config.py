"""The two instances' configurations, checked as a pair before any process starts."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from minivllm.config.engine import EngineConfig, resolve_dtype
from minivllm.config.model import ModelConfig
from minivllm.disagg.records import kv_bytes_per_token
from minivllm.models.loader import resolve_model_folder

KV_TRANSFER_BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class InstanceSettings:
    """What the front end knows of one instance before it starts."""

    config: EngineConfig
    folder: str
    model_config: ModelConfig
    dtype: torch.dtype
    max_model_len: int


def instance_settings(side: str, model: str, engine_args: dict, overrides: dict | None) -> InstanceSettings:
    """``engine_args`` (both instances') with ``overrides`` (this one's; ``model`` among them) applied."""
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"{side}={overrides!r} must be a dict of engine arguments for the {side} instance")
    args = {**engine_args, **(overrides or {})}
    config = EngineConfig.from_args(args.pop("model", model), **args)
    folder = resolve_model_folder(config.model)
    mc = ModelConfig.from_folder(folder)
    return InstanceSettings(config, folder, mc, resolve_dtype(config.dtype, mc.dtype, config.torch_device),
                            config.scheduler_config.resolve_max_model_len(mc.max_position_embeddings))


def check_pair(prefill: InstanceSettings, decode: InstanceSettings) -> None:
    """Refuse (ValueError naming the field and both values) a pair whose caches cannot exchange K/V
    position for position, or whose engines would stop a request at different points."""
    for side, s in (("prefill", prefill), ("decode", decode)):
        par = s.config.parallel_config
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if getattr(par, name) != 1:
                raise ValueError(f"{side} {name}={getattr(par, name)}: each instance runs its engine in one "
                                 "process here (its K/V must be in that process to be sent)")
        if s.config.speculative_config is not None:
            raise ValueError(f"{side} speculative_config={s.config.speculative_config!r} is not supported in "
                             "disaggregated serving (a draft model's cache would miss the prompt)")
    same = {
        "model": (os.path.realpath(prefill.folder), os.path.realpath(decode.folder)),
        "block_size": (prefill.config.cache_config.block_size, decode.config.cache_config.block_size),
        "dtype": (prefill.dtype, decode.dtype),
        "device": (prefill.config.torch_device.type, decode.config.torch_device.type),
        "max_model_len": (prefill.max_model_len, decode.max_model_len),
    }
    for name, (p, d) in same.items():
        if p != d:
            raise ValueError(f"{name} differs: prefill {name}={p!r}, decode {name}={d!r}; both instances "
                             f"must have the same {name} to hand a request's K/V from one to the other")


def resolve_kv_transfer_backend(backend: str, prefill: InstanceSettings, decode: InstanceSettings) -> str:
    """``auto``: NCCL between two different GPUs, else gloo (through host memory on one GPU)."""
    if backend not in KV_TRANSFER_BACKENDS:
        raise ValueError(f"kv_transfer_backend={backend!r} must be one of {KV_TRANSFER_BACKENDS}")
    devices = prefill.config.torch_device, decode.config.torch_device
    cuda_pair = all(d.type == "cuda" for d in devices) and (devices[0].index or 0) != (devices[1].index or 0)
    if backend == "nccl" and not cuda_pair:
        raise ValueError(f"kv_transfer_backend='nccl' needs the two instances on two different GPUs, but they "
                         f"are on {devices[0]} and {devices[1]}")
    if backend == "auto":
        return "nccl" if cuda_pair else "gloo"
    return backend


def bytes_per_token(s: InstanceSettings) -> int:
    mc = s.model_config
    return kv_bytes_per_token(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, s.dtype.itemsize)
