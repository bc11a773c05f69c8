"""`LLM`: the offline API, shaped like vLLM's."""
from __future__ import annotations

import itertools
import logging
import time
from typing import Sequence as Seq

from tqdm.auto import tqdm

from minivllm.config.engine import EngineConfig
from minivllm.engine.data_parallel import DataParallelEngine
from minivllm.engine.llm_engine import LLMEngine, PromptType, final_only_requests
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams

logger = logging.getLogger("minivllm")
if not logger.handlers:  # like vLLM, say what the engine decided (cache size) unless told otherwise
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s minivllm: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)


class LLM:
    """Load a model folder (or hub id) and generate for batches of prompts.

    >>> llm = LLM("path/to/Qwen3-0.6B")
    >>> out = llm.generate(["def fib(n):"], SamplingParams(temperature=0, max_tokens=32))
    >>> out[0].outputs[0].text
    """

    def __init__(self, model: str, **engine_args):
        """``engine_args`` are vLLM's flat engine arguments, routed to `EngineConfig`'s parts
        (`minivllm.config`): ``dtype``, ``device``, ``seed``, ``attention_backend`` and a learner's pieces
        (``sampler``, ``block_manager_class``, ``rejection_sampler``, ``row_parallel_linear_class``,
        ``detokenizer_class``);
        ``block_size``, ``enable_prefix_caching``, ``prefix_caching`` (``"hash"`` or ``"radix"``),
        ``gpu_memory_utilization``, ``kv_cache_memory``,
        ``num_kv_blocks`` (cache); ``max_num_seqs``, ``max_num_batched_tokens``, ``max_model_len``,
        ``enable_chunked_prefill``, ``batching_policy`` (scheduler); the parallel sizes,
        ``enable_expert_parallel``, ``distributed_backend`` (parallel); ``speculative_config``."""
        config = EngineConfig.from_args(model, **engine_args)
        dp = config.parallel_config.data_parallel_size
        self.llm_engine = DataParallelEngine(config) if dp > 1 else LLMEngine(config)
        self._request_counter = itertools.count()

    def close(self) -> None:
        """Free the model now; with worker processes (any parallel size above 1), shut them down.
        Also done when the `LLM` is garbage-collected, or on leaving ``with LLM(...) as llm:``."""
        self.llm_engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order. All prompts are checked
        before any work starts, so a bad one raises ValueError and leaves the engine untouched."""
        pairs = final_only_requests(prompts, sampling_params)
        engine = self.llm_engine
        ids = [str(next(self._request_counter)) for _ in pairs]
        requests = [engine.make_request(rid, p, sp) for rid, (p, sp) in zip(ids, pairs)]
        for seqs in requests:
            engine.add_sequences(seqs)
        outputs: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        start, out_tokens = time.perf_counter(), 0
        try:
            while len(outputs) < len(ids):
                for out in engine.step():
                    outputs[out.request_id] = out
                    out_tokens += sum(len(c.token_ids) for c in out.outputs)
                    bar.update(1)
                    bar.set_postfix_str(f"output {out_tokens / (time.perf_counter() - start):.1f} tok/s")
        except BaseException:
            engine.abort_request([rid for rid in ids if rid not in outputs])
            raise
        finally:
            bar.close()
        return [outputs[rid] for rid in ids]

    def chat(self, messages: list[dict] | Seq[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate a reply to a conversation (a list of ``{"role", "content"}`` messages) or to each of
        a list of them, through the tokenizer's chat template (or ``chat_template``), as vLLM's does."""
        conversations = [messages] if messages and isinstance(messages, list) and isinstance(messages[0], dict) \
            else messages
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise ValueError(f"messages={messages!r} must be a conversation (a list of message dicts) or a "
                             "non-empty list of them")
        prompts = [chat_prompt(self.get_tokenizer(), conv, chat_template, add_generation_prompt, f"messages[{i}]")
                   for i, conv in enumerate(conversations)]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def chat_prompt(tokenizer, conversation: list[dict], chat_template: str | None = None,
                add_generation_prompt: bool = True, field: str = "messages") -> dict:
    """One conversation (``{"role", "content"}`` messages) through the chat template (the tokenizer's,
    or ``chat_template``): the prompt text and its token ids. ValueError naming ``field`` if it is
    not a conversation, or if there is no template."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template=None, and the model's tokenizer has none: pass one")
    if not isinstance(conversation, (list, tuple)) or not conversation or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in conversation):
        raise ValueError(f"{field}={conversation!r} must be a non-empty list of {{'role': str, 'content': str}}")
    text = tokenizer.apply_chat_template(list(conversation), chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    # the template already wrote any special tokens the model expects at the start
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
