"""The sampler against independent references: filters against a per-row numpy reading of their
definitions, frequencies against the softmax by a chi-square test, and seeded requests against
themselves in different batches."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.course.checks import chi_square_pvalue
from minivllm.worker.sampler import Sampler, filter_logits


def allowed_reference(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> set[int]:
    """The tokens the filters keep, read straight from their definitions (vLLM's order)."""
    order = np.argsort(-logits, kind="stable")
    keep = list(order[:top_k] if top_k > 0 else order)
    p = np.exp(logits[keep] - logits[keep].max())
    p /= p.sum()
    cum, kept = 0.0, []
    for tok, prob in zip(keep, p):  # smallest prefix whose mass reaches top_p
        kept.append((tok, prob))
        cum += prob
        if cum >= top_p:
            break
    top = kept[0][1]
    return {int(t) for t, prob in kept if prob >= min_p * top}


@pytest.mark.parametrize("top_k,top_p,min_p", [
    (-1, 1.0, 0.0), (1, 1.0, 0.0), (5, 1.0, 0.0), (-1, 0.5, 0.0), (-1, 0.9, 0.0), (-1, 1.0, 0.2),
    (10, 0.8, 0.05), (3, 0.3, 0.5), (-1, 1e-6, 0.0)])
def test_filters_keep_exactly_the_allowed_tokens(top_k, top_p, min_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 50, generator=gen) * 2
    vocab = logits.shape[1]
    out = filter_logits(logits, torch.full((32,), top_k if top_k > 0 else vocab),
                        torch.full((32,), top_p), torch.full((32,), min_p))
    for row in range(32):
        kept = set(torch.nonzero(torch.isfinite(out[row])).flatten().tolist())
        assert kept == allowed_reference(logits[row].double().numpy(), top_k, top_p, min_p), f"row {row}"
        assert torch.equal(out[row][list(kept)], logits[row][list(kept)]), "kept logits must not change"


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, -1, 1.0), (1.5, 4, 1.0), (1.0, -1, 0.8)])
def test_sampled_frequencies_follow_the_distribution(temperature, top_k, top_p):
    """Draw 50,000 samples from one row (as 50,000 identical rows) and compare the counts with the
    filtered, tempered softmax computed here in float64 (chi-square, p > 0.001 at a fixed seed)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    n = 50_000
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * n
    tokens = Sampler()(logits.repeat(n, 1), params, [None] * n, torch.Generator().manual_seed(0))
    z = logits.double().numpy() / temperature
    allowed = sorted(allowed_reference(z, top_k, top_p, 0.0))
    probs = np.exp(z[allowed] - z[allowed].max())
    probs /= probs.sum()
    counts = np.bincount(tokens, minlength=len(logits))
    assert counts[[i for i in range(len(logits)) if i not in allowed]].sum() == 0
    assert chi_square_pvalue(torch.as_tensor(counts[allowed]), torch.as_tensor(probs)) > 1e-3


def test_chi_square_catches_a_wrong_distribution():
    """The same test rejects samples drawn at the wrong temperature: it can fail."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0])
    n = 20_000
    tokens = Sampler()(logits.repeat(n, 1), [SamplingParams(temperature=0.8)] * n, [None] * n,
                       torch.Generator().manual_seed(1))
    probs = torch.softmax(logits.double(), 0).numpy()  # temperature 1: not what was sampled
    assert chi_square_pvalue(torch.as_tensor(np.bincount(tokens, minlength=5)), torch.as_tensor(probs)) < 1e-6


def test_greedy_and_top_k_1_pick_the_argmax():
    logits = torch.randn(16, 40, generator=torch.Generator().manual_seed(2))
    expected = logits.argmax(-1).tolist()
    gen = torch.Generator().manual_seed(0)
    assert Sampler()(logits, [SamplingParams(temperature=0)] * 16, [None] * 16, gen) == expected
    assert Sampler()(logits, [SamplingParams(temperature=5.0, top_k=1)] * 16, [None] * 16, gen) == expected


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("qwen3"), max_model_len=256, max_num_seqs=8)


def test_seeded_requests_ignore_their_batch(llm):
    """A seeded request gives the same tokens alone, among other requests, at another position in
    the batch, and after the engine's own generator has moved on."""
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=1234, ignore_eos=True)
    prompt = {"prompt_token_ids": [11, 12, 13, 14]}
    alone = llm.generate(prompt, seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": list(range(20, 20 + n))} for n in (3, 30, 70)]
    noise = SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True)
    mixed = llm.generate(others[:2] + [prompt] + others[2:], [noise, noise, seeded, noise], use_tqdm=False)
    other_seed = SamplingParams(temperature=1.0, max_tokens=20, seed=99, ignore_eos=True)
    first = llm.generate([prompt, prompt, *others], [seeded, other_seed, noise, noise, noise], use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    assert first[0].outputs[0].token_ids == alone
    assert first[1].outputs[0].token_ids != alone, "a different seed should give different tokens"


def test_unseeded_sampling_is_reproducible_from_the_engine_seed(checkpoint):
    prompts = [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4, 5]}]
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    runs = [[o.outputs[0].token_ids for o in LLM(checkpoint("qwen3"), max_model_len=64, seed=s)
             .generate(prompts, params, use_tqdm=False)] for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_sampled_tokens_respect_top_k_in_the_engine(llm, reference, checkpoint):
    """Every token sampled with top_k=3 is among the 3 most likely next tokens per transformers."""
    params = SamplingParams(temperature=2.0, top_k=3, max_tokens=15, seed=5, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": [40, 41, 42]}, params, use_tqdm=False)[0]
    ids = list(out.prompt_token_ids)
    ref = reference(checkpoint("qwen3"))
    for tok in out.outputs[0].token_ids:
        top3 = ref.prompt_logits(ids)[-1].topk(3).indices.tolist()
        assert tok in top3
        ids.append(tok)
    assert not math.isnan(sum(ids))
