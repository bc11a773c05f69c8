"""What happens to a row of logits before the sampler draws from it, in vLLM's order:

1. the structured-output mask (tokens that would leave the request's grammar get -inf);
2. ``logit_bias`` (added as is);
3. bans: EOS and the stop tokens before ``min_tokens``, the last token of a ``bad_words`` entry
   (skipped where the grammar allows only banned tokens: the grammar wins, else nothing is left);
4. penalties: ``repetition_penalty`` r over every token seen in the prompt or the output (a positive
   logit is divided by r, a negative one multiplied, as in CTRL and Hugging Face), then
   ``frequency_penalty`` times the token's count in the output and ``presence_penalty`` once for a
   token the output contains, both subtracted.

Temperature and the top-k/top-p/min-p filters come after, in the sampler.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minivllm.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class RowRules:
    """What one logits row needs besides its `SamplingParams`: the tokens before it."""

    params: SamplingParams
    prompt_token_ids: list[int]  # only with a repetition penalty (else empty)
    output_token_ids: list[int]
    banned_token_ids: list[int]


def needs_rules(params: SamplingParams) -> bool:
    return bool(params.has_penalties or params.logit_bias or params.bad_words or params.min_tokens)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar's token bitmask (int32 words, bit ``j`` of word ``w`` set: token ``32 w + j`` allowed)
    as a bool ``[rows, vocab_size]`` tensor of allowed tokens."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = (bitmask.to(torch.int32).unsqueeze(-1) >> bits) & 1
    return allowed.flatten(1)[:, :vocab_size].bool()


def stack_masks(masks: list[torch.Tensor | None], rows: list[int]) -> torch.Tensor | None:
    """One bitmask for the batch from each request's mask rows (``rows[i]`` of them, a row per
    position it samples); a request without a grammar gets rows with every bit set."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    words = present[0].shape[-1]
    return torch.cat([m if m is not None else torch.full((n, words), -1, dtype=torch.int32)
                      for m, n in zip(masks, rows)])


def apply_logits_processors(logits: torch.Tensor, rules: list[RowRules | None],
                            bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 copy of ``logits`` (``[rows, vocab]``) with each row's rules applied; ``bitmask``
    has one row per logits row (all bits set where a request has no grammar)."""
    logits = logits.float().clone()
    if bitmask is not None:
        logits.masked_fill_(~unpack_bitmask(bitmask, logits.shape[-1]).to(logits.device), float("-inf"))
    vocab, dev = logits.shape[-1], logits.device
    for i, r in enumerate(rules):
        if r is None:
            continue
        p, row = r.params, logits[i]
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=dev)
            row.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), device=dev))
        if r.banned_token_ids:
            banned = row.index_fill(0, torch.tensor(r.banned_token_ids, device=dev), float("-inf"))
            if bitmask is None or torch.isfinite(banned).any():  # all -inf would sample garbage the grammar refuses
                row.copy_(banned)
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(r.prompt_token_ids) | set(r.output_token_ids)), device=dev, dtype=torch.long)
            if len(seen):
                values = row[seen]
                row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and r.output_token_ids:
            counts = torch.bincount(torch.tensor(r.output_token_ids, device=dev), minlength=vocab)[:vocab].float()
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits
