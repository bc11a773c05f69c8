"""The pattern every chapter's lab follows.

A lab is three things kept apart:

* **state**: a plain Python object (often the real engine piece: a ``BlockManager``, a
  ``Scheduler``, a simulator) that a test drives without a browser;
* **controls**: ipywidgets (sliders, buttons) wired with `Lab.on_change` / `Lab.on_click`. Their
  callbacks change the state and then re-render, which only assigns widget attributes
  (``HTML.value``, ``Image.value``). A callback never prints: under ``pytest --nbval`` (and in
  JupyterLab) whatever a callback prints lands in some cell's output;
* **view**: `Lab.render` returns HTML of the current state and `Lab.figure` an optional matplotlib
  figure, shown as PNG.

A setting the state rejects (a ``ValueError``, e.g. `LabError`) shows up as a message inside the
widget, never as a trace; the view keeps the last valid state and the control goes back to the value
in effect, so a lab never shows a value that is not in effect and one refused control never blocks
the others. Any other exception is a bug and propagates.

A notebook displays the lab (``lab`` as a cell's last line, or ``display(lab)``), then drives it
from code (``lab.slider.value = 3``, ``lab.step()``) and calls `Lab.show` to record the resulting
state as plain HTML (and PNG) outputs, which read well without a running kernel.

    class CounterLab(Lab):
        def __init__(self):
            self.state = Counter()
            self.step_button = widgets.Button(description="step")
            super().__init__([self.on_click(self.step_button, self.state.step)])

        def step(self):               # the same action, from code
            self.step_button.click()

        def render(self):
            return f"<p>count = {self.state.count}</p>"
"""
from __future__ import annotations

import html
import io
from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

import ipywidgets as widgets

ERROR_STYLE = ("color:#a40000;background:#fff0f0;border:1px solid #e0b4b4;border-radius:4px;"
               "padding:4px 8px;margin:4px 0")


# the style of a control whose description must show whole ("gpu_memory_utilization" would be cut to
# "gpu_memo..." at ipywidgets' default width), and keyword arguments for such a control, wide enough
WHOLE_DESCRIPTION = {"description_width": "initial"}
WIDE = {"style": WHOLE_DESCRIPTION, "layout": {"width": "320px"}}


class LabError(ValueError):
    """A setting the lab cannot show (for example more blocks than the cache has): its message is
    displayed inside the widget."""


