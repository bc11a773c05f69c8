"""vLLM's request API against independent references: parallel sampling (``n``) against greedy
transformers and hand-counted KV blocks; ``logprobs`` and ``prompt_logprobs`` against transformers'
log_softmax; the logits rules (penalties, ``logit_bias``, bans, ``min_tokens``) against a numpy
reading of vLLM's definitions, alone and step by step on transformers' logits; ``LLM.chat`` against
``generate`` on a prompt written by hand from the template; and bad requests refused by name."""
from __future__ import annotations

import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from minivllm import LLM, SamplingParams, course
from minivllm.core.sequence import Sequence
from minivllm.sampling_params import StructuredOutputsParams
from minivllm.worker.logits_processors import apply_logits_processors
from minivllm.worker.step_batch import row_rules
from tests.reference import TIE_GAP

TOL = 1e-4  # |logprob difference| allowed, float32 against float32
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
PROMPT = [(7 * i + 3) % 380 + 1 for i in range(40)]  # 40 tokens: two full blocks of 16 and 8 more
OTHERS = [{"prompt_token_ids": list(range(100, 100 + n))} for n in (5, 33)]  # batch neighbours


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint("qwen3")


@pytest.fixture(scope="module")
def ref(folder, reference):
    return reference(folder)


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(folder, max_model_len=256, block_size=16)


def tokens(out) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


def ref_logprobs(ref, ids: list[int]) -> torch.Tensor:
    """transformers' log_softmax at every position of ``ids`` (row q predicts token q + 1)."""
    return ref.prompt_logits(ids).log_softmax(-1)


def check_report(report: dict, row: torch.Tensor, token: int, k: int, where: str) -> None:
    """One position's report against ``row``, transformers' log_softmax there: ``token`` and the
    top ``k`` are in it, each with transformers' logprob (within TOL) and rank (1 + the number of
    tokens more likely; a near-tie within TOL may go either way), and nothing else is."""
    assert token in report, f"{where}: the token {token} itself is missing"
    kth = float(row.topk(k).values[-1]) if k else math.inf
    for tid, lp in report.items():
        v = float(row[tid])
        assert abs(lp.logprob - v) <= TOL, f"{where}: token {tid} logprob {lp.logprob}, transformers {v}"
        lo, hi = 1 + int((row > v + TOL).sum()), int((row >= v - TOL).sum())
        assert lo <= lp.rank <= hi, f"{where}: token {tid} rank {lp.rank}, transformers {lo}..{hi}"
        if tid != token:
            assert v >= kth - TOL, f"{where}: token {tid} (logprob {v}) is not in transformers' top {k}"
    in_top = report[token].rank <= k
    assert len(report) == k + (not in_top), f"{where}: {len(report)} entries for top-{k} and the token"
    assert sorted(lp.rank for t, lp in report.items() if t != token or in_top) == list(range(1, k + 1))


def check_output_logprobs(ref, prompt: list[int], comp, k: int) -> None:
    lp = ref_logprobs(ref, prompt + comp.token_ids)
    assert len(comp.logprobs) == len(comp.token_ids)
    for j, (report, tok) in enumerate(zip(comp.logprobs, comp.token_ids)):
        check_report(report, lp[len(prompt) - 1 + j], tok, k, f"output {j}")
    want = sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(comp.token_ids))
    assert comp.cumulative_logprob == pytest.approx(sum(r[t].logprob for r, t in zip(comp.logprobs, comp.token_ids)))
    assert abs(comp.cumulative_logprob - want) <= TOL * len(comp.token_ids)


def check_prompt_logprobs(ref, prompt: list[int], reports, k: int) -> None:
    assert reports is not None and len(reports) == len(prompt), "a report per prompt position"
    assert reports[0] is None, "nothing predicts the first prompt token"
    lp = ref_logprobs(ref, prompt)
    for p in range(1, len(prompt)):
        check_report(reports[p], lp[p - 1], prompt[p], k, f"prompt position {p}")


# ---- the logits rules: a numpy reading of vLLM's definitions ----------------------------------------
def rules_reference(logits: np.ndarray, p: SamplingParams, prompt: list[int], output: list[int],
                    eos: list[int], bad_words: list[tuple[int, ...]]) -> np.ndarray:
    """vLLM's order: logit_bias added; bans (EOS and stop_token_ids while the output is shorter than
    min_tokens, the last token of a bad word whose other tokens end the output) to -inf; repetition
    penalty over every token of prompt and output (positive logit / r, else * r); then frequency
    penalty x the token's count in the output and presence penalty once if it occurs there, subtracted."""
    x = logits.astype(np.float64).copy()
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    banned = set()
    if len(output) < p.min_tokens:
        banned |= set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos))
    for word in bad_words:
        head = list(word[:-1])
        if len(output) >= len(head) and output[len(output) - len(head):] == head:
            banned.add(word[-1])
    x[sorted(banned)] = -np.inf
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return x


