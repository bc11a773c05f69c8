"""Find a checkpoint folder and read its safetensors weights straight into minivllm's modules."""
from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open
from torch import nn

# what a model folder needs; the weights may be split over several *.safetensors files
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def resolve_model_folder(model: str) -> str:
    """A local folder as is; a hub id ("org/name") is downloaded by huggingface_hub (online users)."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"model={model!r} must be a folder path or a hub id")
    if os.path.isdir(model):
        if not os.path.exists(os.path.join(model, "config.json")):
            raise FileNotFoundError(f"model={model!r}: no config.json in this folder")
        return model
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise FileNotFoundError(f"model={model!r}: no such folder")
    from huggingface_hub import snapshot_download
    return snapshot_download(model, allow_patterns=_ALLOW_PATTERNS)


def load_weights(model: nn.Module, folder: str) -> None:
    """Copy every checkpoint tensor into its parameter (fused and sharded through each layer's
    ``weight_loader``) and fail if any parameter was left unset. A model built for one pipeline stage
    names, through ``weight_name``, the tensors it owns; the others are never read."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"model={folder!r}: no *.safetensors weights in this folder")
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules", {})
    weight_name = getattr(model, "weight_name", lambda name: name)
    loaded: set[str] = set()
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                own = weight_name(name)
                if "rotary_emb.inv_freq" in name or own is None:
                    continue
                target, shard = _target(own, packed)
                if target not in params:
                    if name == "lm_head.weight":  # tied checkpoints may still store it
                        continue
                    raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {type(model).__name__}")
                param = params[target]
                owner = model.get_submodule(target.rsplit(".", 1)[0])
                loader = getattr(owner, "weight_loader", None)
                tensor = f.get_tensor(name)
                with torch.no_grad():
                    if shard is not None:
                        loader(param, tensor, shard)
                    elif loader is not None:
                        loader(param, tensor)
                    else:
                        param.data.copy_(tensor)
                loaded.add(target)
    tied = {n for n, p in params.items() if any(p is params[m] for m in loaded)}
    missing = sorted(set(params) - loaded - tied)
    if missing:
        raise ValueError(f"model={folder!r}: the checkpoint has no weights for {missing[:5]}")


def _target(name: str, packed: dict) -> tuple[str, object]:
    for part, (fused, shard) in packed.items():
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), shard
    return name, None
