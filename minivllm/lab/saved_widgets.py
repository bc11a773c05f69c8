"""Widget outputs in saved notebooks, kept showable: what `make course` sets up for JupyterLab.

JupyterLab (ipywidgets 8) renders a widget output from its model: the kernel's, or the state saved in
the notebook's metadata. With nothing there it shows "Error displaying widget: model not found".
`make course` turns on the widget manager's saveState (`write_lab_overrides`), so a save writes the
live models, and runs every save through `widget_pre_save_hook`, which catches what saveState misses:
the manager saves only models live in the kernel (ipywidgets issue 3888), so a notebook reopened, then
saved before its cells run again, would lose the state its outputs still point at.
"""
from __future__ import annotations

import json
import os
import re
import sys

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
LAB_SETTINGS_OVERRIDES = {"@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": True}}
_MODEL_REF = re.compile(r"IPY_MODEL_([0-9a-zA-Z_-]+)")


def write_lab_overrides(prefix: str = sys.prefix) -> str:
    """Write `LAB_SETTINGS_OVERRIDES` into ``prefix``'s JupyterLab ``overrides.json`` (JupyterLab's
    defaults for the settings it names, kept with any other setting already there); returns its path."""
    path = os.path.join(prefix, "share", "jupyter", "lab", "settings", "overrides.json")
    settings: dict = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    for plugin, values in LAB_SETTINGS_OVERRIDES.items():
        settings.setdefault(plugin, {}).update(values)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)
        f.write("\n")
    return path


def _with_children(model_ids, state: dict) -> set[str]:
    """``model_ids`` and every model they reference (a box's children, layouts, styles), transitively."""
    seen, todo = set(), list(model_ids)
    while todo:
        mid = todo.pop()
        if mid not in seen:
            seen.add(mid)
            if mid in state:
                todo += _MODEL_REF.findall(json.dumps(state[mid]))
    return seen


def widget_pre_save_hook(model: dict, path: str | None = None, contents_manager=None, **_) -> None:
    """A Jupyter server pre-save hook (``--ContentsManager.pre_save_hook=minivllm.lab.saved_widgets.widget_pre_save_hook``):
    a saved notebook's widget outputs always find their models. A model the new widget state lacks is
    taken from the file being overwritten when that holds it; an output whose models are still missing
    keeps only its other representations (a lab's ``text/html`` view, ``text/plain``), so reopening
    shows the saved view instead of a widget error."""
    nb = model.get("content") if model.get("type") == "notebook" else None
    if not isinstance(nb, dict):
        return
    views = [(out["data"], out["data"][WIDGET_VIEW].get("model_id")) for cell in nb.get("cells", ())
             for out in cell.get("outputs", ()) if isinstance(out.get("data"), dict) and WIDGET_VIEW in out["data"]]
    if not views:
        return
    meta = nb.setdefault("metadata", {})
    bundle = (meta.get("widgets") or {}).get(WIDGET_STATE) or {"version_major": 2, "version_minor": 0}
    state = bundle.setdefault("state", {})
    wanted = _with_children((mid for _, mid in views), state)
    if wanted - state.keys() and path and contents_manager is not None:
        try:  # the models of outputs that were not run again since the file was saved
            with open(os.path.join(contents_manager.root_dir, path), encoding="utf-8") as f:
                saved = json.load(f)["metadata"]["widgets"][WIDGET_STATE]["state"]
        except (OSError, ValueError, KeyError, TypeError):
            saved = {}
        for mid in _with_children(wanted - state.keys(), saved) - state.keys():
            if mid in saved:
                state[mid] = saved[mid]
    for data, mid in views:
        if mid is None or not _with_children([mid], state) <= state.keys():
            del data[WIDGET_VIEW]
            data.setdefault("text/plain", "(an interactive widget: run this cell to show it)")
    if state:
        meta["widgets"] = {WIDGET_STATE: bundle}
