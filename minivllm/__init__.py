"""minivllm: a compact LLM inference engine with vLLM's offline API.

``import minivllm`` is light: the engine (and torch) load when `LLM` or `LLMEngine` is first touched,
so the torch-free core and the simulator (`minivllm.core`, `minivllm.sim`) import without them.
"""
from minivllm._lazy import lazy_attributes

_HOMES = {"LLM": "minivllm.llm", "LLMEngine": "minivllm.engine.llm_engine",
          "SamplingParams": "minivllm.sampling_params", "StructuredOutputsParams": "minivllm.sampling_params",
          "RequestOutput": "minivllm.outputs",
          "CompletionOutput": "minivllm.outputs", "RequestMetrics": "minivllm.outputs"}
__getattr__, __dir__ = lazy_attributes(__name__, _HOMES)
__all__ = list(_HOMES)
__version__ = "0.1.0"
