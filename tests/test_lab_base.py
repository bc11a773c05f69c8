"""The lab pattern (minivllm.lab.base) driven the way a notebook and a browser drive it: set
control values, click buttons, and read the state and the rendered HTML, with no browser."""
from __future__ import annotations

import ipywidgets as widgets
import pytest
from matplotlib.figure import Figure

from minivllm.lab import Lab, LabError, error_html, figure_png


class Tape:
    """A plain state object: a tape of cells in blocks of ``block`` cells, filled one per step."""

    def __init__(self, capacity: int = 12, block: int = 4):
        self.capacity, self.block, self.filled = capacity, block, 0

    def set_block(self, block: int) -> None:
        if block < 1 or self.capacity % block:
            raise LabError(f"block={block} must be >= 1 and divide the capacity {self.capacity}")
        self.block = block

    def step(self) -> None:
        if self.filled == self.capacity:
            raise LabError(f"the tape is full ({self.capacity} cells)")
        self.filled += 1

    @property
    def blocks_used(self) -> int:
        return -(-self.filled // self.block)


class TapeLab(Lab):
    def __init__(self, figure: bool = False):
        self.state = Tape()
        self.block = widgets.IntSlider(value=4, min=0, max=12, description="block")
        self.step_button = widgets.Button(description="step")
        self.fail_with = None  # set by a test to make rendering fail
        super().__init__([self.on_change(self.block, self.state.set_block),
                          self.on_click(self.step_button, self.state.step)], figure=figure)

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.step_button.click()

    def render(self) -> str:
        if self.fail_with is not None:
            raise self.fail_with
        return (f"<p>filled <b>{self.state.filled}</b> cells in <b>{self.state.blocks_used}</b> "
                f"blocks of {self.state.block}</p>")

    def figure(self):
        fig = Figure(figsize=(3, 1))
        ax = fig.add_subplot()
        ax.bar(range(self.state.capacity), [1 if i < self.state.filled else 0 for i in range(self.state.capacity)])
        ax.set_title("cells filled")
        ax.set_xlabel("cell")
        ax.set_ylabel("filled")
        return fig


def test_initial_render():
    lab = TapeLab()
    assert "filled <b>0</b> cells in <b>0</b> blocks of 4" in lab.view.value
    assert lab.error.value == "" and lab.error_message == ""
    assert lab.image is None


def test_clicks_and_values_update_state_and_view(capsys):
    lab = TapeLab()
    lab.step(5)
    assert lab.state.filled == 5
    assert "in <b>2</b> blocks of 4" in lab.view.value
    lab.block.value = 6  # what dragging the slider does
    assert lab.state.block == 6
    assert "in <b>1</b> blocks of 6" in lab.view.value
    assert capsys.readouterr() == ("", ""), "callbacks must never print"


def test_impossible_setting_shows_a_message_not_a_trace(capsys):
    lab = TapeLab()
    lab.step(3)
    before = lab.view.value
    lab.block.value = 5  # does not divide 12
    assert lab.state.block == 4, "a rejected setting leaves the state as it was"
    assert lab.view.value == before, "the view keeps the last valid state"
    assert lab.block.value == 4, "the control goes back to the value in effect"
    assert lab.error_message == ("block=5 must be >= 1 and divide the capacity 12 "
                                 "(block is back at 4, the value in effect)")
    assert "minivllm-lab-error" in lab.error.value and "Traceback" not in lab.error.value
    assert "block=5" in lab.snapshot_html()
    lab.block.value = 3  # the next accepted action clears the message
    assert lab.error.value == "" and lab.state.block == 3
    assert "in <b>1</b> blocks of 3" in lab.view.value
    lab.step(20)  # runs past the end: the state refuses, the widget says why
    assert lab.state.filled == 12
    assert lab.error_message == "the tape is full (12 cells)"
    assert capsys.readouterr() == ("", "")


def test_a_failing_render_is_also_shown_in_the_widget():
    lab = TapeLab()
    lab.fail_with = ValueError("cannot draw <this>")
    lab.step()
    assert lab.error_message == "cannot draw <this>"
    assert "&lt;this&gt;" in lab.error.value, "messages are HTML-escaped"
    lab.fail_with = RuntimeError("a bug")
    with pytest.raises(RuntimeError):  # anything but a ValueError is a bug and must surface
        lab.apply(lab.state.step)
    assert lab.error_message == "cannot draw <this>"


def test_a_bug_in_a_click_callback_is_reported_not_swallowed(caplog):
    """ipywidgets reports a button callback's exception itself (a traceback in the kernel's
    output, a log record here); the lab does not turn a bug into an error message."""
    lab = TapeLab()
    lab.fail_with = RuntimeError("a bug")
    lab.step()
    assert "a bug" in caplog.text
    assert lab.error.value == ""


def test_figure_becomes_png():
    lab = TapeLab(figure=True)
    first = bytes(lab.image.value)
    assert first.startswith(b"\x89PNG")
    lab.step(6)
    assert bytes(lab.image.value).startswith(b"\x89PNG") and bytes(lab.image.value) != first
    assert lab.image in lab.widget.children


def test_display_and_show(capsys):
    from IPython.core.formatters import DisplayFormatter

    lab = TapeLab(figure=True)
    data, _ = DisplayFormatter().format(lab)
    assert data["text/plain"] == "TapeLab (interactive: run this notebook in Jupyter)"
    assert "application/vnd.jupyter.widget-view+json" in data
    lab.step(2)
    lab.show()  # outside IPython, display() prints the text forms
    out = capsys.readouterr().out
    assert "HTML" in out and "Image" in out


def test_helpers():
    assert error_html("a < b") == ('<div class="minivllm-lab-error" style="' + __import__(
        "minivllm.lab.base", fromlist=["ERROR_STYLE"]).ERROR_STYLE + '">&#9888; a &lt; b</div>')
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    png = figure_png(fig)
    assert png.startswith(b"\x89PNG") and png == figure_png(fig), "PNG bytes are deterministic"


def test_rows_of_controls_sync_and_tables():
    from minivllm.lab.base import CELL_STYLE, html_table

    class TwoRows(TapeLab):
        def __init__(self):
            self.state = Tape()
            self.block = widgets.IntSlider(value=4, min=0, max=12, description="block")
            self.step_button = widgets.Button(description="step")
            self.fail_with = None
            Lab.__init__(self, [[self.on_change(self.block, self.state.set_block)],
                                [self.on_click(self.step_button, self.state.step)]])

    lab = TwoRows()
    assert lab.controls == [lab.block, lab.step_button]
    assert [box.children for box in lab.widget.children[:2]] == [(lab.block,), (lab.step_button,)]
    lab.sync(lab.block, value=5)  # follows the state without acting: 5 does not divide 12, yet no refusal
    assert lab.block.value == 5 and lab.state.block == 4 and lab.error_message == ""
    lab.block.value = 6
    assert lab.state.block == 6
    table = html_table(["a", "b &amp; c"], [[1, "<b>x</b>"]])
    assert table.count(f'style="{CELL_STYLE}"') == 4 and "<th" in table and "<b>x</b>" in table


# ---- reopened notebooks: widget outputs never lose their model ---------------------------------------
def test_the_mimebundle_carries_the_view_for_a_frontend_without_the_model():
    from IPython.core.formatters import DisplayFormatter

    lab = TapeLab(figure=True)
    lab.step(3)
    data, _ = DisplayFormatter().format(lab)
    html = data["text/html"]
    assert html.startswith('<div class="minivllm-lab-saved">') and lab.view.value in html
    assert "run this cell for the interactive lab" in html
    lab.block.value = 5  # refused: the fallback shows the message too, as the widget does
    assert "must be &gt;= 1 and divide" in DisplayFormatter().format(lab)[0]["text/html"]


def test_write_lab_overrides_turns_on_saving_widget_state(tmp_path):
    import json

    from minivllm.lab.saved_widgets import write_lab_overrides

    path = write_lab_overrides(str(tmp_path))
    assert path == str(tmp_path / "share" / "jupyter" / "lab" / "settings" / "overrides.json")
    with open(path) as f:
        assert json.load(f) == {"@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": True}}
    with open(path, "w") as f:  # other settings already there are kept
        json.dump({"@jupyterlab/apputils-extension:themes": {"theme": "JupyterLab Dark"},
                   "@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": False}}, f)
    write_lab_overrides(str(tmp_path))
    with open(path) as f:
        assert json.load(f) == {"@jupyterlab/apputils-extension:themes": {"theme": "JupyterLab Dark"},
                                "@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": True}}


