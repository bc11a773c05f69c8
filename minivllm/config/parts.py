"""vLLM's flat engine arguments (`LLM(model, block_size=..., max_num_seqs=...)`) routed to the config
part that owns each of them. Shared by `EngineConfig.from_args` and `SimConfig` (no torch)."""
from __future__ import annotations

from dataclasses import fields


def positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int >= 1")


def split_args(args: dict, parts: dict[str, type], accepts: list[str], owner: str) -> dict[str, dict]:
    """``{part name: {field: value}}`` for the dataclasses in ``parts``; a name that no part owns and
    that is not in ``accepts`` (the owner's own fields) is a ValueError listing what ``owner`` takes."""
    owned = {f.name: part for part, cls in parts.items() for f in fields(cls)}
    unknown = sorted(name for name in args if name not in owned and name not in accepts)
    if unknown:
        known = ", ".join(accepts + list(owned))
        raise ValueError(f"unknown engine argument(s) {', '.join(unknown)}; {owner} accepts {known}")
    split: dict[str, dict] = {part: {} for part in parts}
    for name, value in args.items():
        if name in owned:
            split[owned[name]][name] = value
    return split
