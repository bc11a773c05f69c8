"""Verification of draft tokens: the rejection sampler of Leviathan et al. (2023) and Chen et al. (2023).

A proposer drafted tokens ``x_1 .. x_n`` for one request, drawing ``x_i`` from its distribution
``q_i``; one target forward pass gave the target's distributions ``p_1 .. p_{n+1}`` at the same
positions (``p_{n+1}`` is the position after the last draft). Going left to right:

* accept ``x_i`` with probability ``min(1, p_i(x_i) / q_i(x_i))``;
* at the first rejection, emit a token drawn from ``max(0, p_i - q_i)`` normalised, and stop;
* if all ``n`` drafts are accepted, emit a *bonus* token drawn from ``p_{n+1}``.

Every emitted token is then distributed exactly as if the target had sampled it alone: the
acceptance covers ``min(p, q)`` of the mass and the residual covers the rest, ``p - min(p, q)``.
Greedy decoding is the special case of one-hot ``p`` (the target's argmax): a draft is accepted iff
it is the argmax, and a rejection emits the argmax. A proposer without a distribution (n-gram
lookup) proposes with a one-hot ``q``, which makes the acceptance probability ``p_i(x_i)``.
"""
from __future__ import annotations

import torch


def rejection_sample(draft_tokens: list[int], draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                     generator: torch.Generator | None = None) -> list[int]:
    """The tokens one request emits this step: the accepted prefix of ``draft_tokens`` and one more.

    draft_probs: ``[n, vocab]`` the proposer's ``q_i``, or None for a one-hot proposer;
    target_probs: ``[n + 1, vocab]`` the target's ``p_i`` (after temperature, top-k, top-p).
    """
    n = len(draft_tokens)
    if target_probs.dim() != 2 or target_probs.shape[0] != n + 1:
        raise ValueError(f"target_probs of shape {tuple(target_probs.shape)} must be [{n + 1}, vocab] "
                         f"for {n} draft tokens")
    if draft_probs is not None and tuple(draft_probs.shape) != (n, target_probs.shape[1]):
        raise ValueError(f"draft_probs of shape {tuple(draft_probs.shape)} must be [{n}, {target_probs.shape[1]}]")
    vocab = target_probs.shape[1]
    bad = [t for t in draft_tokens if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"draft_tokens contain {bad[:3]}, outside the vocabulary [0, {vocab})")
    p_all = target_probs.double()
    q_all = (draft_probs.double() if draft_probs is not None
             else torch.nn.functional.one_hot(torch.tensor(draft_tokens, dtype=torch.long), vocab).double())
    uniforms = torch.rand(n, generator=generator, dtype=torch.float64, device=p_all.device)
    emitted: list[int] = []
    for i, token in enumerate(draft_tokens):
        p, q = p_all[i], q_all[i]
        if uniforms[i] * q[token] < p[token]:  # u < p/q, without dividing by a zero q
            emitted.append(token)
            continue
        residual = (p - q).clamp(min=0)
        # p(x) < q(x) guarantees some mass elsewhere; rounding could still leave none
        emitted.append(_draw(residual if residual.sum() > 0 else p, generator))
        return emitted
    emitted.append(_draw(p_all[n], generator))  # all accepted: the bonus token
    return emitted


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))