RULE_CASES = {
    "repetition": dict(repetition_penalty=1.7),
    "repetition<1": dict(repetition_penalty=0.6),
    "frequency": dict(frequency_penalty=1.3),
    "presence": dict(presence_penalty=-0.8),
    "all-penalties": dict(repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.7),
    "logit_bias": dict(logit_bias={3: 5.0, 7: -100.0, 49: 2.5}),
    "min_tokens": dict(min_tokens=6, stop_token_ids=[11, 12]),
    "min_tokens-ignore_eos": dict(min_tokens=6, stop_token_ids=[11], ignore_eos=True),
    "everything": dict(repetition_penalty=1.5, frequency_penalty=-0.4, presence_penalty=0.3, min_tokens=9,
                       logit_bias={0: 3.0, 20: -2.0}, stop_token_ids=[20]),
}


@pytest.mark.parametrize("case", list(RULE_CASES))
def test_logits_rules_match_their_definitions(case):
    """Hand-made logits (both signs, repeated tokens, bad words of one, two and three tokens) through
    `apply_logits_processors`, row by row at several output lengths, against `rules_reference`."""
    gen = torch.Generator().manual_seed(0)
    vocab, eos = 50, [0]
    params = SamplingParams(**RULE_CASES[case], max_tokens=20)
    prompt = [5, 6, 7, 5, 8, 30]
    full_output = [9, 5, 9, 9, 31, 40, 41, 30, 9, 2]
    bad_words = ((33,), (40, 41, 42), (9, 13))
    seq = Sequence("r", prompt, params, min_tokens_stop_ids=tuple(params.stop_token_ids) + (
        () if params.ignore_eos else tuple(eos)), bad_words_token_ids=bad_words)
    rows = [row_rules(seq, full_output[:n]) for n in range(len(full_output) + 1)]  # every output so far
    logits = torch.randn(len(rows), vocab, generator=gen) * 3
    got = apply_logits_processors(logits, rows).double().numpy()
    for n, row in enumerate(got):
        want = rules_reference(logits[n].numpy(), params, prompt, full_output[:n], eos, list(bad_words))
        assert np.array_equal(np.isinf(row), np.isinf(want)), f"output length {n}: banned tokens differ"
        finite = np.isfinite(want)
        np.testing.assert_allclose(row[finite], want[finite], rtol=1e-6, atol=1e-5, err_msg=f"output length {n}")
    # and rows without rules are left alone, next to rows with them
    mixed = apply_logits_processors(logits[:2], [None, rows[1]])
    assert torch.equal(mixed[0], logits[0])


def test_bans_follow_min_tokens_and_bad_word_prefixes():
    """The banned set itself, by hand: before min_tokens EOS and the stop tokens; a one-token bad word
    always; a longer one only right after its other tokens."""
    params = SamplingParams(min_tokens=2, stop_token_ids=[4], max_tokens=8)
    seq = Sequence("r", [1, 2], params, min_tokens_stop_ids=(4, 0), bad_words_token_ids=((7,), (5, 6, 8)))
    assert sorted(seq.banned_token_ids([])) == [0, 4, 7]
    assert sorted(seq.banned_token_ids([5, 6])) == [7, 8]  # min_tokens reached; 5 6 then 8 is the bad word
    assert sorted(seq.banned_token_ids([5])) == [0, 4, 7]
    assert sorted(seq.banned_token_ids([6, 5, 6])) == [7, 8]
    assert sorted(seq.banned_token_ids([5, 6, 9])) == [7]


# ---- n > 1 -------------------------------------------------------------------------------------------
def test_greedy_samples_equal_greedy_and_transformers(llm, ref):
    params = SamplingParams(n=3, temperature=0, max_tokens=12, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)
    assert len(out) == 1 and [c.index for c in out[0].outputs] == [0, 1, 2]
    single = llm.generate({"prompt_token_ids": PROMPT}, replace(params, n=1), use_tqdm=False)[0]
    expected, gaps = ref.greedy(PROMPT, 12)
    assert min(gaps) > TIE_GAP, "pick a prompt without near-ties"
    assert single.outputs[0].token_ids == expected
    assert tokens(out[0]) == [expected] * 3
    assert all(c.finish_reason == "length" for c in out[0].outputs)


def test_seeded_samples_are_reproducible_and_distinct(llm, ref):
    """Seeded n=4 at temperature 1: the same alone and among neighbours; four different samples;
    sample i is the request with seed + i (vLLM's rule); each sample's logprobs are its own tokens'."""
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True, logprobs=2)
    prompt = {"prompt_token_ids": PROMPT[:13]}
    alone = llm.generate(prompt, params, use_tqdm=False)[0]
    noise = SamplingParams(temperature=1.0, max_tokens=14, ignore_eos=True)
    mixed = llm.generate([OTHERS[0], prompt, OTHERS[1]], [noise, params, noise], use_tqdm=False)[1]
    again = llm.generate([prompt, OTHERS[1]], [params, noise], use_tqdm=False)[0]
    assert [c.index for c in alone.outputs] == [0, 1, 2, 3]
    assert tokens(alone) == tokens(mixed) == tokens(again)
    assert len({tuple(t) for t in tokens(alone)}) == 4, "the samples should differ from each other"
    singles = llm.generate([prompt] * 4, [replace(params, n=1, seed=7 + i) for i in range(4)], use_tqdm=False)
    assert [s.outputs[0].token_ids for s in singles] == tokens(alone)
    for comp in alone.outputs:
        check_output_logprobs(ref, PROMPT[:13], comp, 2)


def _peak_used_blocks(llm: LLM) -> int:
    engine = llm.llm_engine
    return max(engine.block_manager.num_blocks - r.num_free_blocks for r in engine.trace)


def test_samples_share_the_prompt_blocks(folder):
    """40-token prompt, blocks of 16, 8 new tokens (47 computed): a sample holds ceil(47/16) = 3 blocks.
    With n=4 and prefix caching, samples 1-3 hit sample 0's (40 - 1) // 16 = 2 full prompt blocks:
    6 hits, 96 cached tokens, and at most 2 + 4 x 1 = 6 blocks in use; four separate requests with
    prefix caching off use 4 x 3 = 12."""
    params = SamplingParams(n=4, temperature=0, max_tokens=8, ignore_eos=True)
    shared = LLM(folder, max_model_len=128, block_size=16)
    out = shared.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    assert sum(len(r.blocks_cache_hit) for r in shared.llm_engine.trace) == 3 * 2
    assert out.metrics.num_cached_tokens == 3 * 2 * 16
    assert _peak_used_blocks(shared) == 2 + 4 * 1
    apart = LLM(folder, max_model_len=128, block_size=16, enable_prefix_caching=False)
    outs = apart.generate([{"prompt_token_ids": PROMPT}] * 4, replace(params, n=1), use_tqdm=False)
    assert _peak_used_blocks(apart) == 4 * 3
    assert [o.outputs[0].token_ids for o in outs] == tokens(out)
    assert shared.llm_engine.block_manager.num_free_blocks == shared.llm_engine.block_manager.num_blocks


def test_samples_through_preemption(folder, ref):
    """A cache too small for all samples at once: samples get preempted and recomputed; the block
    manager's invariants hold after every step, the tokens are those of a roomy cache (greedy: of
    transformers), and every block is free at the end."""
    prompt = PROMPT[:10]
    greedy = SamplingParams(n=4, temperature=0, max_tokens=20, ignore_eos=True)
    seeded = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=20, ignore_eos=True, logprobs=1)
    tight = LLM(folder, max_model_len=64, block_size=4, num_kv_blocks=14).llm_engine
    tight.add_request("g", {"prompt_token_ids": prompt}, greedy)
    tight.add_request("s", {"prompt_token_ids": prompt}, seeded)
    finished = {}
    while tight.has_unfinished_requests():
        for out in tight.step():
            finished[out.request_id] = out
        tight.block_manager.check_invariants(list(tight.requests.values()))
    preempted = {rid for r in tight.trace for rid in r.preempted}
    assert {rid.split("_")[1] for rid in preempted} == {"g", "s"}, "samples of both should have been preempted"
    assert tight.block_manager.num_free_blocks == tight.block_manager.num_blocks
    assert not tight.requests and not tight.parents
    roomy = LLM(folder, max_model_len=64, block_size=4)
    want = roomy.generate([{"prompt_token_ids": prompt}] * 2, [greedy, seeded], use_tqdm=False)
    assert tokens(finished["g"]) == tokens(want[0]) == [ref.greedy(prompt, 20)[0]] * 4
    assert tokens(finished["s"]) == tokens(want[1])
    assert [c.index for c in finished["s"].outputs] == [0, 1, 2]
    for comp in finished["s"].outputs:  # a report per token, also for those sampled before a preemption
        check_output_logprobs(ref, prompt, comp, 1)


def test_aborting_the_parent_aborts_every_sample(llm):
    engine = llm.llm_engine
    params = SamplingParams(n=3, temperature=0, max_tokens=12, ignore_eos=True)
    expected = llm.generate({"prompt_token_ids": PROMPT}, replace(params, n=1), use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("parent", {"prompt_token_ids": PROMPT}, params)
    assert sorted(engine.requests) == ["0_parent", "1_parent", "2_parent"]
    for _ in range(3):
        assert engine.step() == []
    aborted = engine.abort_request("parent")
    assert len(aborted) == 1 and aborted[0].request_id == "parent"
    assert [c.index for c in aborted[0].outputs] == [0, 1, 2]
    for c in aborted[0].outputs:
        assert c.finish_reason == "abort" and c.token_ids == expected[:3]
    assert not engine.requests and not engine.parents and not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.abort_request("parent") == []
    assert llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0].outputs[2].token_ids == expected


