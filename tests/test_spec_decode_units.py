"""The rejection sampler and the n-gram proposer on their own, against statistics and hand-checked cases."""
from __future__ import annotations

import pytest
import torch

from minivllm.course.checks import chi_square_pvalue
from minivllm.spec_decode.ngram import NgramProposer
from minivllm.spec_decode.rejection_sampler import rejection_sample

VOCAB = 6
# target and draft distributions for two positions; the draft shares the target's argmax at
# position 0 but is far flatter, so a verifier that trusts agreeing argmaxes is visibly biased
P = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04],
                  [0.05, 0.10, 0.45, 0.10, 0.20, 0.10],
                  [0.30, 0.10, 0.10, 0.10, 0.10, 0.30]], dtype=torch.float64)
Q = torch.tensor([[0.25, 0.20, 0.20, 0.15, 0.10, 0.10],
                  [0.30, 0.05, 0.05, 0.40, 0.10, 0.10]], dtype=torch.float64)
TRIALS = 8000


def argmax_agreement_verifier(draft_tokens, draft_probs, target_probs, generator=None):
    """A classic mistake: keep a sampled draft token whenever draft and target argmaxes agree."""
    emitted = []
    for i, token in enumerate(draft_tokens):
        if draft_probs[i].argmax() == target_probs[i].argmax():
            emitted.append(token)
            continue
        return emitted + [int(torch.multinomial(target_probs[i], 1, generator=generator))]
    return emitted + [int(torch.multinomial(target_probs[-1], 1, generator=generator))]


def emitted_histograms(verify, draft_probs):
    """Counts of the first and (when emitted) second token over many verifications of fresh drafts."""
    gen, draft_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    source = Q if draft_probs is not None else P[:2]  # a one-hot proposer's tokens come from elsewhere
    first, second = torch.zeros(VOCAB), torch.zeros(VOCAB)
    for _ in range(TRIALS):
        drafts = [int(torch.multinomial(source[i], 1, generator=draft_gen)) for i in range(2)]
        tokens = verify(drafts, draft_probs, P, gen)
        first[tokens[0]] += 1
        if len(tokens) > 1:
            second[tokens[1]] += 1
    return first, second


@pytest.mark.parametrize("draft_probs", [Q, None], ids=["draft-model", "one-hot"])
def test_emitted_tokens_follow_the_target_distribution(draft_probs):
    first, second = emitted_histograms(rejection_sample, draft_probs)
    assert chi_square_pvalue(first, P[0]) > 1e-3
    assert chi_square_pvalue(second, P[1]) > 1e-3
    assert second.sum() > TRIALS / 5  # the second position was really exercised


def test_the_same_test_catches_an_argmax_agreement_verifier():
    first, _ = emitted_histograms(argmax_agreement_verifier, Q)
    assert chi_square_pvalue(first, P[0]) < 1e-6


def test_one_hot_draft_is_accepted_with_probability_p():
    gen = torch.Generator().manual_seed(0)
    target = P[:2]
    accepted = sum(len(rejection_sample([1], None, target, gen)) == 2 for _ in range(4000))
    assert abs(accepted / 4000 - 0.25) < 0.03  # p_0(1) = 0.25; 4.4 standard deviations


def test_greedy_is_the_one_hot_case():
    one_hot = torch.nn.functional.one_hot(torch.tensor([2, 3, 0, 5]), VOCAB).double()  # target argmaxes
    assert rejection_sample([2, 3, 0], one_hot[:3], one_hot) == [2, 3, 0, 5]  # all accepted + bonus
    assert rejection_sample([2, 4, 0], None, one_hot) == [2, 3]  # rejected at 1: the argmax instead
    assert rejection_sample([], None, one_hot[:1]) == [2]  # nothing drafted: a plain decode step


def test_bad_shapes_and_tokens_are_refused():
    with pytest.raises(ValueError, match=r"target_probs of shape \(2, 6\) must be \[4, vocab\]"):
        rejection_sample([0, 1, 2], None, P[:2])
    with pytest.raises(ValueError, match="draft_probs of shape"):
        rejection_sample([0, 1], Q[:1], P)
    with pytest.raises(ValueError, match=r"draft_tokens contain \[6\]"):
        rejection_sample([6, 1], None, P)


def test_ngram_proposes_what_followed_the_longest_recent_match():
    proposer = NgramProposer(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1)
    # suffix [7, 8] occurs at 0 and 4; the most recent earlier occurrence (4) wins
    assert proposer.propose([7, 8, 1, 2, 7, 8, 3, 4, 5, 7, 8]) == [3, 4, 5]
    assert proposer.propose([7, 8, 1, 2, 7, 8, 3, 4, 5, 7, 8], max_tokens=2) == [3, 4]
    # the 3-gram [1, 2, 3] beats the later 1-gram match of [3]
    assert proposer.propose([1, 2, 3, 9, 9, 3, 5, 1, 2, 3]) == [9, 9, 3]
    assert proposer.propose([1, 2, 3, 4]) == []  # no earlier occurrence of any suffix
    assert NgramProposer(2, prompt_lookup_min=2).propose([5, 6, 1, 6]) == []  # 1-gram matches are below the minimum
    assert proposer.propose([4, 4, 4]) == [4]  # the continuation may run into the suffix itself


@pytest.mark.parametrize("kwargs, field", [({"num_speculative_tokens": 0}, "num_speculative_tokens"),
                                            ({"num_speculative_tokens": 2, "prompt_lookup_min": 0}, "prompt_lookup_min"),
                                            ({"num_speculative_tokens": 2, "prompt_lookup_min": 3,
                                              "prompt_lookup_max": 2}, "prompt_lookup_min=3")])
def test_ngram_refuses_bad_settings(kwargs, field):
    with pytest.raises(ValueError, match=field):
        NgramProposer(**kwargs)


def test_timed_run_reads_the_given_clock_and_batches_the_prompts():
    from types import SimpleNamespace

    from minivllm.benchmarks.spec_decode import timed_run

    calls = []

    class FakeLLM:
        def generate(self, prompts, params, use_tqdm):
            calls.append(list(prompts))
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[1, 2, 3])]) for _ in prompts]

    ticks = iter([10.0, 12.0])
    rate, outs = timed_run(FakeLLM(), ["a", "b", "c"], 2, None, clock=lambda: next(ticks))
    assert calls == [["a", "b"], ["c"]] and len(outs) == 3
    assert rate == 9 / 2.0  # 9 output tokens over the clock's 2 seconds
