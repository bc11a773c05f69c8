"""The draft-model proposer: a small model with the target's vocabulary guesses ``k`` tokens, one
forward pass per guess, and says how likely it found each (its distribution ``q``).

Its KV cache follows the target's block tables. The draft gets a cache tensor of its own with as
many blocks as the target's, and a token's draft K/V goes in the same slot as its target K/V, so
the target's scheduler and BlockManager do all the bookkeeping: allocation, prefix sharing,
preemption and the rollback of rejected drafts (the scheduler reserves the slots the drafts need).
What the draft lacks is tracked here: per request, how many leading positions hold draft K/V that
matches the request's tokens. The draft catches up on the rest (a fresh request's prompt, a
recomputed one, the drafts that the target accepted) in the first of its forward passes. Draft K/V
only steers the guesses, never what the engine emits, so this is about speed, not correctness.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from minivllm.config.engine import EngineConfig
from minivllm.config.model import ModelConfig
from minivllm.core.scheduler import ScheduledChunk
from minivllm.core.sequence import Sequence
from minivllm.models.loader import resolve_model_folder
from minivllm.worker.model_runner import ModelRunner
from minivllm.worker.sampler import Sampler
from minivllm.worker.step_batch import flatten_chunks


class DraftModelProposer:
    def __init__(self, draft: str, target_config: EngineConfig, target_model: ModelConfig, num_blocks: int,
                 max_model_len: int):
        folder = resolve_model_folder(draft)
        mc = ModelConfig.from_folder(folder)
        if mc.vocab_size != target_model.vocab_size:
            raise ValueError(f"speculative_config.model={draft!r} has vocab_size={mc.vocab_size}, but the "
                             f"target's is {target_model.vocab_size}: the draft must share the target's vocabulary")
        if mc.max_position_embeddings < max_model_len:
            raise ValueError(f"speculative_config.model={draft!r} has max_position_embeddings="
                             f"{mc.max_position_embeddings} < max_model_len={max_model_len}")
        # the target's settings, with as many KV blocks as the target (a draft token per target slot)
        cfg = replace(target_config, model=folder, speculative_config=None, rejection_sampler=None,
                      cache_config=replace(target_config.cache_config, num_kv_blocks=num_blocks))
        self.runner = ModelRunner(cfg, mc, folder, max_model_len)
        # request id -> (its preemption count, positions the draft has written K/V for) at the last proposal
        self.written: dict[str, tuple[int, int]] = {}

    def _num_valid(self, seq: Sequence) -> int:
        """Leading positions whose draft K/V matches ``seq``'s tokens: what it wrote, cut at the first
        rejected draft (the target's ``num_computed_tokens``), and nothing after a preemption."""
        preemptions, written = self.written.get(seq.request_id, (-1, 0))
        return min(written, seq.num_computed_tokens) if preemptions == seq.num_preemptions else 0

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], num_drafts: list[int],
                generators: list[torch.Generator]) -> list[tuple[list[int], torch.Tensor]]:
        """``num_drafts[i]`` (>= 1) draft tokens for each decoding ``seqs[i]``, drawn from the draft's
        distribution under the request's sampling params (greedy: the argmax), and those
        distributions ``[num_drafts[i], vocab]``. The slots for their K/V are already reserved."""
        tokens: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        for j in range(max(num_drafts, default=0)):
            active = [i for i in active if num_drafts[i] > j]
            if j == 0:  # catch up to the last known token, then guess after it
                chunks = [ScheduledChunk(s, v, s.num_tokens - v) for s in seqs for v in [self._num_valid(s)]]
            else:  # feed the previous guess at the position after the last known token + j - 1
                chunks = [ScheduledChunk(seqs[i], seqs[i].num_tokens - 1 + j, 1, tuple(tokens[i])) for i in active]
            logits = self.runner.compute_logits(flatten_chunks(chunks, self.runner.block_size))
            q = Sampler.probs(logits, [seqs[i].sampling_params for i in active])
            for row, i in enumerate(active):
                tokens[i].append(int(torch.multinomial(q[row], 1, generator=generators[i])))
                probs[i].append(q[row])
        for seq, n in zip(seqs, num_drafts):
            self.written[seq.request_id] = (seq.num_preemptions, seq.num_tokens - 1 + n)
        return [(t, torch.stack(p)) for t, p in zip(tokens, probs)]

    def release(self, request_id: str) -> None:
        self.written.pop(request_id, None)
