"""A lab's state over the simulator, shared by the batching (chapter 04), chunking (chapter 05), tuning
(chapter 09) and disaggregation (chapter 10) labs; and what the last two share: settings judged by an
SLO, a simulation reused while only the judging changes, and one control per setting."""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Callable

import ipywidgets as widgets

from minivllm.lab.base import WIDE, Lab, LabError
from minivllm.sim.evaluation import PercentileSLO


class SimExperiment:
    """A lab's state over the simulator: the current settings and their simulated run
    (``simulate(settings)``, whose result keeps its ``settings``). A change the simulator refuses
    leaves both and becomes the widget's message."""

    def __init__(self, simulate: Callable, settings):
        self.simulate = simulate
        self.run = simulate(settings)

    @property
    def settings(self):
        return self.run.settings

    def update(self, **changes) -> None:
        try:
            self.run = self.simulate(replace(self.settings, **changes))
        except ValueError as e:  # the simulator's own refusal, shown in the widget
            raise LabError(str(e)) from None


class SLOSettings:
    """For a settings dataclass with ``ttft_slo_ms``, ``tpot_slo_ms`` and ``slo_percentile`` fields."""

    @property
    def slo(self) -> PercentileSLO:
        return PercentileSLO(ttft=self.ttft_slo_ms / 1e3, tpot=self.tpot_slo_ms / 1e3, percentile=self.slo_percentile)


def unjudged(settings, judging: tuple[str, ...]):
    """``settings`` with the fields named in ``judging`` (those that only judge a run) at their
    defaults: the key under which a lab caches its simulation, so changing them runs nothing again."""
    return replace(settings, **{f.name: f.default for f in fields(settings) if f.name in judging})


def slo_controls(settings: SLOSettings) -> tuple[widgets.Widget, widgets.Widget, widgets.Widget]:
    """The TTFT target, TPOT target and SLO percentile controls, at ``settings``' values."""
    return (widgets.FloatLogSlider(value=settings.ttft_slo_ms, base=10, min=1, max=5, step=0.1,
                                   description="TTFT target (ms)", **WIDE),
            widgets.FloatLogSlider(value=settings.tpot_slo_ms, base=10, min=0, max=3, step=0.1,
                                   description="TPOT target (ms)", **WIDE),
            widgets.Dropdown(options=[50.0, 90.0, 95.0, 99.0], value=settings.slo_percentile,
                             description="SLO percentile", **WIDE))


def knob_grid(controls: list[widgets.Widget]) -> widgets.Box:
    return widgets.GridBox(controls, layout=widgets.Layout(grid_template_columns="repeat(3, 330px)"))


class SettingsLab(Lab):
    """A lab over a `SimExperiment` whose controls are its settings: ``self.knobs`` maps a setting's
    name to its control. A subclass builds ``self.state`` and ``self.knobs``, then calls
    ``super().__init__(figure=...)``."""

    def __init__(self, *, figure: bool = False):
        for name, w in self.knobs.items():
            self.on_change(w, lambda v, name=name: self._update(**{name: v}))
        super().__init__(list(self.knobs.values()), figure=figure)

    def set(self, **changes) -> bool:
        """Apply several settings at once from code (one simulation), as the controls do: a refused
        setting shows its message and changes nothing. Returns whether it was accepted."""
        return self.apply(lambda: self._update(**changes))

    def _update(self, **changes) -> None:
        """Apply ``changes`` to the settings; a refused setting raises `LabError` and changes nothing."""
        self.state.update(**changes)
        self._sync_controls()

    def shown(self, name: str):
        """The value the control of setting ``name`` shows for the settings in effect."""
        return getattr(self.state.settings, name)

    def _sync_controls(self) -> None:
        """Show the settings in effect on every control without acting on them again."""
        for name, w in self.knobs.items():
            value = self.shown(name)
            if w.value != value:
                self.sync(w, value=value)
