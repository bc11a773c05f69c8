"""How minivllm is served: an OpenAI-compatible HTTP server (`minivllm serve`) on `AsyncLLM`."""
