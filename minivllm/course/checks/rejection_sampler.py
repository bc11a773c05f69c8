"""The check of exercise 07: the verification step of speculative decoding."""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from minivllm.course.checks.base import (
    CheckFailed, CheckResult, chi_square_pvalue, ENGINE_PROMPTS, P_VALUE_THRESHOLD, pvalue_words,
    quiet_engine_logs, run_stages, token_mismatch)
from minivllm.sampling_params import SamplingParams

# The learner writes ``verify(draft_tokens, draft_probs, target_probs, generator)``, the engine's
# `minivllm.spec_decode.rejection_sampler.rejection_sample`: given ``n`` draft tokens, the proposer's
# distributions ``q`` (``[n, vocab]``, or None for a one-hot proposer such as n-gram lookup) and the
# target's ``p`` (``[n + 1, vocab]``), it returns the tokens one request emits in this step.

VerifyFn = Callable[..., list]

# The contract stage's greedy cases: the target's argmax at three draft positions and the bonus
# position (one-hot rows), the drafts, and what must come out.
VERIFY_ARGMAX = [2, 3, 0, 5]
VERIFY_GREEDY_CASES = [([2, 3, 0], [2, 3, 0, 5]), ([2, 4, 0], [2, 3]), ([1, 3, 0], [2]), ([], [2])]
# The statistical stage: the target's p at two draft positions and at the bonus position, and the
# draft's q. At position 0 q is flatter than p but shares its argmax (a verifier that keeps a draft
# whenever the argmaxes agree is visibly biased); at position 1 q puts its mass where p has little
# (most drafts are rejected, so the residual decides what is emitted).
VERIFY_P = [[0.40, 0.25, 0.15, 0.10, 0.06, 0.04],
            [0.05, 0.10, 0.45, 0.10, 0.20, 0.10],
            [0.30, 0.10, 0.10, 0.10, 0.10, 0.30]]
VERIFY_Q = [[0.25, 0.20, 0.20, 0.15, 0.10, 0.10],
            [0.30, 0.05, 0.05, 0.40, 0.10, 0.10]]
VERIFY_TRIALS = 4000
# The engine stage: the course pair, three drafts per step; top_k leaves most of the vocabulary at
# probability 0, where no emitted token may fall.
VERIFY_K = 3
VERIFY_GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
VERIFY_SAMPLED = SamplingParams(temperature=0.8, top_k=20, max_tokens=12, ignore_eos=True)


def _q_kind(draft_probs: torch.Tensor | None) -> str:
    return "draft_probs=None (a one-hot proposer)" if draft_probs is None else "draft_probs=q (a draft model)"


def _call_verify(verify: VerifyFn, draft_tokens: list[int], draft_probs: torch.Tensor | None,
                target_probs: torch.Tensor, generator: torch.Generator, where: str) -> list[int]:
    """Call the learner's ``verify`` on copies of its inputs and check the form of its answer: a list
    of ints, an accepted prefix of ``draft_tokens`` and one more token of the vocabulary. Raises
    `CheckFailed` starting with ``where``, the case in words."""
    n, vocab = len(draft_tokens), target_probs.shape[1]
    if not callable(verify):
        raise CheckFailed(f"verify={verify!r} must be a function verify(draft_tokens, draft_probs, target_probs, "
                          "generator)")
    try:
        out = verify(list(draft_tokens), None if draft_probs is None else draft_probs.clone(), target_probs.clone(),
                     generator)
    except NotImplementedError:
        raise CheckFailed("verify() raised NotImplementedError: replace `# YOUR CODE HERE` and "
                          "`raise NotImplementedError` with your code") from None
    except Exception as e:  # the learner's bug is the finding, not a crash of the check
        raise CheckFailed(f"{where}: verify() raised {type(e).__name__}: {e}") from None
    if not isinstance(out, list) or not all(type(t) is int for t in out):
        got = (f"a list holding {type(next(t for t in out if type(t) is not int)).__name__}"
               if isinstance(out, list) else type(out).__name__)
        raise CheckFailed(f"{where}: verify() returned {got}; return a list of Python ints (int(token))")
    if not 1 <= len(out) <= n + 1:
        raise CheckFailed(f"{where}: verify() returned {out}, {len(out)} tokens for {n} drafts; it emits the "
                          f"accepted drafts and exactly one more token (1 to {n + 1} tokens)")
    wrong = next((i for i, (a, b) in enumerate(zip(out[:-1], draft_tokens)) if a != b), None)
    if wrong is not None:
        raise CheckFailed(f"{where}: verify() returned {out}, whose token {wrong} is not draft {wrong} "
                          f"({draft_tokens[wrong]}); every token but the last must be an accepted draft: stop at "
                          "the first rejection")
    if not 0 <= out[-1] < vocab:
        raise CheckFailed(f"{where}: verify() returned {out}: token {out[-1]} is outside the vocabulary [0, {vocab})")
    return out


