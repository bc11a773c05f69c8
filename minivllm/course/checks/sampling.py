"""The check of exercise 01: sampling."""
from __future__ import annotations

import functools
from typing import Callable

import torch

from minivllm.course.checks.base import (
    check_model_folder, CheckFailed, CheckResult, chi_square_pvalue, ENGINE_PROMPTS, P_VALUE_THRESHOLD,
    pvalue_words, quiet_engine_logs, run_stages, token_mismatch)
from minivllm.sampling_params import SamplingParams

SampleFn = Callable[[torch.Tensor, list, torch.Generator], "torch.Tensor | list[int]"]


def describe(p: SamplingParams) -> str:
    """A request's sampling settings in words, leaving out filters that are off."""
    if p.greedy:
        return "temperature=0 (greedy)"
    parts = [f"temperature={p.temperature:g}"]
    if p.top_k > 0:
        parts.append(f"top_k={p.top_k}")
    if p.top_p < 1:
        parts.append(f"top_p={p.top_p:g}")
    return ", ".join(parts)


def call_sampler(sample: SampleFn, logits: torch.Tensor, params: list[SamplingParams],
                 generator: torch.Generator) -> list[int]:
    """Call the learner's ``sample`` on a copy of ``logits``; check what it returns (one token id
    per row, inside the vocabulary) and return it as a list. Raises `CheckFailed` saying what went
    wrong."""
    n, vocab = logits.shape
    try:
        out = sample(logits.clone(), list(params), generator)
    except NotImplementedError:
        raise CheckFailed("sample() raised NotImplementedError: replace `# YOUR CODE HERE` and "
                          "`raise NotImplementedError` with your code") from None
    except Exception as e:  # the learner's bug is the finding, not a crash of the check
        raise CheckFailed(f"sample() raised {type(e).__name__}: {e} (on a batch of {n} rows; row 0 has "
                          f"{describe(params[0])})") from None
    try:
        tokens = torch.as_tensor(out)
    except Exception:
        raise CheckFailed(f"sample() returned {type(out).__name__}; return a LongTensor of shape "
                          f"[{n}] (or a list of {n} ints)") from None
    if tokens.shape != (n,):
        raise CheckFailed(f"sample() returned shape {list(tokens.shape)} for {n} rows; expected [{n}]: "
                          "one token id per row")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise CheckFailed(f"sample() returned {tokens.dtype} values; token ids are integers "
                          "(torch.long)")
    bad = ((tokens < 0) | (tokens >= vocab)).nonzero().flatten().tolist()
    if bad:
        raise CheckFailed(f"row {bad[0]}: sample() returned token {int(tokens[bad[0]])}, outside the "
                          f"vocabulary [0, {vocab})")
    return tokens.tolist()


