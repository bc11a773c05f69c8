"""A lab's state over the simulator, shared by the batching (chapter 04) and chunking (chapter 05) labs."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from minivllm.lab.base import LabError


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
