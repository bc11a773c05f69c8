"""Log-probabilities as vLLM reports them: for a position, the top-k tokens and the token actually
there, each with its log-probability under the model's own distribution (the raw logits, before
penalties, masks or temperature) and its rank (1 = most likely)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from minivllm.core.records import Logprob, PositionLogprobs, StepLogprobs

if TYPE_CHECKING:
    from minivllm.worker.step_batch import StepBatch


def position_logprobs(logits: torch.Tensor, token_ids: list[int], top_k: list[int]) -> list[PositionLogprobs]:
    """One report per row of ``logits``: ``token_ids[i]``'s logprob and rank, and the ``top_k[i]``
    most likely tokens' (ranks 1..k). The token is in the report even when it is not in the top-k."""
    if not len(token_ids) == len(top_k) == logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits, {len(token_ids)} token ids and {len(top_k)} top-k")
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logits.device)[:, None])
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    top_values, top_ids = logprobs.topk(max(top_k), dim=-1) if max(top_k) else (None, None)
    reports = []
    for i, (token, k) in enumerate(zip(token_ids, top_k)):
        report = {}
        if k:
            for rank, (tid, value) in enumerate(zip(top_ids[i, :k].tolist(), top_values[i, :k].tolist()), start=1):
                report[tid] = Logprob(value, rank)
        report[token] = Logprob(float(chosen[i]), ranks[i])  # its own rank, even among tied top-k
        reports.append(report)
    return reports


def step_logprobs(batch: StepBatch, logits: torch.Tensor, token_ids: list[int],
                  prompt_logits: torch.Tensor) -> dict[str, StepLogprobs]:
    """The reports a step owes its requests: for each sampling request with ``logprobs``, its sampled
    token's (``logits`` has a row per sampling request); for each with ``prompt_logprobs``, the prompt
    positions this step computed (``prompt_logits`` has a row per ``batch.prompt_rows``)."""
    reports: dict[str, StepLogprobs] = {}
    asking = [i for i, (_, p) in enumerate(batch.sampling) if p.logprobs is not None]
    if asking:
        rows = logits[torch.tensor(asking, device=logits.device)]
        ks = [batch.sampling[i][1].logprobs for i in asking]
        for i, report in zip(asking, position_logprobs(rows, [token_ids[i] for i in asking], ks)):
            reports[batch.sampling[i][0]] = StepLogprobs(sampled=[report])
    if batch.prompt_requests:
        ks = [k for _, _, count, k in batch.prompt_requests for _ in range(count)]
        prompt_reports = iter(position_logprobs(prompt_logits, batch.prompt_targets, ks))
        for request_id, first, count, _ in batch.prompt_requests:
            mine = reports.setdefault(request_id, StepLogprobs())
            mine.prompt = [(first + j, next(prompt_reports)) for j in range(count)]
    return reports
