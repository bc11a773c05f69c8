"""Chapter 12's engine landscape as data: which inference engine offers what, with a source for
every claim.

`landscape.toml` (package data beside this module) has one row per capability and one column per
engine (vLLM, SGLang, TensorRT-LLM, TGI, LMDeploy, llama.cpp, minivllm). Every cell says what the
engine does in our own words, where that is written (a URL of the project's docs, README, code or
paper; for minivllm, a path in this repository), the date it was checked, and whether it repeats a
speed claim the project makes about itself. *Needs* are the filters of the chapter's lab (an engine
meets a need when its cell in the need's row carries the need's tag); *scenarios* are jobs answered
by the rows that decide them.

    from minivllm.course.landscape import load_landscape
    table = load_landscape()
    [e.name for e in table.engines_meeting(["multi_lora_batched", "actively_developed"])]

The loader refuses a malformed file with a ValueError naming the field. No torch: this is course
data.
"""
from __future__ import annotations

import datetime
import functools
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any, Iterable

DATA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "landscape.toml")
KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
URL_PATTERN = re.compile(r"^https?://[^\s/]+\.[^\s/]+(/\S*)?$")
CELL_FIELDS = {"text", "source", "more_sources", "checked", "self_reported", "tags"}


@dataclass(frozen=True)
class Cell:
    """What one engine offers for one capability, and where that is written."""
    text: str
    source: str                      # an http(s) URL, or a path in this repository (minivllm's column)
    checked: datetime.date           # when the source was last read against the text
    self_reported: bool              # the text repeats a speed claim the project makes about itself
    tags: tuple[str, ...] = ()       # what the needs match
    more_sources: tuple[str, ...] = ()

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source,) + self.more_sources


@dataclass(frozen=True)
class Engine:
    key: str
    name: str
    home: str


@dataclass(frozen=True)
class Capability:
    key: str
    name: str


@dataclass(frozen=True)
class Need:
    """A filter: the engines whose cell in `capability` carries `tag`."""
    key: str
    label: str
    capability: str
    tag: str


@dataclass(frozen=True)
class Scenario:
    """A job, the needs it has, the rows that decide it, why, and the engines the table gives."""
    key: str
    title: str
    needs: tuple[str, ...]
    deciding: tuple[str, ...]
    reasoning: str
    answer: tuple[str, ...]


def is_url(source: str) -> bool:
    return bool(URL_PATTERN.match(source))


def is_repository_path(source: str) -> bool:
    """A relative path inside the repository (no scheme, not absolute, no ``..``)."""
    return (bool(source) and "://" not in source and not os.path.isabs(source) and not re.search(r"\s", source)
            and ".." not in source.replace("\\", "/").split("/"))


@dataclass(frozen=True)
class Landscape:
    engines: tuple[Engine, ...]
    capabilities: tuple[Capability, ...]
    needs: tuple[Need, ...]
    scenarios: tuple[Scenario, ...]
    cells: dict[tuple[str, str], Cell]  # (capability key, engine key) -> cell

    def engine(self, key: str) -> Engine:
        return _find(self.engines, key, "engine")

    def capability(self, key: str) -> Capability:
        return _find(self.capabilities, key, "capability")

    def need(self, key: str) -> Need:
        return _find(self.needs, key, "need")

    def scenario(self, key: str) -> Scenario:
        return _find(self.scenarios, key, "scenario")

    def cell(self, capability: str, engine: str) -> Cell:
        self.capability(capability), self.engine(engine)  # refuse unknown keys by name
        return self.cells[capability, engine]

    def meets(self, engine: str, need: str) -> bool:
        """Whether ``engine``'s cell in the need's row carries the need's tag."""
        n = self.need(need)
        return n.tag in self.cell(n.capability, engine).tags

    def engines_meeting(self, needs: Iterable[str]) -> tuple[Engine, ...]:
        """The engines (in table order) that meet every need in ``needs``."""
        needs = tuple(needs)
        for key in needs:
            self.need(key)
        return tuple(e for e in self.engines if all(self.meets(e.key, n) for n in needs))

    def missing_needs(self, engine: str, needs: Iterable[str]) -> tuple[Need, ...]:
        """The needs in ``needs`` that ``engine`` does not meet."""
        return tuple(self.need(n) for n in needs if not self.meets(engine, n))

    def rows_for(self, needs: Iterable[str]) -> tuple[Capability, ...]:
        """The capabilities (in table order) the needs filter on."""
        wanted = {self.need(n).capability for n in needs}
        return tuple(c for c in self.capabilities if c.key in wanted)

    def self_reported_cells(self) -> tuple[tuple[str, str], ...]:
        return tuple(k for k, c in self.cells.items() if c.self_reported)


