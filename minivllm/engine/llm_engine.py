"""The engine loop: schedule, run the model, apply stops, record the step."""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Union

from minivllm.config.engine import EngineConfig
from minivllm.config.model import ModelConfig
from minivllm.core.sequence import Sequence, check_request_fits
from minivllm.core.step import run_step
from minivllm.core.trace import StepRecord, StepRecorder
from minivllm.executor.base import Executor, make_executor
from minivllm.models.loader import resolve_model_folder
from minivllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from minivllm.sampling_params import SamplingParams
from minivllm.spec_decode.decoder import SpeculativeDecoder

logger = logging.getLogger("minivllm")

PromptType = Union[str, dict]


class LLMEngine:
    """Requests in, one scheduled step at a time. ``trace`` holds a `StepRecord` per step."""

    def __init__(self, config: EngineConfig, dp_rank: int = 0):
        from transformers import AutoTokenizer  # tokenizer only; the model is minivllm's own

        self.config = config
        folder = resolve_model_folder(config.model)
        self.model_config = mc = ModelConfig.from_folder(folder)
        self.max_model_len = config.scheduler_config.resolve_max_model_len(mc.max_position_embeddings)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.eos_token_ids = set(mc.eos_token_ids) or (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        # the model here, or one worker process per rank (tensor/pipeline parallel)
        self.executor: Executor = make_executor(config, mc, folder, self.max_model_len, dp_rank)
        cache, spec = config.cache_config, config.speculative_config
        self.block_manager = config.block_manager_class(self.executor.num_blocks, cache.block_size,
                                                        cache.enable_prefix_caching)
        self.scheduler = config.scheduler_config.make_scheduler(
            self.block_manager, self.max_model_len, spec.num_speculative_tokens if spec else 0)
        # speculative decoding: guess tokens ahead and verify them in the target's one forward pass
        self.spec_decoder = SpeculativeDecoder(spec, config, mc, self.executor, self.block_manager,
                                               self.max_model_len) if spec else None
        self.requests: dict[str, Sequence] = {}
        self.trace: list[StepRecord] = []
        self.recorder = StepRecorder()  # writes self.trace's records
        tokens = self.executor.num_blocks * cache.block_size
        logger.info("KV cache: %d blocks of %d tokens = %d tokens; maximum concurrency at "
                    "max_model_len=%d: %.2fx", self.executor.num_blocks, cache.block_size, tokens,
                    self.max_model_len, tokens / self.max_model_len)

    # ---- requests ----------------------------------------------------------------------------
    def make_sequence(self, request_id: str, prompt: PromptType, params: SamplingParams) -> Sequence:
        """Validate one request and turn it into a `Sequence`; raises ValueError, changes nothing."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params={params!r} must be a SamplingParams")
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        if not token_ids:
            raise ValueError(f"prompt={prompt!r} is empty: a request needs at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids contain {bad[:3]!r}, outside the vocabulary [0, {vocab})")
        bad_stops = [t for t in params.stop_token_ids if t >= vocab]
        if bad_stops:
            raise ValueError(f"stop_token_ids={bad_stops!r} lie outside the vocabulary [0, {vocab})")
        bm = self.block_manager
        check_request_fits(len(token_ids), params.max_tokens, max_model_len=self.max_model_len,
                           block_size=bm.block_size, num_blocks=bm.num_blocks)
        return Sequence(request_id, token_ids, params, arrival_time=time.time(), prompt=text)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)):
                raise ValueError(f"prompt_token_ids={ids!r} must be a list of ints")
            return prompt.get("prompt"), list(ids)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError(f"prompt={prompt!r} must be a str, {{'prompt': str}} or {{'prompt_token_ids': [...]}}")

    def add_request(self, request_id: str, prompt: PromptType, sampling_params: SamplingParams | None = None) -> None:
        self.add_sequence(self.make_sequence(str(request_id), prompt, sampling_params or SamplingParams()))

    def add_sequence(self, seq: Sequence) -> None:
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str | list[str]) -> list[RequestOutput]:
        """Stop requests wherever they are; each comes back with ``finish_reason="abort"``."""
        ids = [request_id] if isinstance(request_id, str) else request_id
        outputs = []
        for rid in ids:
            seq = self.requests.get(rid)
            if seq is not None:
                self.scheduler.finish(seq, "abort")
                outputs.append(self._finish_output(seq))
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; return the requests that finished in it."""
        execute = self.spec_decoder.execute if self.spec_decoder is not None else self.executor.execute
        record, finished = run_step(self.scheduler, execute, time.time,
                                    self._check_stop, len(self.trace), self.recorder)
        if record.chunks and self.executor.last_comm:  # worker processes: their collectives in this step
            record = replace(record, comm=self.executor.last_comm)
        self.trace.append(record)
        return [self._finish_output(seq) for seq in finished]

    def close(self) -> None:
        """Free the model; with worker processes, shut them down."""
        self.executor.close()

    def _check_stop(self, seq: Sequence, token: int) -> bool:
        """Apply the request's stop conditions to its newest token; sets ``finish_reason``."""
        p = seq.sampling_params
        if token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif not p.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif p.stop and (stop := self._find_stop_string(seq)) is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    def _find_stop_string(self, seq: Sequence) -> str | None:
        """The stop string that occurs first in the output text, if any."""
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        found = [(text.find(s), s) for s in seq.sampling_params.stop if s in text]
        return min(found)[1] if found else None

    def _finish_output(self, seq: Sequence) -> RequestOutput:
        self.requests.pop(seq.request_id, None)
        self.executor.release(seq.request_id)
        if self.spec_decoder is not None:
            self.spec_decoder.release(seq.request_id)
        seq.finished_time = time.time()
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        if isinstance(seq.stop_reason, str):
            text = text[:text.find(seq.stop_reason)]  # vLLM leaves the stop string out of the text
        completion = CompletionOutput(0, text, list(seq.output_token_ids), seq.finish_reason, seq.stop_reason)
        metrics = RequestMetrics(seq.arrival_time, seq.first_scheduled_time, seq.first_token_time,
                                 seq.finished_time, seq.num_cached_tokens or 0, seq.num_preemptions,
                                 seq.spec_metrics if self.spec_decoder is not None else None)
        return RequestOutput(seq.request_id, seq.prompt, list(seq.prompt_token_ids), [completion],
                             finished=True, metrics=metrics)