def reference_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution the engine samples ``row`` from under ``p``, in float64: the engine's own
    filters (`minivllm.worker.sampler.filter_logits`) on ``row / temperature``, then softmax."""
    from minivllm.worker.sampler import filter_logits

    z = row.double()[None] / p.temperature
    vocab = z.shape[-1]
    z = filter_logits(z, torch.tensor([p.top_k if p.top_k > 0 else vocab]),
                      torch.tensor([p.top_p], dtype=torch.float64), torch.tensor([p.min_p], dtype=torch.float64))
    return z.softmax(-1)[0]


# The statistical stage: one row of logits per setting (a permutation of BASE, so the most likely
# token is not always id 0), each repeated `draws` times and shuffled into one batch. Chosen so that a
# sampler that ignores the temperature, top-k or top-p, applies top-p before the temperature or
# before top-k, or reads one row's settings for the whole batch, fails.
BASE_LOGITS = [3.0, 2.4, 2.0, 1.2, 0.6, 0.0, -0.5, -1.2, -2.0, -3.0]
SAMPLING_SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=2.0),
    SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.75),
    SamplingParams(temperature=2.0, top_p=0.5),
    SamplingParams(temperature=0.7, top_k=4, top_p=0.8),
]


def setting_logits(i: int) -> torch.Tensor:
    perm = torch.randperm(len(BASE_LOGITS), generator=torch.Generator().manual_seed(100 + i))
    return torch.tensor(BASE_LOGITS)[perm]


def _stage_argmax(sample: SampleFn) -> str:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 50, generator=gen) * 3
    argmax_settings = [SamplingParams(temperature=0), SamplingParams(temperature=0.9, top_k=1),
                       SamplingParams(temperature=1.5, top_p=1e-6)]
    params = [argmax_settings[i % 3] if i % 2 == 0 else SamplingParams(temperature=1.0) for i in range(24)]
    tokens = call_sampler(sample, logits, params, torch.Generator().manual_seed(1))
    for i, (tok, p) in enumerate(zip(tokens, params)):
        want = int(logits[i].argmax())
        if i % 2 == 0 and tok != want:
            raise CheckFailed(f"row {i} ({describe(p)}): expected token {want} (the largest logit, "
                              f"{logits[i, want]:.2f}), got token {tok} (logit {logits[i, tok]:.2f})")
    again = call_sampler(sample, logits, params, torch.Generator().manual_seed(1))
    for i, (a, b) in enumerate(zip(tokens, again)):
        if a != b:
            raise CheckFailed(f"two calls with generators seeded alike gave row {i} ({describe(params[i])}) "
                              f"token {a}, then token {b}: draw every random number from `generator`")
    return ("greedy rows (temperature=0), top_k=1 and tiny top_p return the largest logit's token; "
            "the same generator seed gives the same tokens")


def _stage_distribution(sample: SampleFn, draws: int) -> str:
    k = len(SAMPLING_SETTINGS)
    rows = [setting_logits(i) for i in range(k)]
    order = torch.randperm(k * draws, generator=torch.Generator().manual_seed(2))
    which = (torch.arange(k).repeat_interleave(draws))[order]  # setting of each batch row
    logits = torch.stack(rows)[which]
    params = [SAMPLING_SETTINGS[int(s)] for s in which]
    tokens = torch.tensor(call_sampler(sample, logits, params, torch.Generator().manual_seed(3)))
    for i, p in enumerate(SAMPLING_SETTINGS):
        mine = (which == i).nonzero().flatten()
        got = tokens[mine]
        probs = reference_probs(rows[i], p)
        removed = got[probs[got] == 0]
        if len(removed):
            tok = int(removed[0])
            row = int(mine[(got == tok).nonzero()[0, 0]])
            allowed = (probs > 0).nonzero().flatten().tolist()
            raise CheckFailed(
                f"row {row} ({describe(p)}): sampled token {tok}, which the filters remove; the tokens "
                f"allowed in that row are {allowed} (logits {_fmt(rows[i])})")
        counts = torch.bincount(got, minlength=len(probs))
        pval = chi_square_pvalue(counts, probs)
        if pval < P_VALUE_THRESHOLD:
            freq = counts.double() / draws
            worst = int((freq - probs).abs().argmax())
            raise CheckFailed(
                f"rows with {describe(p)} (logits {_fmt(rows[i])}): over {draws} draws the sampled "
                f"frequencies do not follow softmax(logits / temperature) after the filters (chi-square "
                f"{pvalue_words(pval)}); token {worst} should come up "
                f"{100 * probs[worst]:.1f}% of the time, yours came up {100 * freq[worst]:.1f}%")
    return (f"top-k and top-p never return a token they remove, and the frequencies follow the "
            f"engine's distribution in {k} settings ({draws:,} draws each, chi-square p > "
            f"{P_VALUE_THRESHOLD:g})")


def _fmt(row: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:g}" for v in row.tolist()) + "]"


class LearnerSampler:
    """Adapts a learner's ``sample(logits, params, generator)`` to the engine's sampler interface,
    ``sampler(logits, params, generators, default_generator) -> list[int]`` (see
    `minivllm.worker.model_runner.ModelRunner.execute`). Per-request seeded generators are not
    part of the exercise: every row draws from the engine's generator."""

    def __init__(self, sample: SampleFn):
        self.sample = sample

    def __call__(self, logits, params, generators, default_generator) -> list[int]:
        return call_sampler(self.sample, logits.float(), params, default_generator)


ENGINE_SETTINGS = dict(max_model_len=256, max_num_seqs=16, seed=0)


@functools.lru_cache(maxsize=1)
def stock_greedy_tokens(max_tokens: int) -> list[list[int]]:
    """The engine's own greedy tokens for `ENGINE_PROMPTS`, computed once per process."""
    from minivllm import LLM

    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with check_model_folder() as folder, quiet_engine_logs(), LLM(folder, **ENGINE_SETTINGS) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(ENGINE_PROMPTS, greedy, use_tqdm=False)]


def _stage_engine(sample: SampleFn, max_tokens: int = 16) -> str:
    from minivllm import LLM

    stock = stock_greedy_tokens(max_tokens)
    settings = [SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                SamplingParams(temperature=0.8, top_k=1, max_tokens=max_tokens, ignore_eos=True),
                SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=max_tokens, ignore_eos=True)]
    prompts = [p for _ in settings for p in ENGINE_PROMPTS]
    params = [s for s in settings for _ in ENGINE_PROMPTS]
    try:  # the learner's sampler goes in where every engine piece does: as an engine argument
        with check_model_folder() as folder, quiet_engine_logs(), \
                LLM(folder, **ENGINE_SETTINGS, sampler=LearnerSampler(sample)) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
    except CheckFailed as e:
        raise CheckFailed(f"inside the engine (LLM.generate): {e}") from None
    for j, (out, p) in enumerate(zip(outs, params)):
        want = stock[j % len(ENGINE_PROMPTS)]
        diff = token_mismatch(out.outputs[0].token_ids, want, "with your sampler",
                              "with the engine's own greedy sampler")
        if diff:
            raise CheckFailed(f"inside the engine: request {j} (prompt {out.prompt!r}, {describe(p)}): {diff}")
    return (f"plugged into the engine (LLM.generate, {len(prompts)} requests in one batch): greedy, "
            f"top_k=1 and tiny top_p requests give the stock engine's greedy tokens")


def check_sampling(sample: SampleFn, *, draws: int = 4000, verbose: bool = True) -> CheckResult:
    """Exercise 01: ``sample(logits, params, generator)`` picks the next token of each row.

    1. rows that must return the argmax (greedy, top_k=1, tiny top_p) do, mixed with sampled rows;
    2. on a batch of ``draws`` rows per setting, shuffled together: no token the filters remove, and
       the frequencies pass a chi-square test against the engine's distribution;
    3. plugged into the real engine as its sampler, greedy-equivalent requests give the stock
       engine's tokens.
    """
    return run_stages("check_sampling", [lambda: _stage_argmax(sample), lambda: _stage_distribution(sample, draws),
                                   lambda: _stage_engine(sample)], verbose)
