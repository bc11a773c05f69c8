"""Speculative decoding through the engine: greedy output unchanged token for token, sampled output
unchanged in distribution (chi-square against the target's own probabilities from transformers),
the KV bookkeeping consistent after every step, and bad configurations refused."""
from __future__ import annotations

import shutil

import pytest
import torch

from minivllm import LLM, SamplingParams, course
from minivllm.core.records import SpecDecodeMetrics
from minivllm.course.checks import chi_square_pvalue
from tests.test_spec_decode_units import argmax_agreement_verifier

PROMPTS = ["the engine schedules every request", "def class return import for while",
           "prefix hash scheduler sampler kernel", "block page table prefix"]


@pytest.fixture(scope="module")
def tiny_pair(checkpoint, tmp_path_factory):
    """A tiny target, and a draft that is the target with noise on every weight: it agrees with the
    target often, not always."""
    from safetensors.torch import load_file, save_file

    target = checkpoint("qwen3")
    draft = tmp_path_factory.mktemp("tiny-draft")
    shutil.copytree(target, draft, dirs_exist_ok=True)
    weights = load_file(str(draft / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    noisy = {name: w + NOISE * w.std() * torch.randn(w.shape, generator=gen) if w.numel() > 1 else w
             for name, w in weights.items()}
    save_file(noisy, str(draft / "model.safetensors"), metadata={"format": "pt"})
    return target, str(draft)


NOISE = 0.3
SMALL = dict(num_kv_blocks=256)  # a small cache keeps the per-step invariant checks fast


def run_checked(llm: LLM, prompts, params) -> list[list[int]]:
    """Step the engine by hand, checking the block manager's invariants after every step."""
    engine = llm.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
        engine.block_manager.check_invariants(engine.scheduler.running)
    return [outputs[f"r{i}"] for i in range(len(prompts))]


def spec(method: str, k: int, draft: str) -> dict:
    return {"method": method, "num_speculative_tokens": k, **({"model": draft} if method == "draft_model" else {})}


def greedy_tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_output_is_unchanged_on_tiny_models(tiny_pair, method, k):
    target, draft = tiny_pair
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = greedy_tokens(run_checked(LLM(target, **SMALL), PROMPTS, params))
    outs = run_checked(LLM(target, speculative_config=spec(method, k, draft), **SMALL), PROMPTS, params)
    assert greedy_tokens(outs) == want
    metrics = [o.metrics.spec_decode for o in outs]
    assert sum(m.num_accepted for m in metrics) > 0  # speculation really took part
    assert all(len(m.proposed_per_position) <= k for m in metrics)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_output_is_unchanged_under_preemption_and_prefix_caching(tiny_pair, method):
    target, draft = tiny_pair
    shared = "the engine schedules every request in small steps while the cache keeps keys "
    prompts = [shared + p for p in PROMPTS] * 2  # a shared prefix, and repeated prompts
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    small = dict(num_kv_blocks=14, block_size=8, max_num_seqs=8)
    want = greedy_tokens(run_checked(LLM(target, **small), prompts, params))
    llm = LLM(target, speculative_config=spec(method, 3, draft), **small)
    outs = run_checked(llm, prompts, params)
    assert greedy_tokens(outs) == want
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert sum(o.metrics.num_cached_tokens for o in outs) > 0
    assert sum(r.num_accepted_tokens for r in llm.llm_engine.trace) > 0


def test_speculation_is_batched_with_prefills_within_the_token_budget(tiny_pair):
    target, draft = tiny_pair
    llm = LLM(target, speculative_config=spec("draft_model", 4, draft), max_num_batched_tokens=24, **SMALL)
    run_checked(llm, PROMPTS * 2, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    trace = llm.llm_engine.trace
    assert all(r.num_batched_tokens <= 24 for r in trace)
    assert any(r.num_draft_tokens and r.num_prefill_tokens for r in trace)  # verify and prefill share a step
    for r in trace:
        for c in r.chunks:
            assert 0 <= c.num_accepted <= len(c.draft_token_ids) <= 4


def test_request_metrics_add_up_the_trace(tiny_pair):
    target, draft = tiny_pair
    llm = LLM(target, speculative_config=spec("draft_model", 3, draft), **SMALL)
    outs = run_checked(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for o in outs:
        mine = [c for r in llm.llm_engine.trace for c in r.chunks if c.request_id == o.request_id]
        chunks = [c for c in mine if c.draft_token_ids]
        m = o.metrics.spec_decode
        assert (m.num_steps, m.num_proposed, m.num_accepted) == (
            len(chunks), sum(len(c.draft_token_ids) for c in chunks), sum(c.num_accepted for c in chunks))
        # every step emits its accepted drafts plus one token; the first token came from the prefill
        assert len(o.outputs[0].token_ids) == 1 + m.num_steps + m.num_accepted + (
            sum(1 for c in mine if not c.draft_token_ids and not c.is_prefill))


def test_metrics_count_by_position():
    m = SpecDecodeMetrics()
    m.record(3, 1)  # drafts 0 accepted, 1 rejected, 2 never checked
    m.record(2, 2)
    m.record(0, 0)  # nothing proposed: not a verifying step
    assert (m.num_steps, m.proposed_per_position, m.verified_per_position, m.accepted_per_position) == (
        2, [2, 2, 1], [2, 2, 0], [2, 1, 0])
    assert m.acceptance_rate == 3 / 5 and m.conditional_acceptance_rate == 3 / 4
    assert m.acceptance_rate_per_position == [1.0, 0.5, 0.0]
    assert m.mean_accepted_length == 2.5 and m.forward_passes_saved == 3
    assert m.merge(m).accepted_per_position == [4, 2, 0]
    with pytest.raises(ValueError, match="num_accepted=3"):
        m.record(2, 3)


def test_stops_apply_to_each_emitted_token(tiny_pair):
    """max_tokens and stop tokens cut a verified run of tokens exactly where plain decoding stops."""
    target, draft = tiny_pair
    plain = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    base = greedy_tokens(LLM(target, **SMALL).generate(PROMPTS, plain, use_tqdm=False))
    stop_token = base[0][7]
    for max_tokens in (3, 11):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, stop_token_ids=[stop_token])
        llm = LLM(target, speculative_config=spec("ngram", 5, draft), **SMALL)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        for o, full in zip(outs, base):
            cut = next((i + 1 for i, t in enumerate(full[:max_tokens]) if t == stop_token), max_tokens)
            assert o.outputs[0].token_ids == full[:cut]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_output_is_unchanged_on_the_course_pair(method):
    target, draft = course.model_path("target"), course.model_path("draft")
    prompts = ["class Foo:\n    def __init__(self, name):\n        self.name = name\n",
               "import os\nimport sys\n\n\ndef main(", "    for i in range(len(self.items)):\n"]
    params = SamplingParams(temperature=0, max_tokens=48)
    want = greedy_tokens(run_checked(LLM(target, **SMALL), prompts, params))
    for k in (1, 3, 5):
        outs = run_checked(LLM(target, speculative_config=spec(method, k, draft), **SMALL), prompts, params)
        assert greedy_tokens(outs) == want, f"k={k}"


# ---- exactness in distribution ------------------------------------------------------------------
CONTEXT = "class Foo:\n    def"  # the draft and the target agree on the argmax of the second token
NUM_SAMPLES = 1200


@pytest.fixture(scope="module")
def course_reference():
    from tests.reference import Reference
    return Reference(course.model_path("target"))


def sampled_tokens(verifier=None) -> torch.Tensor:
    """The first three tokens of NUM_SAMPLES seeded requests, temperature 1, draft model with k=2."""
    llm = LLM(course.model_path("target"), seed=0, rejection_sampler=verifier,
              speculative_config=spec("draft_model", 2, course.model_path("draft")))
    params = [SamplingParams(temperature=1.0, max_tokens=3, seed=i) for i in range(NUM_SAMPLES)]
    outs = llm.generate([CONTEXT] * NUM_SAMPLES, params, use_tqdm=False)
    assert sum(o.metrics.spec_decode.num_accepted for o in outs) > NUM_SAMPLES / 4
    return torch.tensor([o.outputs[0].token_ids for o in outs])


def pvalues(tokens: torch.Tensor, ref) -> tuple[float, float]:
    """Chi-square p-values of the first token, and of the second given the most frequent first,
    against the target's softmax at temperature 1 computed by transformers."""
    ids = LLM_TOKENIZER().encode(CONTEXT)
    vocab = ref.model.config.vocab_size
    first = torch.bincount(tokens[:, 0], minlength=vocab)
    top = int(first.argmax())
    second = torch.bincount(tokens[tokens[:, 0] == top, 1], minlength=vocab)
    assert second.sum() > NUM_SAMPLES / 4
    # rare tokens pooled into bins of >= 20 expected draws: the statistic's tail stays chi-square-like
    return (chi_square_pvalue(first, ref.prompt_logits(ids)[-1].softmax(-1), min_expected=20),
            chi_square_pvalue(second, ref.prompt_logits(ids + [top])[-1].softmax(-1), min_expected=20))


def LLM_TOKENIZER():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(course.model_path("target"))


def test_sampled_tokens_follow_the_target_distribution(course_reference):
    p_first, p_second = pvalues(sampled_tokens(), course_reference)
    print(f"p-values with the rejection sampler: first {p_first:.3g}, second {p_second:.3g}")
    assert p_first > 1e-3 and p_second > 1e-3


def test_the_same_test_catches_an_argmax_agreement_verifier(course_reference):
    _, p_second = pvalues(sampled_tokens(argmax_agreement_verifier), course_reference)
    print(f"p-value of the second token with the argmax-agreement verifier: {p_second:.3g}")
    assert p_second < 1e-6


@pytest.mark.parametrize("config, field", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "method='medusa'"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens=0"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, "prompt_lookup_min=0"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown keys \\['lookahead'\\]"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model is required"),
])
def test_bad_speculative_config_is_refused(checkpoint, config, field):
    with pytest.raises(ValueError, match=field):
        LLM(checkpoint("qwen3"), speculative_config=config)


def test_a_draft_with_another_vocabulary_is_refused(checkpoint):
    other = checkpoint("qwen3", vocab_size=320)
    with pytest.raises(ValueError, match="speculative_config.model=.* has vocab_size="):
        LLM(checkpoint("qwen3"), speculative_config={"method": "draft_model", "num_speculative_tokens": 2,
                                                    "model": other})
