"""Turning the last-position logits of each sequence into its next token."""
from __future__ import annotations

import torch

from minivllm.sampling_params import SamplingParams


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit a row's filters remove, applied in vLLM's order:

    * top-k keeps the ``top_k[i]`` largest logits;
    * top-p then keeps the smallest set of most likely tokens whose probability (renormalised
      over what top-k kept) reaches ``top_p[i]``;
    * min-p then keeps tokens whose probability is at least ``min_p[i]`` times the largest.
    The most likely token always survives.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    remove = ranks[None, :] >= top_k[:, None]
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    remove |= probs.cumsum(dim=-1) - probs >= top_p[:, None]
    remove |= probs < min_p[:, None] * probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    """Greedy, temperature, top-k, top-p and min-p sampling, batched over requests.

    Sampling draws ``argmax(p / E)`` with ``E ~ Exponential(1)`` per token, which picks token ``i``
    with probability ``p_i`` (the exponential race). A seeded request draws its noise from its own
    generator, so its tokens do not depend on its neighbours in the batch.
    """

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None], default_generator: torch.Generator) -> list[int]:
        logits = logits.float()
        if all(p.greedy for p in params):
            return logits.argmax(dim=-1).tolist()
        probs = self.probs(logits, params)  # greedy rows are one-hot: the race below picks the argmax
        noise = torch.empty_like(probs).exponential_(generator=default_generator)
        for i, gen in enumerate(generators):
            if gen is not None:
                noise[i].exponential_(generator=gen)
        return (probs / noise).argmax(dim=-1).tolist()

    @staticmethod
    def probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Each row's sampling distribution under its params (temperature, then the filters), in
        float32; a greedy row is one-hot on its argmax. Speculative decoding verifies against these."""
        logits = logits.float()
        dev = logits.device
        temperature = torch.tensor([p.temperature or 1.0 for p in params], device=dev)
        logits = logits / temperature[:, None]
        if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params):
            vocab = logits.shape[-1]
            logits = filter_logits(
                logits,
                torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev),
                torch.tensor([p.top_p for p in params], device=dev),
                torch.tensor([p.min_p for p in params], device=dev))
        probs = logits.softmax(dim=-1)
        greedy = torch.tensor([p.greedy for p in params], device=dev)
        if greedy.any():
            argmax = torch.nn.functional.one_hot(logits[greedy].argmax(dim=-1), logits.shape[-1])
            probs[greedy] = argmax.to(probs.dtype)
        return probs
