"""minivllm: a compact LLM inference engine with vLLM's offline API."""
from minivllm.engine.llm_engine import LLMEngine
from minivllm.llm import LLM
from minivllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from minivllm.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics"]
__version__ = "0.1.0"
