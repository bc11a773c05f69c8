"""The engine loop: schedule, run the model, apply stops, record the step."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from functools import reduce
from typing import Union

from minivllm.config.engine import EngineConfig
from minivllm.config.model import ModelConfig
from minivllm.core.block_manager import BlockManager
from minivllm.core.records import PositionLogprobs, SpecDecodeMetrics, StepLogprobs
from minivllm.core.scheduler import SchedulerOutput
from minivllm.core.sequence import Sequence, check_request_fits
from minivllm.core.step import run_step
from minivllm.core.trace import StepRecord, StepRecorder
from minivllm.engine.detokenizer import IncrementalDetokenizer
from minivllm.executor.base import Executor, make_executor
from minivllm.models.loader import resolve_model_folder
from minivllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from minivllm.sampling_params import RequestOutputKind, SamplingParams
from minivllm.spec_decode.decoder import SpeculativeDecoder
from minivllm.structured_output import StructuredOutputManager

logger = logging.getLogger("minivllm")

PromptType = Union[str, dict]


def final_only_requests(prompts: PromptType | list[PromptType],
                        sampling_params: SamplingParams | list[SamplingParams] | None) -> list[tuple]:
    """An offline ``generate``'s arguments (`LLM`'s, `DisaggregatedLLM`'s) as one ``(prompt, params)``
    pair per prompt, each request asking for one output, when it has finished (a streaming server
    asks for deltas instead). ValueError if the shapes do not match; the engine checks the rest."""
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts={prompts!r} must be a str, a prompt dict, or a non-empty list of them")
    if sampling_params is None:
        sampling_params = SamplingParams()
    params = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
              else list(sampling_params))
    if len(params) != len(prompts):
        raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
    params = [p if not isinstance(p, SamplingParams) or p.output_kind is RequestOutputKind.FINAL_ONLY
              else replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params]
    return list(zip(prompts, params))


class LLMEngine:
    """Requests in, one scheduled step at a time. ``trace`` holds a `StepRecord` per step."""

    def __init__(self, config: EngineConfig, dp_rank: int = 0):
        from transformers import AutoTokenizer  # tokenizer only; the model is minivllm's own

        self.config = config
        self.detokenizer_class = config.detokenizer_class or IncrementalDetokenizer
        if not (isinstance(self.detokenizer_class, type) and issubclass(self.detokenizer_class, IncrementalDetokenizer)):
            raise ValueError(f"detokenizer_class={config.detokenizer_class!r} must be a subclass of "
                             "minivllm.engine.detokenizer.IncrementalDetokenizer")
        folder = resolve_model_folder(config.model)
        self.model_config = mc = ModelConfig.from_folder(folder)
        self.max_model_len = config.scheduler_config.resolve_max_model_len(mc.max_position_embeddings)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.eos_token_ids = set(mc.eos_token_ids) or (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        # the model here, or one worker process per rank (tensor/pipeline parallel)
        self.executor: Executor = make_executor(config, mc, folder, self.max_model_len, dp_rank)
        cache, spec = config.cache_config, config.speculative_config
        if config.block_manager_class is BlockManager:  # the stock one: prefix_caching picks hash or radix
            self.block_manager = cache.make_block_manager(self.executor.num_blocks)
        else:  # a learner's own (exercise 02) wins
            self.block_manager = config.block_manager_class(self.executor.num_blocks, cache.block_size,
                                                            cache.enable_prefix_caching)
        self.scheduler = config.scheduler_config.make_scheduler(
            self.block_manager, self.max_model_len, spec.num_speculative_tokens if spec else 0)
        # speculative decoding: guess tokens ahead and verify them in the target's one forward pass
        self.spec_decoder = SpeculativeDecoder(spec, config, mc, self.executor, self.block_manager,
                                               self.max_model_len) if spec else None
        self.requests: dict[str, Sequence] = {}  # by the id of each sample (``i_id`` when n > 1)
        self.parents: dict[str, list[Sequence]] = {}  # the samples of each request with n > 1, by its id
        self.streams: dict[str, SampleStream] = {}  # each sample's text, until its request's last output
        self._stepped: dict[Sequence, None] = {}  # the samples _check_stop saw a token of this step, in order
        self._structured_output: StructuredOutputManager | None = None
        self.trace: list[StepRecord] = []  # every step's record (a server keeps only the last ones)
        self.num_steps = 0
        self.recorder = StepRecorder()  # writes self.trace's records
        tokens = self.executor.num_blocks * cache.block_size
        logger.info("KV cache: %d blocks of %d tokens = %d tokens; maximum concurrency at "
                    "max_model_len=%d: %.2fx", self.executor.num_blocks, cache.block_size, tokens,
                    self.max_model_len, tokens / self.max_model_len)

    @property
    def structured_output(self) -> StructuredOutputManager:
        """The grammars, made when the first constrained request comes (xgrammar is slow to import)."""
        if self._structured_output is None:
            self._structured_output = StructuredOutputManager(self.tokenizer, self.model_config.vocab_size,
                                                              sorted(self.eos_token_ids))
        return self._structured_output

    # ---- requests ----------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt: PromptType, params: SamplingParams) -> list[Sequence]:
        """Validate one request and turn it into a `Sequence` per sample (``params.n`` of them);
        raises ValueError, changes nothing."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params={params!r} must be a SamplingParams")
        if request_id in self.requests or request_id in self.parents:
            raise ValueError(f"request_id={request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        if not token_ids:
            raise ValueError(f"prompt={prompt!r} is empty: a request needs at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids contain {bad[:3]!r}, outside the vocabulary [0, {vocab})")
        for name, value in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or {})):
            outside = [t for t in value if t >= vocab]
            if outside:
                raise ValueError(f"{name}={value!r} holds {outside[:3]!r}, outside the vocabulary [0, {vocab})")
        if params.prompt_logprobs is not None and self.spec_decoder is not None:
            raise ValueError(f"prompt_logprobs={params.prompt_logprobs!r} is not supported with speculative decoding")
        if params.structured_outputs is not None:
            self.structured_output.compile(params.structured_outputs)
        bm = self.block_manager
        check_request_fits(len(token_ids), params.max_tokens, max_model_len=self.max_model_len,
                           block_size=bm.block_size, num_blocks=bm.num_blocks)
        rules = dict(min_tokens_stop_ids=tuple(params.stop_token_ids) + (
                         () if params.ignore_eos else tuple(sorted(self.eos_token_ids))),
                     bad_words_token_ids=self._bad_words_token_ids(params.bad_words))
        now = time.time()
        if params.n == 1:
            return [Sequence(request_id, token_ids, params, arrival_time=now, prompt=text, **rules)]
        # parallel sampling: n requests of one prompt, which share its full blocks through the prefix
        # cache; sample i draws with seed + i, and only sample 0 reports the prompt's logprobs
        return [Sequence(f"{i}_{request_id}", token_ids,
                         replace(params, n=1, seed=None if params.seed is None else params.seed + i,
                                 prompt_logprobs=params.prompt_logprobs if i == 0 else None),
                         arrival_time=now, prompt=text, parent_id=request_id, sample_index=i, **rules)
                for i in range(params.n)]

    def _bad_words_token_ids(self, bad_words: list[str]) -> tuple[tuple[int, ...], ...]:
        """Each bad word as tokens, alone and after a space (byte-level tokenizers spell them apart)."""
        variants = []
        for word in bad_words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
                if ids and ids not in variants:
                    variants.append(ids)
        return tuple(variants)

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
        self.add_sequences(self.make_request(str(request_id), prompt, sampling_params or SamplingParams()))

    def add_sequences(self, seqs: list[Sequence]) -> None:
        """Queue the samples of one request (from `make_request`)."""
        if seqs[0].parent_id is not None:
            self.parents[seqs[0].parent_id] = seqs
        for seq in seqs:
            self._track(seq)
            self.scheduler.add(seq)

    def _track(self, seq: Sequence) -> None:
        """The engine's own state of a new sample: its detokenizer, its grammar, its entry."""
        p = seq.sampling_params
        self.streams[seq.request_id] = SampleStream(self.detokenizer_class(
            self.tokenizer, skip_special_tokens=p.skip_special_tokens, stop=p.stop,
            include_stop_str_in_output=p.include_stop_str_in_output))
        if p.structured_outputs is not None:
            self.structured_output.add(seq.request_id, p.structured_outputs)
        self.requests[seq.request_id] = seq

    def add_prefilled_request(self, seq: Sequence, cached_blocks: list[int]) -> None:
        """Disaggregated prefill (`minivllm.disagg`), the decode side: start a request (one sample, from
        `make_request`) whose prompt another instance prefilled and whose first token it sampled, which
        ``seq`` already ends with. It decodes from the next step on: its prompt's K/V goes into the
        blocks allocated here after the local prefix-cache hits ``cached_blocks``, which the KV
        connector fills before that step."""
        self._track(seq)
        self.scheduler.receive_transferred(seq, cached_blocks, seq.num_prompt_tokens)
        self.scheduler.start_transferred(seq)  # the connector fills its blocks before the next step
        if self._check_stop(seq, seq.token_ids[-1]):  # its text, grammar and stops, as a step takes a token
            raise ValueError(f"request {seq.request_id!r} finished with its first token ({seq.finish_reason}): "
                             "the prefill instance should have ended it")

    def abort_request(self, request_id: str | list[str]) -> list[RequestOutput]:
        """Stop requests wherever they are (every sample of one with ``n`` > 1); each comes back
        finished, with ``finish_reason="abort"`` on the samples that had not finished."""
        ids = [request_id] if isinstance(request_id, str) else request_id
        aborted = []
        for rid in ids:
            for seq in self.parents.get(rid) or [self.requests.get(rid)]:
                if seq is not None and seq.request_id in self.requests:
                    self.scheduler.finish(seq, "abort")
                    self._release(seq)
                    aborted.append(seq)  # the next step's record lists it (Scheduler.take_finished)
        return self._outputs(aborted)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration. Returns the requests that finished in it (all ``n`` samples), and, for
        requests whose ``output_kind`` is DELTA or CUMULATIVE, an unfinished output each time one of
        their samples got a token."""
        self._stepped = {}
        record, finished = run_step(self.scheduler, self._execute, time.time,
                                    self._check_stop, self.num_steps, self.recorder)
        self.num_steps += 1
        if record.chunks:
            if self.executor.last_comm:  # worker processes: their collectives in this step
                record = replace(record, comm=self.executor.last_comm)
            self._keep_logprobs((self.spec_decoder or self.executor).last_logprobs)
        self.trace.append(record)
        for seq in finished:
            self._release(seq)
        return self._outputs(list(self._stepped))

    def _execute(self, out: SchedulerOutput) -> dict[Sequence, int | list[int]]:
        grammars = self._structured_output
        masks = grammars.attach_masks if grammars is not None and grammars.matchers else None
        if out.kv_copies:  # the radix cache's copy-on-write, before anything of this step is written
            self.executor.copy_kv(out.kv_copies)
        if self.spec_decoder is not None:
            return self.spec_decoder.execute(out, masks)
        if masks is not None:
            masks(out)
        return self.executor.execute(out)

    def _keep_logprobs(self, step_logprobs: dict[str, StepLogprobs]) -> None:
        for request_id, lp in step_logprobs.items():
            seq = self.requests.get(request_id)
            if seq is None:
                continue
            if lp.sampled:  # a stop may have dropped emitted tokens after it (speculative decoding)
                seq.logprobs += lp.sampled
                del seq.logprobs[seq.num_output_tokens:]
            for position, report in lp.prompt:
                if position == len(seq.prompt_logprobs):  # a recompute after preemption reports them again
                    seq.prompt_logprobs.append(report)

    def close(self) -> None:
        """Free the model; with worker processes, shut them down."""
        self.executor.close()

    def _check_stop(self, seq: Sequence, token: int) -> bool:
        """Take the request's newest token: grow its text, then apply its stop conditions; sets
        ``finish_reason``. Before ``min_tokens`` only the length limits apply (EOS and stop tokens are
        masked until then, and a stop string counts only where it ends after those tokens' text)."""
        self._stepped[seq] = None
        p, detok = seq.sampling_params, self.streams[seq.request_id].detokenizer
        new_text = detok.add(token)
        if seq.num_output_tokens == p.min_tokens:
            detok.stop_search_from = len(detok.text)
        grammar_done = (self.structured_output.accept(seq.request_id, token)
                        if p.structured_outputs is not None else False)
        if seq.num_output_tokens >= p.min_tokens:
            if token in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            elif not p.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason = "stop"
            elif p.stop and (stop := detok.find_stop(len(new_text))) is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop
        if seq.finish_reason is None:
            if grammar_done:  # the language is complete and its end taken (even with ignore_eos)
                seq.finish_reason = "stop"
            elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
        return seq.finish_reason is not None

    def _release(self, seq: Sequence) -> None:
        """A finished sample gives back its per-request state (its blocks went with `Scheduler.finish`);
        unless a stop string cut its text, the text takes in what was held back."""
        if not isinstance(seq.stop_reason, str):
            self.streams[seq.request_id].detokenizer.flush()
        self.requests.pop(seq.request_id, None)
        self.executor.release(seq.request_id)
        if self._structured_output is not None:
            self._structured_output.release(seq.request_id)
        if self.spec_decoder is not None:
            self.spec_decoder.release(seq.request_id)
        seq.finished_time = time.time()

    # ---- outputs -------------------------------------------------------------------------------
    def _outputs(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """The outputs owed for ``seqs`` (samples that got a token or ended), one per request, by
        each request's ``output_kind``."""
        by_request: dict[str, list[Sequence]] = {}
        for seq in seqs:
            by_request.setdefault(seq.parent_id or seq.request_id, []).append(seq)
        outputs = []
        for request_id, touched in by_request.items():
            samples = self.parents[request_id] if touched[0].parent_id is not None else touched
            finished = all(s.finish_reason is not None for s in samples)
            kind = samples[0].sampling_params.output_kind
            if kind is RequestOutputKind.FINAL_ONLY and not finished:
                continue
            shown = touched if kind is RequestOutputKind.DELTA else samples
            outputs.append(self._request_output(request_id, samples, shown, finished))
            if finished:
                self.parents.pop(request_id, None)
                for s in samples:
                    del self.streams[s.request_id]
        return outputs

    def _request_output(self, request_id: str, samples: list[Sequence], shown: list[Sequence],
                        finished: bool) -> RequestOutput:
        first = samples[0]
        metrics = RequestMetrics(
            first.arrival_time, _earliest(s.first_scheduled_time for s in samples),
            _earliest(s.first_token_time for s in samples),
            max(s.finished_time for s in samples) if finished else None,
            sum(s.num_cached_tokens or 0 for s in samples), sum(s.num_preemptions for s in samples),
            reduce(SpecDecodeMetrics.merge, (s.spec_metrics for s in samples)) if self.spec_decoder is not None else None)
        prompt_logprobs = (self._with_text(first.prompt_logprobs)
                           if first.prompt_logprobs is not None and finished else None)
        return RequestOutput(request_id, first.prompt, list(first.prompt_token_ids),
                             [self._completion(s) for s in shown], finished=finished, metrics=metrics,
                             prompt_logprobs=prompt_logprobs)

    def _completion(self, seq: Sequence) -> CompletionOutput:
        """The sample's output so far (all of it, or with DELTA what is new since the last one); its
        text stops short of what may still be the start of a stop string until it finishes."""
        stream, finished = self.streams[seq.request_id], seq.finish_reason is not None
        text_end = stream.detokenizer.streamable_text_len(finished)
        start_text, start_token = 0, 0
        if seq.sampling_params.output_kind is RequestOutputKind.DELTA:
            start_text, start_token = stream.sent_text, stream.sent_tokens
            stream.sent_text, stream.sent_tokens = text_end, seq.num_output_tokens
        token_ids = seq.output_token_ids[start_token:]
        logprobs = cumulative = None
        if seq.logprobs is not None:
            logprobs = self._with_text(seq.logprobs[start_token:])
            cumulative = sum(report[t].logprob for report, t in zip(seq.logprobs, seq.output_token_ids))
        return CompletionOutput(seq.sample_index, stream.detokenizer.text[start_text:text_end], token_ids,
                                seq.finish_reason, seq.stop_reason, cumulative, logprobs)

    def _with_text(self, reports: list[PositionLogprobs | None]) -> list[PositionLogprobs | None]:
        """The reports with each token's text filled in (``Logprob.decoded_token``)."""
        return [None if r is None else {t: replace(lp, decoded_token=self.tokenizer.decode([t]))
                                        for t, lp in r.items()} for r in reports]


@dataclass
class SampleStream:
    """One sample's text as it grows, and (DELTA outputs) how much of it has been handed out."""

    detokenizer: IncrementalDetokenizer
    sent_text: int = 0
    sent_tokens: int = 0


def _earliest(times) -> float | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None