def _notebook_with_lab(state_ids):
    """A notebook whose one output shows a lab (a VBox of an HTML): the widget state holds ``state_ids``."""
    view = {"model_id": "box", "version_major": 2, "version_minor": 0}
    models = {"box": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_html"], "layout": "IPY_MODEL_lay"}},
              "html": {"model_name": "HTMLModel", "state": {"value": "<p>saved</p>"}},
              "lay": {"model_name": "LayoutModel", "state": {}}}
    return {"cells": [{"id": "lab", "cell_type": "code", "source": "lab", "metadata": {}, "execution_count": 1,
                       "outputs": [{"output_type": "execute_result", "execution_count": 1, "metadata": {},
                                    "data": {"application/vnd.jupyter.widget-view+json": view,
                                             "text/html": "<p>view</p>", "text/plain": "Lab"}}]}],
            "metadata": {"widgets": {"application/vnd.jupyter.widget-state+json": {
                "version_major": 2, "version_minor": 0, "state": {i: models[i] for i in state_ids}}}},
            "nbformat": 4, "nbformat_minor": 5}


def test_the_pre_save_hook_in_a_real_contents_manager(tmp_path):
    """What JupyterLab's save does (the server's FileContentsManager, with the hook `make course` sets)."""
    import json

    from jupyter_server.services.contents.filemanager import FileContentsManager

    from minivllm.lab.saved_widgets import WIDGET_VIEW, widget_pre_save_hook

    cm = FileContentsManager(root_dir=str(tmp_path), pre_save_hook="minivllm.lab.saved_widgets.widget_pre_save_hook")

    def save(nb):
        cm.save({"type": "notebook", "format": "json", "content": nb}, "ch.ipynb")
        return json.loads((tmp_path / "ch.ipynb").read_text())

    full = ["box", "html", "lay"]
    saved = save(_notebook_with_lab(full))  # every model there (saveState after Run All): unchanged
    assert WIDGET_VIEW in saved["cells"][0]["outputs"][0]["data"]
    # reopened and saved again before the cell ran: the manager writes only live models (none), the
    # hook takes the output's models back from the file being overwritten (ipywidgets issue 3888)
    saved = save(_notebook_with_lab([]))
    assert WIDGET_VIEW in saved["cells"][0]["outputs"][0]["data"]
    assert sorted(saved["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]) == full
    # models nowhere to be found (Run All with saveState off, a new file): the output keeps its saved view
    (tmp_path / "ch.ipynb").unlink()
    saved = save(_notebook_with_lab(["box", "lay"]))
    data = saved["cells"][0]["outputs"][0]["data"]
    assert {k: "".join(v) for k, v in data.items()} == {"text/html": "<p>view</p>", "text/plain": "Lab"}
    nb = {"cells": [{"cell_type": "markdown", "source": "x", "metadata": {}}], "metadata": {}}
    widget_pre_save_hook({"type": "notebook", "content": nb})  # nothing to do without widget outputs
    widget_pre_save_hook({"type": "file", "content": "text"})
    assert nb == {"cells": [{"cell_type": "markdown", "source": "x", "metadata": {}}], "metadata": {}}