def _outside_support(out: list[int], draft_tokens: list[int], draft_probs: torch.Tensor | None,
                     target_probs: torch.Tensor) -> str | None:
    """The last token comes from the residual max(0, p - q) after a rejection, or from the last row
    of p as the bonus: what is wrong when that distribution cannot give it, else None."""
    j, tok = len(out) - 1, out[-1]
    p = float(target_probs[j, tok])
    if j == len(draft_tokens):
        return None if p > 0 else (f"every draft was accepted, and the bonus token {tok} has probability 0 in the "
                                   "target's last row: draw the bonus token from that row")
    q = float(draft_probs[j, tok]) if draft_probs is not None else float(tok == draft_tokens[j])
    return None if p > q else (
        f"after rejecting draft {j} ({draft_tokens[j]}), verify() emitted token {tok}, where p = {p:.3g} and q = "
        f"{q:.3g}{' (q is one-hot on the draft)' * (draft_probs is None)}: the residual max(0, p - q) gives it "
        "probability 0; draw from the residual, normalised")


def _stage_verify_contract(verify: VerifyFn) -> str:
    vocab = 6
    p = F.one_hot(torch.tensor(VERIFY_ARGMAX), vocab).float()
    for drafts, want in VERIFY_GREEDY_CASES:
        n = len(drafts)
        # as in the engine: at temperature 0 a draft model's q is one-hot too
        for kind, q in [("draft_probs one-hot on the drafts (a greedy draft model)", F.one_hot(
                            torch.tensor(drafts, dtype=torch.long), vocab).float()),
                        ("draft_probs=None (a one-hot proposer)", None)]:
            where = f"greedy target (one-hot rows on {VERIFY_ARGMAX[:n + 1]}), drafts {drafts}, {kind}"
            got = _call_verify(verify, drafts, q, p[:n + 1], torch.Generator().manual_seed(0), where)
            if got != want:
                raise CheckFailed(f"{where}: expected {want}, got {got}: a draft equal to the target's argmax is "
                                  "kept, the first other one is replaced by the argmax and verification stops; when "
                                  "every draft is kept, the bonus token is the argmax of the last row")
    # random cases, run twice with generators seeded alike: the same tokens, or randomness from elsewhere
    g = torch.Generator().manual_seed(70)
    cases = []
    for i in range(12):
        n, vocab = 1 + i % 4, 8
        p = (2 * torch.randn(n + 1, vocab, generator=g)).softmax(-1)
        q = (2 * torch.randn(n, vocab, generator=g)).softmax(-1)
        drafts = torch.multinomial(q, 1, generator=g)[:, 0].tolist()
        cases.append((drafts, q if i % 2 else None, p))
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        runs.append([_call_verify(verify, d, q, p, gen, f"drafts {d} on random p and q, {_q_kind(q)}")
                     for d, q, p in cases])
    for (d, q, _), a, b in zip(cases, *runs):
        if a != b:
            raise CheckFailed(f"drafts {d} on random p and q, {_q_kind(q)}: two runs with generators seeded alike "
                              f"returned {a}, then {b}: draw every random number from `generator`")
    return ("verify() returns an accepted prefix of the drafts and one more token; on greedy targets it keeps the "
            "drafts equal to the argmax, replaces the first other one by the argmax, and adds the last row's argmax "
            "when all are kept; draft_probs=None works; generators seeded alike give the same tokens")