# ---- logprobs ----------------------------------------------------------------------------------------
def test_sampled_logprobs_match_transformers(llm, ref):
    """Greedy with top-5 (the tokens are transformers' own), and sampled at temperature 1.5 with top-1
    and top-0 (the tokens are often not the most likely: reported alongside the top-k, and the
    logprobs are the model's own, not the tempered ones)."""
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                                     logprobs=5), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref.greedy(PROMPT, 10)[0]
    check_output_logprobs(ref, PROMPT, out, 5)
    tok = llm.get_tokenizer()
    assert all(lp.decoded_token == tok.decode([t]) for report in out.logprobs for t, lp in report.items())
    for k in (1, 0):
        hot = SamplingParams(temperature=1.5, seed=11, max_tokens=16, ignore_eos=True, logprobs=k)
        comp = llm.generate({"prompt_token_ids": PROMPT}, hot, use_tqdm=False)[0].outputs[0]
        check_output_logprobs(ref, PROMPT, comp, k)
        assert any(r[t].rank > 1 for r, t in zip(comp.logprobs, comp.token_ids)), "no token off the top"
    plain = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=3), use_tqdm=False)[0]
    assert plain.outputs[0].logprobs is None and plain.outputs[0].cumulative_logprob is None
    assert plain.prompt_logprobs is None


