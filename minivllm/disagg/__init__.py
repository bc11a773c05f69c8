"""Disaggregated prefill/decode: a prefill instance and a decode instance, each an `LLMEngine` in its
own process, joined by a KV connector modelled on vLLM's.

* `scheduler_side`: what to send and receive, for which request and blocks (pure Python);
* `worker_side`: moving the K/V between the paged caches, layer by layer (torch.distributed);
* `instance`: the loop each instance's process runs;
* `llm`: `DisaggregatedLLM`, the front end (``generate`` like `LLM`'s);
* `records`: `KVTransfer`, one per request whose K/V moved (pure Python);
* `config`: the pair's checks, made before any process starts.

``import minivllm.disagg`` is light: torch loads when `DisaggregatedLLM` is first touched, so the
scheduler side and the records import without it.
"""
from minivllm._lazy import lazy_attributes

_HOMES = {"DisaggregatedLLM": "minivllm.disagg.llm", "DisaggregatedOutputs": "minivllm.disagg.llm",
          "InstanceError": "minivllm.disagg.llm", "KVTransfer": "minivllm.disagg.records",
          "kv_bytes_per_token": "minivllm.disagg.records"}
__getattr__, __dir__ = lazy_attributes(__name__, _HOMES)
__all__ = list(_HOMES)
