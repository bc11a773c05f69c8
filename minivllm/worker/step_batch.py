"""One step's scheduled chunks flattened into plain Python lists.

This is what the driver sends to every worker process (cheap to pickle: no `Sequence` objects), and
what a `ModelRunner` turns into tensors, in one process or many.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from minivllm.core.records import StepLogprobs
from minivllm.core.scheduler import ScheduledChunk
from minivllm.core.sequence import Sequence
from minivllm.sampling_params import SamplingParams
from minivllm.worker.logits_processors import RowRules, needs_rules

# (first row in the flat batch, query length, context length, block table) of one sequence
AttentionEntry = tuple[int, int, int, list[int]]


@dataclass
class StepBatch:
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]  # cache slot of each token's K/V
    logits_rows: list[int]  # rows whose hidden state predicts a sequence's next token...
    sampling: list[tuple[str, SamplingParams]]  # ...and the (request_id, params) sampling there
    decodes: list[AttentionEntry]  # sequences with one new token
    prefills: list[AttentionEntry]  # prompt chunks (and recomputes)
    rules: list[RowRules | None] = field(default_factory=list)  # per sampling request, if any has rules
    token_masks: list[object | None] = field(default_factory=list)  # per sampling request, if any has a grammar
    # prompt logprobs: the rows predicting a prompt position, the prompt token there, and per request
    # (request_id, first position reported, number of positions, top-k)
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)
    prompt_requests: list[tuple[str, int, int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class SamplerOutput:
    """What the sampling rank returns for a `StepBatch`: a token per sampling request, and the
    logprobs of the requests that asked for them."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: dict[str, StepLogprobs] = field(default_factory=dict)

    def extend(self, other: "SamplerOutput") -> None:
        self.token_ids += other.token_ids
        self.logprobs.update(other.logprobs)


def flatten_chunks(chunks: list[ScheduledChunk], block_size: int,
                   token_masks: dict[str, object] | None = None) -> StepBatch:
    """``token_masks``: the structured-output mask rows of each constrained request (by request id)."""
    batch = StepBatch([], [], [], [], [], [], [])
    rules, masks = [], []
    for c in chunks:
        seq, start, end = c.seq, c.start, c.start + c.num_new_tokens
        row = len(batch.input_ids)
        batch.input_ids += seq.token_ids[start:end]
        if c.draft_token_ids:  # they follow the known tokens, at positions num_tokens, num_tokens + 1, ...
            batch.input_ids += c.draft_token_ids[max(start - seq.num_tokens, 0):end - seq.num_tokens]
        batch.positions += range(start, end)
        table = seq.block_table
        batch.slot_mapping += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        if c.samples:  # the last known token's row, and each draft token's (speculative decoding)
            first = len(batch.input_ids) - (end - max(start, seq.num_tokens - 1))
            batch.logits_rows += range(first, len(batch.input_ids))
            params = seq.sampling_params
            batch.sampling.append((seq.request_id, params))
            rules.append(row_rules(seq, seq.output_token_ids) if needs_rules(params) else None)
            masks.append(token_masks.get(seq.request_id) if token_masks else None)
        if seq.prompt_logprobs is not None:
            _add_prompt_rows(batch, c, row)
        entry = (row, c.num_new_tokens, end, table)
        # split by query length for the attention kernel's single-query path, not by `ScheduledChunk.is_prefill`
        (batch.decodes if c.num_new_tokens == 1 else batch.prefills).append(entry)
    if any(r is not None for r in rules):
        batch.rules = rules
    if any(m is not None for m in masks):
        batch.token_masks = masks
    return batch


def row_rules(seq: Sequence, output_token_ids: list[int]) -> RowRules:
    """The rules of ``seq``'s next position after ``output_token_ids`` (its output, or with speculative
    decoding its output and the drafts before that position)."""
    params = seq.sampling_params
    return RowRules(params, seq.prompt_token_ids if params.repetition_penalty != 1 else [],
                    list(output_token_ids), seq.banned_token_ids(output_token_ids))


def _add_prompt_rows(batch: StepBatch, c: ScheduledChunk, row: int) -> None:
    """The rows of chunk ``c`` (first row ``row``) that predict prompt positions not yet reported:
    the row at position q predicts the prompt token at q + 1."""
    seq = c.seq
    first = max(c.start, len(seq.prompt_logprobs) - 1)
    last = min(c.start + c.num_new_tokens, seq.num_prompt_tokens - 1)
    if first >= last:
        return
    batch.prompt_rows += range(row + first - c.start, row + last - c.start)
    batch.prompt_targets += seq.token_ids[first + 1:last + 1]
    batch.prompt_requests.append((seq.request_id, first + 1, last - first, seq.sampling_params.prompt_logprobs))
