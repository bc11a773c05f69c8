"""The course's interactive labs: one module per chapter's widget, all built on `minivllm.lab.base`.

Every lab keeps its state in a plain object (testable with pytest, no browser), shows it through
ipywidgets whose callbacks only update widget attributes (they never print), shows impossible
settings as a message inside the widget, and offers methods a notebook calls from code so the
executed notebook records a meaningful state.

Each lab loads on first use (`minivllm.lab.BatchingLab` imports `minivllm.lab.batching` only): the
simulator's labs and the Cinema need no torch.

| chapter | lab |
|---|---|
| 00 | `KVMemoryLab`: KV-cache memory of real models on real GPUs |
| 01 | `EngineStepperLab`: step a real `LLMEngine` |
| 02, 03 | `CinemaLab`: the real BlockManager's blocks, replayed from the trace; `LiveCinemaLab`: the same on a live engine the learner feeds and steps |
| 04 | `BatchingLab`: static vs continuous batching in the simulator |
| 05 | `ChunkingLab`: token budget and KV memory vs latency in the simulator |
| 06 | `AttentionRooflineLab`: bytes, FLOPs and the roofline of paged attention |
| 07 | `SpecDecodeLab`: each step's drafts, accepted or rejected, on a real run |
| 08 | `ParallelLab`: plan TP/PP/DP/EP/CP layouts with the planner |
| 09 | `TuningLab`: every deployment knob in the simulator; goodput, cost, the binding constraint, the frontier |
| 10 | `DisaggLab`: prefill/decode pools and the KV link against colocated GPUs; goodput, TTFT/ITL, the verdict |
| 11 | `ServingLab`: a live benchmark against a real OpenAI-compatible server |
| 12 | `LandscapeLab`: engines filtered by need from the sourced landscape table |
| every | `SelfCheck`: the chapter's closing questions, each explained on answering (`Question`) |
"""
from minivllm._lazy import lazy_attributes

_MODULES = {"Lab": "base", "LabError": "base", "error_html": "base", "figure_png": "base",
            "AttentionRooflineLab": "roofline", "BatchingLab": "batching", "ChunkingLab": "chunking",
            "CinemaLab": "cinema", "LiveCinemaLab": "cinema", "DisaggLab": "disagg", "DisaggSettings": "disagg",
            "EngineStepper": "engine_stepper", "EngineStepperLab": "engine_stepper",
            "KVMemoryLab": "kv_memory", "KVMemoryPlan": "kv_memory", "LandscapeLab": "landscape",
            "ParallelLab": "parallel", "Question": "self_check", "SelfCheck": "self_check",
            "SpecDecodeLab": "spec", "SpecRun": "spec",
            "ServingBench": "serving", "ServingLab": "serving",
            "ServingSettings": "serving", "TuningLab": "tuning", "TuningSettings": "tuning"}
__getattr__, __dir__ = lazy_attributes(__name__, {name: f"minivllm.lab.{m}" for name, m in _MODULES.items()})
__all__ = list(_MODULES)