def _find(items, key: str, kind: str):
    for item in items:
        if item.key == key:
            return item
    raise ValueError(f"{kind}={key!r} is unknown; known: {', '.join(i.key for i in items)}")


# ---- parsing and validation ---------------------------------------------------------------------------

def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field}={value!r} must be a non-empty string")
    return value


def _key(value: Any, field: str) -> str:
    if not isinstance(value, str) or not KEY_PATTERN.match(value):
        raise ValueError(f"{field}={value!r} must be a lower-case identifier (letters, digits, _)")
    return value


def _source(value: Any, field: str) -> str:
    if not isinstance(value, str) or not (is_url(value) or is_repository_path(value)):
        raise ValueError(f"{field}={value!r} must be an http(s) URL or a path in this repository")
    return value


def _date(value: Any, field: str) -> datetime.date:
    # TOML dates arrive as datetime.date; a quoted ISO string is accepted too. A datetime is not a date.
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.date.fromisoformat(value)
        except ValueError:
            pass
    raise ValueError(f"{field}={value!r} must be an ISO date (YYYY-MM-DD)")


def _list(value: Any, field: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{field}={value!r} must be a list")
    return value


def _table(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{field}={value!r} must be a table")
    return value


def _unique(items, field: str) -> None:
    seen = set()
    for item in items:
        if item.key in seen:
            raise ValueError(f"{field} has the key {item.key!r} twice")
        seen.add(item.key)


def parse_cell(raw: Any, field: str) -> Cell:
    raw = _table(raw, field)
    unknown = sorted(set(raw) - CELL_FIELDS)
    if unknown:
        raise ValueError(f"{field}.{unknown[0]} is not a cell field; fields: {', '.join(sorted(CELL_FIELDS))}")
    for name in ("text", "source", "checked", "self_reported"):
        if name not in raw:
            raise ValueError(f"{field}.{name} is missing")
    if not isinstance(raw["self_reported"], bool):
        raise ValueError(f"{field}.self_reported={raw['self_reported']!r} must be true or false")
    tags = _list(raw.get("tags", []), f"{field}.tags")
    more = _list(raw.get("more_sources", []), f"{field}.more_sources")
    return Cell(text=_text(raw["text"], f"{field}.text"),
                source=_source(raw["source"], f"{field}.source"),
                checked=_date(raw["checked"], f"{field}.checked"),
                self_reported=raw["self_reported"],
                tags=tuple(_key(t, f"{field}.tags[{i}]") for i, t in enumerate(tags)),
                more_sources=tuple(_source(s, f"{field}.more_sources[{i}]") for i, s in enumerate(more)))


def parse_landscape(data: Any) -> Landscape:
    """Build and check a `Landscape` from the parsed TOML; a malformed one raises ValueError naming
    the field."""
    data = _table(data, "landscape")
    for name in ("engines", "capabilities", "needs", "scenarios", "cells"):
        if name not in data:
            raise ValueError(f"{name} is missing from the landscape")

    def rows(name: str) -> list[dict]:
        return [_table(r, f"{name}[{i}]") for i, r in enumerate(_list(data[name], name))]

    engines = tuple(Engine(_key(r.get("key"), f"engines[{i}].key"), _text(r.get("name"), f"engines[{i}].name"),
                           _source(r.get("home"), f"engines[{i}].home")) for i, r in enumerate(rows("engines")))
    capabilities = tuple(Capability(_key(r.get("key"), f"capabilities[{i}].key"),
                                    _text(r.get("name"), f"capabilities[{i}].name"))
                         for i, r in enumerate(rows("capabilities")))
    for items, name in ((engines, "engines"), (capabilities, "capabilities")):
        if not items:
            raise ValueError(f"{name} is empty")
        _unique(items, name)
    engine_keys = {e.key for e in engines}
    capability_keys = {c.key for c in capabilities}

    raw_cells = _table(data["cells"], "cells")
    cells: dict[tuple[str, str], Cell] = {}
    for cap in raw_cells:
        if cap not in capability_keys:
            raise ValueError(f"cells.{cap} is not a capability; known: {', '.join(sorted(capability_keys))}")
        for eng in _table(raw_cells[cap], f"cells.{cap}"):
            if eng not in engine_keys:
                raise ValueError(f"cells.{cap}.{eng} is not an engine; known: {', '.join(sorted(engine_keys))}")
    for c in capabilities:
        for e in engines:
            field = f"cells.{c.key}.{e.key}"
            if e.key not in raw_cells.get(c.key, {}):
                raise ValueError(f"{field} is missing: every engine needs a cell for every capability")
            cells[c.key, e.key] = parse_cell(raw_cells[c.key][e.key], field)

    needs = []
    for i, r in enumerate(rows("needs")):
        need = Need(_key(r.get("key"), f"needs[{i}].key"), _text(r.get("label"), f"needs[{i}].label"),
                    _key(r.get("capability"), f"needs[{i}].capability"), _key(r.get("tag"), f"needs[{i}].tag"))
        if need.capability not in capability_keys:
            raise ValueError(f"needs[{i}].capability={need.capability!r} is not a capability")
        if not any(need.tag in cells[need.capability, e.key].tags for e in engines):
            raise ValueError(f"needs[{i}].tag={need.tag!r} is in no cell of the {need.capability!r} row")
        needs.append(need)
    _unique(needs, "needs")
    need_keys = {n.key for n in needs}

    scenarios = []
    for i, r in enumerate(rows("scenarios")):
        field = f"scenarios[{i}]"

        def refs(name: str, known: set[str], kind: str) -> tuple[str, ...]:
            values = _list(r.get(name), f"{field}.{name}")
            for j, v in enumerate(values):
                if v not in known:
                    raise ValueError(f"{field}.{name}[{j}]={v!r} is not {kind}")
            return tuple(values)

        scenarios.append(Scenario(
            key=_key(r.get("key"), f"{field}.key"), title=_text(r.get("title"), f"{field}.title"),
            needs=refs("needs", need_keys, "a need"), deciding=refs("deciding", capability_keys, "a capability"),
            reasoning=_text(r.get("reasoning"), f"{field}.reasoning"),
            answer=refs("answer", engine_keys, "an engine")))
        if not scenarios[-1].deciding:
            raise ValueError(f"{field}.deciding is empty: name the rows that decide the job")
    _unique(scenarios, "scenarios")
    return Landscape(engines, capabilities, tuple(needs), tuple(scenarios), cells)


def load_landscape(path: str | None = None) -> Landscape:
    """The landscape in ``path`` (the shipped table by default; that one is read once)."""
    if path is None:
        return _shipped()
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"path={path!r} is not valid TOML: {e}") from None
    return parse_landscape(data)


@functools.cache
def _shipped() -> Landscape:
    return load_landscape(DATA_PATH)


__all__ = ["Capability", "Cell", "DATA_PATH", "Engine", "Landscape", "Need", "Scenario", "is_repository_path",
           "is_url", "load_landscape", "parse_cell", "parse_landscape"]
