"""The course's interactive labs: one module per chapter's widget, all built on `minivllm.lab.base`.

Every lab keeps its state in a plain object (testable with pytest, no browser), shows it through
ipywidgets whose callbacks only update widget attributes (they never print), shows impossible
settings as a message inside the widget, and offers methods a notebook calls from code so the
executed notebook records a meaningful state.
"""
from minivllm.lab.base import Lab, LabError, error_html, figure_png
from minivllm.lab.engine_stepper import EngineStepper, EngineStepperLab

__all__ = ["Lab", "LabError", "error_html", "figure_png", "EngineStepper", "EngineStepperLab"]