def _verify_counts(verify: VerifyFn, with_q: bool, trials: int) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """Over ``trials`` verifications of two fresh drafts on VERIFY_P (and VERIFY_Q, ``with_q``): per
    position (first token, second, bonus), how often each token was emitted there, and the chance
    the rule gives each position of being reached (every draft before it accepted); and the first
    token emitted outside its distribution's support (in words; None if none)."""
    p, q = torch.tensor(VERIFY_P), torch.tensor(VERIFY_Q) if with_q else None
    draft_gen, gen = torch.Generator().manual_seed(71), torch.Generator().manual_seed(72)
    # a draft model's tokens come from its q; a one-hot proposer's from anywhere (here: the target's p)
    source = q if with_q else p[:2]
    # a draft x is accepted with probability min(1, p(x) / q(x)), q(x) = 1 for a one-hot proposer
    accept = (source * (p[:2] / q if with_q else p[:2]).clamp(max=1)).sum(-1).double()
    reach = torch.cat([torch.ones(1, dtype=torch.float64), accept.cumprod(0)])
    drafts = torch.multinomial(source, trials, replacement=True, generator=draft_gen).T.tolist()
    counts, outside = torch.zeros(p.shape), None
    for d in drafts:
        where = f"drafts {d} on the stage's fixed p and q, {_q_kind(q)}"
        out = _call_verify(verify, d, q, p, gen, where)
        counts[list(range(len(out))), out] += 1
        if outside is None:
            why = _outside_support(out, d, q, p)
            outside = why and f"{where}: {why}"
    return counts, reach, outside


def _stage_verify_distribution(verify: VerifyFn, trials: int = VERIFY_TRIALS) -> str:
    p = torch.tensor(VERIFY_P, dtype=torch.float64)
    names = ["first emitted token", "second emitted token (after an accepted draft)",
             "bonus token (after two accepted drafts)"]
    for with_q in (True, False):
        counts, reach, outside = _verify_counts(verify, with_q, trials)
        for j, name in enumerate(names):  # the bias first: it is what a wrong rule shows most plainly
            # one test of both how often position j is reached and which token comes there
            observed = torch.cat([counts[j].double(), torch.tensor([trials - counts[j].sum().item()])])
            pval = chi_square_pvalue(observed, torch.cat([reach[j] * p[j], 1 - reach[j:j + 1]]))
            if pval >= P_VALUE_THRESHOLD:
                continue
            emitted = int(counts[j].sum())
            freq = counts[j].double() / max(emitted, 1)
            worst = int((freq - p[j]).abs().argmax())
            what = (f"it came in {100 * emitted / trials:.1f}% of the verifications, the rule gives "
                    f"{100 * reach[j]:.1f}% (the chance that every draft before it is accepted)"
                    if abs(emitted / trials - reach[j]) > 3 * (reach[j] * (1 - reach[j]) / trials) ** 0.5 else
                    f"token {worst} should come up {100 * p[j, worst]:.1f}% of the time, yours came up "
                    f"{100 * freq[worst]:.1f}%")
            raise CheckFailed(
                f"{_q_kind(VERIFY_Q if with_q else None)}, q = {VERIFY_Q if with_q else 'one-hot'}: over {trials:,} "
                f"verifications of 2 drafts, the {name} does not follow the target's p = {VERIFY_P[j]} (chi-square "
                f"{pvalue_words(pval)}): {what}"
                + (f". Also: {outside}" if outside else ""))
        if outside:
            raise CheckFailed(outside)
    return (f"how often each position is reached, and the token that comes there (the first, the second after an "
            f"accepted draft, the bonus after two), follow the rule's exact distribution, with a draft model's q and "
            f"with draft_probs=None ({trials:,} verifications each, chi-square p > {P_VALUE_THRESHOLD:g}); no token "
            "the residual excludes was ever emitted")


