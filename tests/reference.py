"""transformers as the reference the engine is checked against."""
from __future__ import annotations

import torch

TIE_GAP = 1e-3  # a top-2 logit gap below this is a genuine tie: fp32 rounding may pick either token


class Reference:
    """Greedy decoding with the transformers model, one prompt at a time, no padding, no KV cache."""

    def __init__(self, folder: str, dtype=torch.float32):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        self._cache: dict = {}

    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        """Tokens, and the top-2 logit gap at each generated position."""
        key = (tuple(prompt), max_tokens)
        if key not in self._cache:
            ids, tokens, gaps = list(prompt), [], []
            for _ in range(max_tokens):  # the whole sequence every step: no cache to get wrong
                logits = self.model(torch.tensor([ids]), use_cache=False).logits[0, -1].float()
                top = logits.topk(2)
                tokens.append(int(top.indices[0]))
                gaps.append(float(top.values[0] - top.values[1]))
                ids.append(tokens[-1])
            self._cache[key] = (tokens, gaps)
        return self._cache[key]

    @torch.inference_mode()
    def prompt_logits(self, prompt: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([prompt])).logits[0].float()


def compare_greedy(outputs, prompts, max_tokens, ref: Reference, max_ties: int = 1) -> int:
    """Assert each output equals the reference's greedy tokens. A divergence is allowed only where
    the reference's top-2 gap is a genuine tie (< TIE_GAP), at most ``max_ties`` times; the rest of
    that sequence is then not comparable. Returns the number of ties met."""
    ties = 0
    for out, prompt, n in zip(outputs, prompts, max_tokens):
        expected, gaps = ref.greedy(prompt, n)
        got = out.outputs[0].token_ids
        assert len(got) == n, f"prompt of {len(prompt)} tokens: {len(got)} tokens, asked for {n}"
        for i, (a, b) in enumerate(zip(got, expected)):
            if a != b:
                assert gaps[i] < TIE_GAP, (
                    f"prompt of {len(prompt)} tokens diverges at output {i}: got {a}, transformers {b} "
                    f"(top-2 gap {gaps[i]:.4f}, not a tie)\n got {got}\n ref {expected}")
                ties += 1
                break
    assert ties <= max_ties, f"{ties} near-tie divergences, more than the {max_ties} allowed"
    return ties