def test_prompt_logprobs_match_transformers(llm, folder, ref):
    """Whole prompt in one step; in chunks of 16 (the budget splits the 50-token prompt over 4 steps);
    and after the same prompt warmed the prefix cache (the request computes it again, fully)."""
    prompt = PROMPT + PROMPT[:10]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, prompt_logprobs=3),
                       use_tqdm=False)[0]
    check_prompt_logprobs(ref, prompt, out.prompt_logprobs, 3)
    chunked = LLM(folder, max_model_len=256, block_size=16, max_num_batched_tokens=16)
    out = chunked.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, prompt_logprobs=3),
                           use_tqdm=False)[0]
    prefill_steps = [r for r in chunked.llm_engine.trace if any(c.is_prefill for c in r.chunks)]
    assert len(prefill_steps) == 4
    check_prompt_logprobs(ref, prompt, out.prompt_logprobs, 3)
    warm = PROMPT[::-1] + [9, 9]  # a prompt this engine has not seen: the cache is cold for it
    first = llm.generate({"prompt_token_ids": warm}, SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert first.metrics.num_cached_tokens == 0
    out = llm.generate({"prompt_token_ids": warm}, SamplingParams(max_tokens=2, prompt_logprobs=3), use_tqdm=False)[0]
    assert out.metrics.num_cached_tokens == 0, "a request with prompt_logprobs does not read the cache"
    check_prompt_logprobs(ref, warm, out.prompt_logprobs, 3)
    after = llm.generate({"prompt_token_ids": warm}, SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert after.metrics.num_cached_tokens == 32, "the cache was warm: (42 - 1) // 16 full blocks"
    # n > 1: one report for the request
    out = llm.generate({"prompt_token_ids": warm}, SamplingParams(n=2, max_tokens=2, prompt_logprobs=0),
                       use_tqdm=False)[0]
    check_prompt_logprobs(ref, warm, out.prompt_logprobs, 0)


def test_prompt_logprobs_of_a_preempted_request(folder, ref):
    """A long prompt, in chunks, preempted partway (a decoding request needs its blocks) and computed
    again later: its report is still complete and right, every position once."""
    llm = LLM(folder, max_model_len=64, block_size=4, num_kv_blocks=12, max_num_batched_tokens=8)
    engine = llm.llm_engine
    long_prompt = PROMPT[:40]
    engine.add_request("decoder", {"prompt_token_ids": [5, 6, 7, 8]},
                       SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    engine.add_request("asker", {"prompt_token_ids": long_prompt},
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2, logprobs=2))
    finished, computed_when_preempted = {}, []
    while engine.has_unfinished_requests():
        asker = engine.requests.get("asker")
        before = asker.num_computed_tokens if asker else None
        for out in engine.step():
            finished[out.request_id] = out
        if "asker" in engine.trace[-1].preempted:
            computed_when_preempted.append(before)
        engine.block_manager.check_invariants(list(engine.requests.values()))
    assert computed_when_preempted and 0 < computed_when_preempted[0] < len(long_prompt), \
        "the asker should have been preempted partway through its prompt"
    out = finished["asker"]
    check_prompt_logprobs(ref, long_prompt, out.prompt_logprobs, 2)
    check_output_logprobs(ref, long_prompt, out.outputs[0], 2)
    assert out.outputs[0].token_ids == ref.greedy(long_prompt, 4)[0]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


SPEC_PROMPTS = ["the engine schedules every request", "def class return import for while",
                "prefix hash scheduler sampler kernel", "block page table prefix"]


def test_logprobs_with_speculative_decoding(folder, ref):
    """Greedy with n-gram speculation emits several tokens a step; each gets the report it would
    have had without speculation (and transformers'), also when a stop string cuts a step short."""
    params = SamplingParams(temperature=0, max_tokens=23, ignore_eos=True, logprobs=3)
    plain = LLM(folder, max_model_len=128, num_kv_blocks=64).generate(SPEC_PROMPTS, params, use_tqdm=False)
    spec = LLM(folder, max_model_len=128, num_kv_blocks=64, speculative_config=NGRAM)
    outs = spec.generate(SPEC_PROMPTS, params, use_tqdm=False)
    assert sum(o.metrics.spec_decode.num_accepted for o in outs) > 0, "speculation should have taken part"
    for o, p in zip(outs, plain):
        a, b = o.outputs[0], p.outputs[0]
        assert a.token_ids == b.token_ids
        assert [sorted(r) for r in a.logprobs] == [sorted(r) for r in b.logprobs]
        for ra, rb in zip(a.logprobs, b.logprobs):
            for t in ra:
                assert abs(ra[t].logprob - rb[t].logprob) <= TOL and ra[t].rank == rb[t].rank
        check_output_logprobs(ref, o.prompt_token_ids, a, 3)
    # a stop string that ends on an accepted draft: the tokens after it in that step are dropped, and
    # their reports with them
    rid, idx, stop = _stop_inside_an_accepted_run(spec, outs)
    full = outs[rid].outputs[0].token_ids
    cut_llm = LLM(folder, max_model_len=128, num_kv_blocks=64, speculative_config=NGRAM)
    cut = cut_llm.generate(outs[rid].prompt, replace(params, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop and cut.token_ids == full[:idx + 1]
    last = [c for r in cut_llm.llm_engine.trace for c in r.chunks if c.sampled_token is not None][-1]
    assert last.num_accepted >= 1 and last.start + 1 + last.num_accepted > len(outs[rid].prompt_token_ids) + idx, \
        "the stop should land on an accepted draft, with a token after it in the same step"
    assert len(cut.logprobs) == len(cut.token_ids)
    check_output_logprobs(ref, outs[rid].prompt_token_ids, cut, 3)


def _stop_inside_an_accepted_run(llm: LLM, outs) -> tuple[int, int, str]:
    """From the trace: a request, the output index of an accepted draft that had a token after it in
    its step, and a stop string that first appears in the text with that token."""
    tok = llm.get_tokenizer()
    for i, o in enumerate(outs):
        full, prompt_len = o.outputs[0].token_ids, len(o.prompt_token_ids)
        drafts = [c.start + 1 + j - prompt_len for r in llm.llm_engine.trace for c in r.chunks
                  if c.request_id == o.request_id and c.sampled_token is not None for j in range(c.num_accepted)]
        for idx in drafts:
            before, upto = tok.decode(full[:idx]), tok.decode(full[:idx + 1])
            for n in range(1, len(upto) + 1):
                if upto[-n:] not in before and "\ufffd" not in upto[-n:]:
                    return i, idx, upto[-n:]
    raise AssertionError("no accepted draft to stop on")


SPEC_RULES = [
    SamplingParams(n=3, temperature=0, max_tokens=20, ignore_eos=True, logprobs=1),
    SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3, frequency_penalty=0.3, presence_penalty=0.2),
    SamplingParams(temperature=0, max_tokens=20, min_tokens=6, logit_bias={0: 7.0}),  # EOS likely, not before 6
    SamplingParams(temperature=0, max_tokens=20, bad_words=["engine", "cache keys"],
                   logit_bias={349: 9.0, 360: 9.5, 355: 9.5}),  # " engine", " cache", " keys" pushed up
]


def test_request_rules_with_speculative_decoding(folder):
    """Each draft position gets the rules as if the drafts before it had been sampled: greedy output
    with n, penalties, min_tokens and bad words is the same with n-gram speculation as without."""
    plain = LLM(folder, max_model_len=128, num_kv_blocks=64)
    spec = LLM(folder, max_model_len=128, num_kv_blocks=64, speculative_config=NGRAM)
    accepted = 0
    for params in SPEC_RULES:
        want = [tokens(o) for o in plain.generate(SPEC_PROMPTS, params, use_tqdm=False)]
        outs = spec.generate(SPEC_PROMPTS, params, use_tqdm=False)
        assert [tokens(o) for o in outs] == want, params
        accepted += sum(o.metrics.spec_decode.num_accepted for o in outs)
    assert accepted > 0


# ---- the rules in the engine, against transformers' logits ---------------------------------------------
def ruled_greedy(ref, prompt: list[int], n: int, p: SamplingParams, eos: list[int],
                 bad_words: list[tuple[int, ...]] = ()) -> list[int]:
    """Greedy on transformers' logits with `rules_reference` applied at every step (stops at EOS
    unless ignore_eos, as the engine does); asserts no step is a near-tie."""
    ids, out = list(prompt), []
    for _ in range(n):
        x = rules_reference(ref.prompt_logits(ids)[-1].numpy(), p, prompt, out, eos, list(bad_words))
        top2 = np.sort(x)[-2:]
        assert top2[1] - top2[0] > TIE_GAP, f"near-tie at output {len(out)}"
        out.append(int(x.argmax()))
        ids.append(out[-1])
        if not p.ignore_eos and out[-1] in eos and len(out) > p.min_tokens:
            break
    return out


ENGINE_RULES = {
    "repetition": dict(repetition_penalty=1.8),
    "frequency+presence": dict(frequency_penalty=1.5, presence_penalty=0.5),
    "bias+repetition": dict(repetition_penalty=1.3, logit_bias={200: 4.0, 117: -3.0}),
}


@pytest.mark.parametrize("case", list(ENGINE_RULES))
def test_penalised_greedy_matches_transformers(llm, ref, case):
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **ENGINE_RULES[case])
    prompt = PROMPT[:12] + PROMPT[:12]  # repeated tokens in the prompt too
    want = ruled_greedy(ref, prompt, 16, p, [0])
    assert want != ref.greedy(prompt, 16)[0], "the rule should change the greedy output"
    got = llm.generate({"prompt_token_ids": prompt}, p, use_tqdm=False)[0].outputs[0].token_ids
    assert got == want


def test_min_tokens_delays_eos(llm, ref):
    """logit_bias +100 on EOS makes it the greedy choice at once; min_tokens=5 bans it for five
    tokens, so the output is five tokens then EOS; the same for a stop token."""
    eos = llm.get_tokenizer().eos_token_id
    prompt = {"prompt_token_ids": PROMPT}
    forced = SamplingParams(temperature=0, max_tokens=12, logit_bias={eos: 100.0})
    assert llm.generate(prompt, forced, use_tqdm=False)[0].outputs[0].token_ids == [eos]
    delayed = replace(forced, min_tokens=5)
    comp = llm.generate(prompt, delayed, use_tqdm=False)[0].outputs[0]
    assert comp.finish_reason == "stop" and len(comp.token_ids) == 6 and comp.token_ids[-1] == eos
    assert comp.token_ids == ruled_greedy(ref, PROMPT, 12, delayed, [eos])
    stop_tok = 200
    by_stop = SamplingParams(temperature=0, max_tokens=12, min_tokens=3, stop_token_ids=[stop_tok],
                             logit_bias={stop_tok: 100.0}, ignore_eos=True)
    comp = llm.generate(prompt, by_stop, use_tqdm=False)[0].outputs[0]
    assert comp.token_ids[3:] == [stop_tok] and stop_tok not in comp.token_ids[:3]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop_tok
    # sampled too: EOS never before min_tokens
    hot = replace(delayed, temperature=1.0, seed=5, logit_bias={eos: 6.0}, n=4)
    for c in llm.generate(prompt, hot, use_tqdm=False)[0].outputs:
        assert eos not in c.token_ids[:5] and len(c.token_ids) >= 5


def test_bad_words_never_appear(llm, ref):
    """" engine" is one token, " cache keys" two: pushed up by logit_bias they appear; as bad words
    they never do, in either spelling (alone, and after a space; minivllm bans both, where vLLM keeps
    the spaced one only if it has as many tokens as the other), and the tokens are those of the rules
    applied on transformers' logits."""
    tok = llm.get_tokenizer()
    spell = lambda w: [tuple(tok.encode(s, add_special_tokens=False)) for s in (w, " " + w)]  # noqa: E731
    engine_ids, cache_keys = spell("engine"), spell("cache keys")
    assert len(engine_ids[1]) == 1 and len(cache_keys[1]) == 2
    bias = {engine_ids[1][0]: 9.0, cache_keys[1][0]: 9.5, cache_keys[1][1]: 9.5}
    base = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logit_bias=bias)
    prompt = {"prompt_token_ids": PROMPT}

    def has(seq, word):
        return any(tuple(seq[i:i + len(word)]) == word for i in range(len(seq) - len(word) + 1))

    free = llm.generate(prompt, base, use_tqdm=False)[0].outputs[0].token_ids
    assert has(free, engine_ids[1]) and has(free, cache_keys[1]), free
    for words, spelled in ((["engine"], engine_ids), (["cache keys", "engine"], cache_keys + engine_ids)):
        p = replace(base, bad_words=words)
        got = llm.generate(prompt, p, use_tqdm=False)[0].outputs[0].token_ids
        assert not any(has(got, w) for w in spelled), (words, got)
        assert got == ruled_greedy(ref, PROMPT, 16, p, [0], spelled)


def test_logit_bias_forces_and_forbids(llm, ref):
    prompt = {"prompt_token_ids": PROMPT}
    forced = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={123: 100}),
                          use_tqdm=False)[0].outputs[0].token_ids
    assert forced == [123] * 8
    top = ref.greedy(PROMPT, 1)[0][0]
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={top: -100})
    got = llm.generate(prompt, p, use_tqdm=False)[0].outputs[0].token_ids
    assert got[0] == int(ref.prompt_logits(PROMPT)[-1].topk(2).indices[1]) and top not in got
    assert got == ruled_greedy(ref, PROMPT, 8, p, [0])


