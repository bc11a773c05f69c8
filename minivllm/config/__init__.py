"""The engine's configuration, in vLLM's parts: `model.ModelConfig` (the checkpoint's config.json),
`cache.CacheConfig`, `scheduler.SchedulerConfig`, `parallel.ParallelConfig` and
`speculative.SpeculativeConfig`, composed into `engine.EngineConfig` (everything `LLM(model, **kwargs)`
takes; `parts` routes those flat arguments). Only `engine` imports torch: the simulator reuses the
others without it, and ``from minivllm.config import EngineConfig`` loads it on first use.
"""
from minivllm._lazy import lazy_attributes

_HOMES = {"EngineConfig": "minivllm.config.engine", "resolve_dtype": "minivllm.config.engine",
          "CacheConfig": "minivllm.config.cache", "SchedulerConfig": "minivllm.config.scheduler",
          "ParallelConfig": "minivllm.config.parallel", "ModelConfig": "minivllm.config.model",
          "SpeculativeConfig": "minivllm.config.speculative"}
__getattr__, __dir__ = lazy_attributes(__name__, _HOMES)
__all__ = list(_HOMES)