def spec_check_engine(method: str | None, verify: VerifyFn | None = None):
    """The course target with ``method``'s speculation (None: none) and ``verify`` as its rejection
    sampler (None: the stock one), plugged in as every engine piece is: an engine argument."""
    from minivllm import LLM, course

    spec = method and {"method": method, "num_speculative_tokens": VERIFY_K,
                       **({"model": course.model_path("draft")} if method == "draft_model" else {})}
    with quiet_engine_logs():
        return LLM(course.model_path("target"), max_model_len=256, max_num_seqs=16, seed=0, speculative_config=spec,
                   rejection_sampler=verify)


@functools.lru_cache(maxsize=1)
def tokens_without_speculation() -> list[list[int]]:
    with spec_check_engine(None) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(ENGINE_PROMPTS, VERIFY_GREEDY, use_tqdm=False)]


def _stage_verify_engine(verify: VerifyFn) -> str:
    want = tokens_without_speculation()
    accepted = {}
    for method in ("draft_model", "ngram"):
        engine = f"inside the engine ({method}, k={VERIFY_K})"

        def audited(draft_tokens, draft_probs, target_probs, generator=None):
            where = f"{engine}: drafts {draft_tokens}, {_q_kind(draft_probs)}"
            out = _call_verify(verify, draft_tokens, draft_probs, target_probs, generator, where)
            why = _outside_support(out, draft_tokens, draft_probs, target_probs)
            if why:
                raise CheckFailed(f"{where}: {why}")
            return out

        with spec_check_engine(method, audited) as llm:
            try:
                greedy = llm.generate(ENGINE_PROMPTS, VERIFY_GREEDY, use_tqdm=False)
                llm.generate(ENGINE_PROMPTS, VERIFY_SAMPLED, use_tqdm=False)
            except CheckFailed:
                raise
            except Exception as e:  # the engine choked on what verify() returned
                raise CheckFailed(f"{engine}: LLM.generate raised {type(e).__name__}: {e}") from None
        for out, tokens in zip(greedy, want):
            diff = token_mismatch(out.outputs[0].token_ids, tokens, "with your verify", "without speculation")
            if diff:
                raise CheckFailed(f"{engine}, greedy: prompt {out.prompt!r}: {diff}")
        m = [o.metrics.spec_decode for o in greedy]
        accepted[method] = (sum(x.num_accepted for x in m), sum(x.num_proposed for x in m))
        if not accepted[method][0]:
            raise CheckFailed(f"{engine}, greedy: your verify accepted none of the {accepted[method][1]} drafts, so "
                              "speculation saved nothing: keep a draft that equals the target's argmax")
    (a, n), (b, m) = accepted["draft_model"], accepted["ngram"]
    return (f"plugged into the engine with the course models (k={VERIFY_K}): greedy outputs of {len(ENGINE_PROMPTS)} "
            f"prompts equal those without speculation token for token, with {a} of {n} drafts accepted (draft model) "
            f"and {b} of {m} (n-gram); sampled requests (temperature 0.8, top_k=20) emitted only allowed tokens")


def check_rejection_sampler(verify: VerifyFn, *, verbose: bool = True) -> CheckResult:
    """Exercise 07: ``verify(draft_tokens, draft_probs, target_probs, generator)`` returns the tokens a
    request emits in one speculative step: the accepted prefix of ``draft_tokens`` and one more.

    1. the contract: a list of ints, an accepted prefix and one more token; on greedy (one-hot)
       targets, with a one-hot ``draft_probs`` and with None, the tokens plain greedy decoding
       gives; generators seeded alike give the same tokens;
    2. on fixed synthetic p and q, with drafts drawn from q and with draft_probs=None: how often the
       first, second and bonus positions are reached and which token comes there pass a chi-square
       test against what the rule gives exactly, and no token the residual excludes comes out;
    3. plugged into the real engine as ``spec_decoder.verify`` with the course pair (draft model and
       n-gram, k=3), greedy outputs equal the engine's without speculation, drafts were accepted, and
       sampled requests emit only tokens their distributions allow.
    """
    return run_stages("check_rejection_sampler", [lambda: _stage_verify_contract(verify),
                                            lambda: _stage_verify_distribution(verify),
                                            lambda: _stage_verify_engine(verify)], verbose)
