"""The course's interactive labs: one module per chapter's widget, all built on `minivllm.lab.base`.

Every lab keeps its state in a plain object (testable with pytest, no browser), shows it through
ipywidgets whose callbacks only update widget attributes (they never print), shows impossible
settings as a message inside the widget, and offers methods a notebook calls from code so the
executed notebook records a meaningful state.

| chapter | lab |
|---|---|
| 00 | `KVMemoryLab`: KV-cache memory of real models on real GPUs |
| 01 | `EngineStepperLab`: step a real `LLMEngine` |
| 02, 03 | `CinemaLab`: the real BlockManager's blocks, replayed from the trace |
| 04 | `BatchingLab`: static vs continuous batching in the simulator |
| 05 | `ChunkingLab`: token budget and KV memory vs latency in the simulator |
| 06 | `AttentionRooflineLab`: bytes, FLOPs and the roofline of paged attention |
| 07 | `SpecDecodeLab`: each step's drafts, accepted or rejected, on a real run |
| 08 | `ParallelLab`: plan TP/PP/DP/EP/CP layouts with the planner |
"""
from minivllm.lab.base import Lab, LabError, error_html, figure_png
from minivllm.lab.batching import BatchingLab
from minivllm.lab.chunking import ChunkingLab
from minivllm.lab.cinema import CinemaLab
from minivllm.lab.engine_stepper import EngineStepper, EngineStepperLab
from minivllm.lab.kv_memory import KVMemoryLab, KVMemoryPlan
from minivllm.lab.parallel import ParallelLab
from minivllm.lab.roofline import AttentionRooflineLab
from minivllm.lab.spec import SpecDecodeLab, SpecRun

__all__ = ["Lab", "LabError", "error_html", "figure_png", "AttentionRooflineLab", "BatchingLab", "ChunkingLab",
           "CinemaLab", "EngineStepper", "EngineStepperLab", "KVMemoryLab", "KVMemoryPlan",
           "ParallelLab", "SpecDecodeLab", "SpecRun"]