def test_stop_string_kept_when_asked_and_special_tokens(llm):
    """include_stop_str_in_output keeps the stop string at the end of the text; skip_special_tokens=False
    keeps EOS in the text."""
    base = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = llm.generate("the engine schedules", base, use_tqdm=False)[0].outputs[0].text
    stop = full[6:9]
    start = full.index(stop)
    cut = llm.generate("the engine schedules", replace(base, stop=[stop]), use_tqdm=False)[0].outputs[0]
    kept = llm.generate("the engine schedules", replace(base, stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert cut.text == full[:start] and kept.text == full[:start + len(stop)]
    tok = llm.get_tokenizer()
    eos = tok.eos_token_id
    p = SamplingParams(temperature=0, max_tokens=3, min_tokens=2, logit_bias={eos: 100.0})
    shown = llm.generate("the engine", replace(p, skip_special_tokens=False), use_tqdm=False)[0].outputs[0]
    hidden = llm.generate("the engine", p, use_tqdm=False)[0].outputs[0]
    assert shown.token_ids == hidden.token_ids and shown.token_ids[-1] == eos
    assert shown.text == tok.decode(shown.token_ids) and shown.text.endswith(tok.eos_token)
    assert hidden.text == tok.decode(hidden.token_ids[:-1]) and tok.eos_token not in hidden.text


def test_min_tokens_ignores_stop_strings_before_it(llm):
    """vLLM checks stop strings only in the text of the tokens past min_tokens: one that appears only
    in the first min_tokens tokens' text never stops the request, nor cuts its text."""
    base = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    tok = llm.get_tokenizer()
    full = llm.generate("the engine schedules", base, use_tqdm=False)[0].outputs[0]
    m = 6
    early = tok.decode(full.token_ids[:m])
    stops = [early[i:i + 2] for i in range(len(early) - 1)
             if full.text.count(early[i:i + 2]) == 1 and "\ufffd" not in early[i:i + 2]]
    assert stops, f"no two characters of {early!r} occur once in {full.text!r}"
    stopped = llm.generate("the engine schedules", replace(base, stop=[stops[0]]), use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) <= m  # without min_tokens it stops early
    late = llm.generate("the engine schedules", replace(base, stop=[stops[0]], min_tokens=m), use_tqdm=False)[0]
    comp = late.outputs[0]
    assert comp.finish_reason == "length" and comp.token_ids == full.token_ids and comp.text == full.text
    # a stop string first written by a token past min_tokens still stops the request there
    later = next(t for t in (tok.decode([i]) for i in full.token_ids[m:])
                 if t.strip() and "\ufffd" not in t and t not in early)
    j = next(j for j in range(m, len(full.token_ids)) if later in tok.decode(full.token_ids[:j + 1]))
    comp = llm.generate("the engine schedules", replace(base, stop=[later], min_tokens=m), use_tqdm=False)[0].outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == later
    assert comp.token_ids == full.token_ids[:j + 1] and comp.text == full.text[:full.text.index(later)]


# ---- LLM.chat -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def course_llm():
    return LLM(course.model_path("target"), max_model_len=256)


def test_chat_is_generate_on_the_templated_prompt(course_llm):
    """The template, read by hand: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then
    ``<|im_start|>assistant\\n`` (add_generation_prompt)."""
    tok = course_llm.get_tokenizer()
    first = [{"role": "user", "content": "What is a KV cache?"}]
    second = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "what is paging?"}]
    texts = ["<|im_start|>user\nWhat is a KV cache?<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello"
             "<|im_end|>\n<|im_start|>user\nwhat is paging?<|im_end|>\n<|im_start|>assistant\n"]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    assert ids[0][0] == tok.convert_tokens_to_ids("<|im_start|>"), "the marker is one special token"
    params = SamplingParams(temperature=0, max_tokens=16)
    want = course_llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    one = course_llm.chat(first, params, use_tqdm=False)
    assert len(one) == 1 and one[0].prompt_token_ids == ids[0] and one[0].prompt == texts[0]
    assert tokens(one[0]) == tokens(want[0])
    both = course_llm.chat([first, second], [params, replace(params, max_tokens=10)], use_tqdm=False)
    assert [b.prompt_token_ids for b in both] == ids
    assert tokens(both[0]) == tokens(want[0])
    assert tokens(both[1]) == [tokens(want[1])[0][:len(tokens(both[1])[0])]] and len(tokens(both[1])[0]) <= 10
    no_header = course_llm.chat(first, params, use_tqdm=False, add_generation_prompt=False)[0]
    assert no_header.prompt == "<|im_start|>user\nWhat is a KV cache?<|im_end|>\n"