# tables inside a widget get none of JupyterLab's output styles: without their own padding and
# borders their header cells run together
TABLE_STYLE = "border-collapse:collapse;margin:4px 0"
CELL_STYLE = "padding:2px 8px;border:1px solid #ccc"


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A table whose cells are padded and ruled wherever it is shown (a widget's HTML or an output).
    ``header`` and the cells are HTML (escape text first); a cell may be any value, shown by ``str``."""
    th = "".join(f'<th style="{CELL_STYLE}">{h}</th>' for h in header)
    body = "".join("<tr>" + "".join(f'<td style="{CELL_STYLE}">{c}</td>' for c in row) + "</tr>" for row in rows)
    return f'<table style="{TABLE_STYLE}"><tr>{th}</tr>{body}</table>'


def error_html(message: str) -> str:
    """The error box's HTML: the message, escaped, with no traceback."""
    return f'<div class="minivllm-lab-error" style="{ERROR_STYLE}">&#9888; {html.escape(message)}</div>'


def figure_png(fig, dpi: int = 100) -> bytes:
    """PNG bytes of a matplotlib figure. Build figures with ``matplotlib.figure.Figure`` (not
    ``pyplot``) so nothing is registered with, or shown by, a pyplot backend."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    try:  # a pyplot figure would otherwise stay open (and be shown again by the inline backend)
        import matplotlib.pyplot as plt
        plt.close(fig)
    except Exception:  # pragma: no cover - pyplot unavailable or fig not managed by it
        pass
    return buf.getvalue()


class Lab(ABC):
    """Base class of a chapter's widget. Subclasses build their state and controls, wire each
    control with `on_change` / `on_click`, call ``super().__init__(controls, figure=...)``, and
    implement `render` (and `figure` when ``figure=True``)."""

    _restoring = False  # True while a refused control is put back (its own change is not an action)

    def __init__(self, controls: Sequence[widgets.Widget] | Sequence[Sequence[widgets.Widget]] = (), *,
                 figure: bool = False):
        # one row of controls, or several: a sequence of rows (each a sequence of controls)
        rows = ([list(row) for row in controls] if controls and all(isinstance(c, (list, tuple)) for c in controls)
                else [list(controls)])
        self.controls = [c for row in rows for c in row]
        self.error = widgets.HTML()  # empty unless the last action was rejected
        self.view = widgets.HTML()
        self.image = widgets.Image(format="png") if figure else None
        parts = [widgets.HBox(row) for row in rows if row]
        parts += [self.error, self.view] + ([self.image] if self.image is not None else [])
        self.widget = widgets.VBox(parts)
        # CSS classes naming the parts in the page, where the browser test finds them (tests/test_browser.py)
        for part, name in ((self.widget, "minivllm-lab"), (self.widget, f"minivllm-lab-{type(self).__name__}"),
                           (self.error, "minivllm-lab-message"), (self.view, "minivllm-lab-view")):
            part.add_class(name)
        self.refresh()

    # ---- what a subclass provides -------------------------------------------------------------
    @abstractmethod
    def render(self) -> str:
        """HTML of the current state."""

    def figure(self):
        """A matplotlib ``Figure`` of the current state, or None (only with ``figure=True``)."""
        return None

    # ---- wiring --------------------------------------------------------------------------------
    def on_change(self, control: widgets.Widget, handler: Callable[[Any], None]) -> widgets.Widget:
        """Call ``handler(new_value)`` whenever ``control.value`` changes (in the browser or from
        code), then re-render. A refused value puts the control back to the value in effect, and the
        message says so. Returns the control."""
        def changed(change: dict) -> None:
            if self._restoring or self.apply(handler, change["new"]):
                return
            self.restore(control, change["old"])

        control.observe(changed, names="value")
        return control

    def restore(self, control: widgets.Widget, value: Any) -> None:
        """Put ``control`` back to ``value`` (the value in effect) after a refusal, without acting
        on it again, and add to the message that it did."""
        self.sync(control, value=value)
        name = getattr(control, "description", "") or "the control"
        self.error.value = error_html(f"{self.error_message} ({name} is back at {value!r}, the value in effect)")

    def sync(self, control: widgets.Widget, **attributes: Any) -> None:
        """Set ``control``'s attributes (``value``, ``max``, ``options``) to follow the state, without
        acting on them: for a control that shows what the state already is."""
        self._restoring = True
        try:
            for name, value in attributes.items():
                setattr(control, name, value)
        finally:
            self._restoring = False

    def on_click(self, button: widgets.Button, handler: Callable[[], None]) -> widgets.Button:
        """Call ``handler()`` when the button is clicked (``button.click()`` from code), then
        re-render. Returns the button."""
        button.on_click(lambda _button: self.apply(handler))
        return button

    def apply(self, handler: Callable[..., None], *args) -> bool:
        """Run an action on the state and re-render. A ``ValueError`` becomes the widget's error
        message (the state must not have changed); returns whether the action was accepted."""
        try:
            handler(*args)
        except ValueError as e:
            self.error.value = error_html(str(e))
            return False
        self.refresh()
        return True

    def refresh(self) -> None:
        """Re-render the view (and figure) from the state and clear the error message."""
        try:
            view = self.render()
            png = None
            if self.image is not None:
                fig = self.figure()
                png = figure_png(fig) if fig is not None else b""
        except ValueError as e:
            self.error.value = error_html(str(e))
            return
        self.view.value = view
        if png is not None:
            self.image.value = png
        self.error.value = ""

    # ---- showing -------------------------------------------------------------------------------
    @property
    def error_message(self) -> str:
        """The error currently shown, as plain text ("" when none)."""
        if not self.error.value:
            return ""
        text = self.error.value.split("&#9888; ", 1)[-1].rsplit("</div>", 1)[0]
        return html.unescape(text)

    def snapshot_html(self) -> str:
        """The error message (if any) and the view, as one HTML string."""
        return self.error.value + self.view.value

    def show(self) -> None:
        """Display the current state as static outputs (HTML, then the PNG if any): what an executed
        notebook records after driving the lab from code."""
        from IPython.display import HTML, Image, display

        display(HTML(self.snapshot_html()))
        if self.image is not None and self.image.value:
            display(Image(data=self.image.value, format="png"))

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        # A short text stand-in: the widget's own repr spells out every child's HTML.
        data["text/plain"] = f"{type(self).__name__} (interactive: run this notebook in Jupyter)"
        # What a frontend without the widget's model shows instead (an untrusted notebook, a viewer,
        # an output whose model `minivllm.lab.saved_widgets` found gone): the view as it was displayed
        parts = "controls and figure" if self.image is not None else "controls"
        data["text/html"] = (f'<div class="minivllm-lab-saved">{self.snapshot_html()}<p style="color:#606060">'
                             f"<i>{type(self).__name__} as it was displayed: run this cell for the interactive "
                             f"lab (its {parts}).</i></p></div>")
        return bundle
