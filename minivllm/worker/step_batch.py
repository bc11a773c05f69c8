"""One step's scheduled chunks flattened into plain Python lists.

This is what the driver sends to every worker process (cheap to pickle: no `Sequence` objects), and
what a `ModelRunner` turns into tensors, in one process or many.
"""
from __future__ import annotations

from dataclasses import dataclass

from minivllm.core.scheduler import ScheduledChunk
from minivllm.sampling_params import SamplingParams

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

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def flatten_chunks(chunks: list[ScheduledChunk], block_size: int) -> StepBatch:
    batch = StepBatch([], [], [], [], [], [], [])
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
            batch.sampling.append((seq.request_id, seq.sampling_params))
        entry = (row, c.num_new_tokens, end, table)
        # split by query length for the attention kernel's single-query path, not by `ScheduledChunk.is_prefill`
        (batch.decodes if c.num_new_tokens == 1 else batch.prefills).append(entry)
    return batch