def test_chat_without_a_template(llm):
    with pytest.raises(ValueError, match="chat_template"):
        llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    out = llm.chat([{"role": "user", "content": "the engine"}], SamplingParams(temperature=0, max_tokens=4),
                   use_tqdm=False, chat_template=template)[0]
    assert out.prompt == "user: the engine\n"
    with pytest.raises(ValueError, match="messages"):
        llm.chat([[{"role": "user"}]], use_tqdm=False, chat_template=template)


# ---- bad requests ------------------------------------------------------------------------------------------
BAD_PARAMS = [
    ("n", dict(n=0)), ("n", dict(n=2.0)), ("logprobs", dict(logprobs=21)), ("logprobs", dict(logprobs=-1)),
    ("prompt_logprobs", dict(prompt_logprobs=21)), ("repetition_penalty", dict(repetition_penalty=0)),
    ("repetition_penalty", dict(repetition_penalty=-1.0)), ("presence_penalty", dict(presence_penalty=3)),
    ("frequency_penalty", dict(frequency_penalty=-2.5)), ("frequency_penalty", dict(frequency_penalty=float("nan"))),
    ("min_tokens", dict(min_tokens=11, max_tokens=10)), ("min_tokens", dict(min_tokens=-1)),
    ("logit_bias", dict(logit_bias={1: 100.5})), ("logit_bias", dict(logit_bias={-1: 1.0})),
    ("logit_bias", dict(logit_bias={"a": 1.0})), ("logit_bias", dict(logit_bias=[(1, 1.0)])),
    ("bad_words", dict(bad_words=[""])), ("bad_words", dict(bad_words=["  "])), ("bad_words", dict(bad_words=[3])),
    ("include_stop_str_in_output", dict(include_stop_str_in_output="yes")),
    ("skip_special_tokens", dict(skip_special_tokens=None)), ("structured_outputs", dict(structured_outputs="{}")),
]


