"""The engine that wires the layers together: `llm_engine.LLMEngine` (the core's scheduler, an
executor, speculative decoding, stop conditions, the trace) and `data_parallel` (replicas of it
behind a router)."""
