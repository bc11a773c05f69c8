"""Speculative decoding in the engine's step: propose draft tokens into the slots the scheduler
reserved, verify every request's drafts in one target forward pass, and let the rejection sampler
decide what each request emits. The scheduler then keeps the K/V of the accepted tokens only."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from minivllm.config.engine import EngineConfig
from minivllm.config.model import ModelConfig
from minivllm.config.speculative import SpeculativeConfig
from minivllm.core.block_manager import BlockManagerBase
from minivllm.core.records import StepLogprobs
from minivllm.core.scheduler import ScheduledChunk, SchedulerOutput
from minivllm.core.sequence import Sequence
from minivllm.spec_decode import rejection_sampler
from minivllm.spec_decode.draft_model import DraftModelProposer
from minivllm.spec_decode.ngram import NgramProposer
from minivllm.worker.model_runner import ModelRunner
from minivllm.worker.logits_processors import apply_logits_processors, needs_rules, stack_masks
from minivllm.worker.logprobs import position_logprobs
from minivllm.worker.sampler import Sampler
from minivllm.worker.step_batch import flatten_chunks, row_rules


class SpeculativeDecoder:
    """The engine's ``execute`` when ``speculative_config`` is set (one process only)."""

    def __init__(self, spec: SpeculativeConfig, config: EngineConfig, target_model: ModelConfig,
                 target: ModelRunner, block_manager: BlockManagerBase, max_model_len: int):
        self.target, self.block_manager = target, block_manager
        self.last_logprobs: dict[str, StepLogprobs] = {}  # as the `Executor`'s: the last step's, by request id
        self.verify = config.rejection_sampler or rejection_sampler.rejection_sample
        self.ngram = (NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min)
                      if spec.method == "ngram" else None)
        self.draft = (DraftModelProposer(spec.model, config, target_model, target.num_blocks, max_model_len)
                      if spec.method == "draft_model" else None)

    def execute(self, out: SchedulerOutput, attach_masks: Callable[[SchedulerOutput], None] | None = None
                ) -> dict[Sequence, list[int]]:
        """Fill the reserved draft slots of ``out``'s chunks (in place), let ``attach_masks`` add the
        structured-output masks (a row per position, drafts included), run the target once, and
        return the tokens each sampling chunk emits: its accepted drafts and one more."""
        draft_probs = self._propose(out)
        if attach_masks is not None:
            attach_masks(out)
        sampling = [c for c in out.chunks if c.samples]
        logits = self.target.compute_logits(flatten_chunks(out.chunks, self.target.block_size))
        self.last_logprobs = {}
        if not sampling:
            return {}
        rows = [1 + len(c.draft_token_ids) for c in sampling]
        processed = self._apply_rules(logits, sampling, out.token_masks)
        p = Sampler.probs(processed, [c.seq.sampling_params for c, n in zip(sampling, rows) for _ in range(n)])
        emitted = {c.seq: self.verify(list(c.draft_token_ids), draft_probs.get(c.seq), target_p, self._generator(c.seq))
                   for c, target_p in zip(sampling, p.split(rows))}
        for c, chunk_logits in zip(sampling, logits.split(rows)):
            k = c.seq.sampling_params.logprobs
            if k is not None:  # a report per emitted token, from the row that decided it
                tokens = emitted[c.seq]
                self.last_logprobs[c.seq.request_id] = StepLogprobs(
                    sampled=position_logprobs(chunk_logits[:len(tokens)], tokens, [k] * len(tokens)))
        return emitted

    @staticmethod
    def _apply_rules(logits: torch.Tensor, sampling: list[ScheduledChunk], token_masks: dict[str, object]
                     ) -> torch.Tensor:
        """Each row's logits rules, as if its drafts before it had been sampled: the output a row
        sees is the request's output plus those drafts; a grammar mask row per position."""
        rules = [row_rules(c.seq, c.seq.output_token_ids + list(c.draft_token_ids[:j]))
                 if needs_rules(c.seq.sampling_params) else None
                 for c in sampling for j in range(1 + len(c.draft_token_ids))]
        bitmask = stack_masks([token_masks.get(c.seq.request_id) for c in sampling],
                              [1 + len(c.draft_token_ids) for c in sampling])
        if bitmask is None and all(r is None for r in rules):
            return logits
        return apply_logits_processors(logits, rules, bitmask)

    def _propose(self, out: SchedulerOutput) -> dict[Sequence, torch.Tensor]:
        """Replace each chunk that has reserved slots past its sequence's known tokens by one
        carrying the proposals, giving back the slots of guesses not made. Returns the draft
        model's distributions (n-gram guesses have none: they are certain, a one-hot ``q``)."""
        slots = {i: c.start + c.num_new_tokens - c.seq.num_tokens for i, c in enumerate(out.chunks)}
        slots = {i: n for i, n in slots.items() if n > 0}
        seqs = [out.chunks[i].seq for i in slots]
        if self.draft is not None:
            proposals = self.draft.propose(seqs, list(slots.values()), [self._generator(s) for s in seqs])
        else:
            proposals = [(self.ngram.propose(s.token_ids, n), None) for s, n in zip(seqs, slots.values())]
        draft_probs = {}
        for i, (tokens, probs) in zip(slots, proposals):
            c = out.chunks[i]
            known = c.seq.num_tokens - c.start
            if len(tokens) < slots[i]:
                self.block_manager.free_slots_after(c.seq, c.start + known + len(tokens))
            out.chunks[i] = replace(c, num_new_tokens=known + len(tokens), draft_token_ids=tuple(tokens))
            if probs is not None:
                draft_probs[c.seq] = probs
        return draft_probs

    def _generator(self, seq: Sequence) -> torch.Generator:
        """The request's own generator when it has a seed, else the engine's."""
        return self.target._generator_for(seq.request_id, seq.sampling_params) or self.target.generator

    def release(self, request_id: str) -> None:
        if self.draft is not None:
            self.draft.release(request_id)