@pytest.mark.parametrize("name,kwargs", BAD_PARAMS, ids=[f"{n}={list(k.values())[-1]!r}" for n, k in BAD_PARAMS])
def test_bad_sampling_params_are_refused_by_name(name, kwargs):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name}\b"):
        SamplingParams(**kwargs)


def test_structured_outputs_params_refused():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a+", choice=["a"])
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])


def test_engine_refuses_what_the_model_cannot_serve(llm, folder):
    """Token ids outside the vocabulary, and prompt_logprobs with speculative decoding, are refused
    before anything is queued; the engine then serves a good request."""
    vocab = llm.llm_engine.model_config.vocab_size
    engine = llm.llm_engine
    good = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for name, params in (("logit_bias", replace(good, logit_bias={vocab: 1.0})),
                         ("stop_token_ids", replace(good, stop_token_ids=[vocab + 5]))):
        with pytest.raises(ValueError, match=name):
            llm.generate([{"prompt_token_ids": PROMPT}, {"prompt_token_ids": PROMPT}], [good, params], use_tqdm=False)
        assert not engine.requests and not engine.parents and not engine.has_unfinished_requests()
    want = llm.generate({"prompt_token_ids": PROMPT}, good, use_tqdm=False)[0].outputs[0].token_ids
    assert len(want) == 4
    spec = LLM(folder, max_model_len=128, num_kv_blocks=32, speculative_config=NGRAM)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        spec.generate({"prompt_token_ids": PROMPT}, replace(good, prompt_logprobs=1), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        spec.generate({"prompt_token_ids": PROMPT}, replace(good, prompt_logprobs=0, n=2), use_tqdm=False)
    assert not spec.llm_engine.requests and not spec.llm_engine.parents
    assert spec.generate({"prompt_token_ids": PROMPT}, good, use_tqdm=False)[0].outputs[0].token_ids == want
    engine.add_request("dup", {"prompt_token_ids": PROMPT}, replace(good, n=2))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("dup", {"prompt_token_ids": PROMPT}, good)
    engine.abort_request("dup")
    assert not engine.requests and not engine.parents
    assert re.fullmatch(r"\d+", llm.generate({"prompt_token_ids": PROMPT}, good, use_tqdm=False)[0].request_id)
