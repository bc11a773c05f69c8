"""Exercise checks. Each one plugs the learner's piece into the real engine, compares it with an
independent reference, prints ``ok`` per stage and then ``PASS``, or ``FAIL`` with the first failing
case in words, and returns a `CheckResult` (also appended to `HISTORY`, which the tests read).

A check never raises because the learner's code raised: that is reported as the failing case.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from minivllm.engine.policy import SchedulingPolicy
from minivllm.sampling_params import SamplingParams


@dataclass
class CheckResult:
    name: str
    passed: bool
    lines: list[str] = field(default_factory=list)  # one "ok ..." line per stage that passed
    failure: str | None = None                      # the first failing case, in words

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        last = f"PASS  {self.name}" if self.passed else f"FAIL  {self.name}: {self.failure}"
        return "\n".join(self.lines + [last])


HISTORY: list[CheckResult] = []


class CheckFailed(Exception):
    """Raised inside a check at the first failing case; its message is what the learner reads."""


def _run(name: str, stages: list[Callable[[], str]], verbose: bool) -> CheckResult:
    result = CheckResult(name, passed=False)
    try:
        for stage in stages:
            result.lines.append(f"ok    {stage()}")
        result.passed = True
    except CheckFailed as e:
        result.failure = str(e)
    HISTORY.append(result)
    if verbose:
        print(result)
    return result


# ==== exercise 01: sampling =======================================================================

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


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square test of ``counts`` against ``probs`` (tokens with probability 0
    excluded). Bins expected to hold fewer than ``min_expected`` draws are pooled into one."""
    keep = probs > 0
    counts, probs = counts[keep].double(), probs[keep].double()
    expected = probs * counts.sum()
    order = expected.argsort(descending=True)
    counts, expected = counts[order], expected[order]
    small = expected < min_expected
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    dof = len(counts) - 1
    if dof < 1:
        return 1.0
    stat = float(((counts - expected) ** 2 / expected).sum())
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


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
P_VALUE_THRESHOLD = 1e-4


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
                f"p {'< 1e-300' if pval < 1e-300 else f'= {pval:.1e}'}, below {P_VALUE_THRESHOLD:g}); token {worst} should come up "
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


@contextlib.contextmanager
def _quiet_engine_logs():
    logger = logging.getLogger("minivllm")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _check_model_folder():
    """The model the checks run: the course's target model when it is there, else a tiny random
    Qwen3 built offline (`minivllm.models.tiny`) in a folder removed afterwards."""
    from minivllm import course
    from minivllm.models.tiny import save_tiny_checkpoint

    try:
        folder = course.model_path("target")
    except FileNotFoundError:  # weights not trained yet
        folder = None
    if folder is not None:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="minivllm-check-") as tmp:
        yield save_tiny_checkpoint(tmp)


@functools.lru_cache(maxsize=1)
def check_engine():
    """The engine the checks plug into (see `_check_model_folder`), built once per process."""
    from minivllm import LLM

    with _check_model_folder() as folder, _quiet_engine_logs():
        return LLM(folder, max_model_len=256, max_num_seqs=16, seed=0)


ENGINE_PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "import os\nimport"]


def _stage_engine(sample: SampleFn, max_tokens: int = 16) -> str:
    llm = check_engine()
    runner = llm.llm_engine.model_runner
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    stock = [o.outputs[0].token_ids for o in llm.generate(ENGINE_PROMPTS, greedy, use_tqdm=False)]
    settings = [greedy, SamplingParams(temperature=0.8, top_k=1, max_tokens=max_tokens, ignore_eos=True),
                SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=max_tokens, ignore_eos=True)]
    prompts = [p for _ in settings for p in ENGINE_PROMPTS]
    params = [s for s in settings for _ in ENGINE_PROMPTS]
    original = runner.sampler
    runner.sampler = LearnerSampler(sample)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    except CheckFailed as e:
        raise CheckFailed(f"inside the engine (LLM.generate): {e}") from None
    finally:
        runner.sampler = original
    for j, (out, p) in enumerate(zip(outs, params)):
        want = stock[j % len(ENGINE_PROMPTS)]
        got = out.outputs[0].token_ids
        if got != want:
            pos = next((t for t, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise CheckFailed(
                f"inside the engine: request {j} (prompt {out.prompt!r}, {describe(p)}): output token "
                f"{pos} is {got[pos] if pos < len(got) else 'missing'} with your sampler, "
                f"{want[pos] if pos < len(want) else 'missing'} with the engine's own greedy sampler")
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
    return _run("check_sampling", [lambda: _stage_argmax(sample), lambda: _stage_distribution(sample, draws),
                                   lambda: _stage_engine(sample)], verbose)


# ==== exercise 02: the block manager ==============================================================

# A workload through every path of the allocation core: six requests share a system prompt (prefix-
# cache hits in the very step the first of them writes it); a cache of 28 blocks of 4 tokens is too
# small for all six, so the newest are preempted and recomputed later (hitting what is left of their
# own freed blocks); a second wave arrives while blocks are being freed (hits on cached blocks revived
# from the free queue, and evictions).
BM_SYSTEM_PROMPT = '"""Read and write configuration files."""\nimport os\nimport json\n\n'
BM_ARRIVALS = {0: ["def load(path):", "def save(path, data):", "class Config:", "def merge(a, b):",
                   "def validate(config):", "CONFIG_DIR ="],
               12: ["def load(path):", "class Config:", "def dump(config, path):"]}  # step -> prompts
BM_ENGINE_SETTINGS = dict(block_size=4, num_kv_blocks=28, max_model_len=128, max_num_seqs=8,
                          max_num_batched_tokens=64, seed=0)
BM_PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@dataclass
class BlockManagerRun:
    """What one run of the workload produced, as the engine recorded it."""

    trace: list  # the engine's StepRecords
    output_tokens: dict[str, list[int]]  # request id -> generated tokens
    prompts: dict[str, str]  # request id -> its prompt after the system prompt

    @property
    def num_preemptions(self) -> int:
        return sum(len(r.preempted) for r in self.trace)

    @property
    def num_cache_hits(self) -> int:
        return sum(len(r.blocks_cache_hit) for r in self.trace)


def _learner_method(cls: type, exc: BaseException) -> str:
    """The innermost method of ``cls`` (not of `BlockManagerBase`) that ``exc`` passed through."""
    from minivllm.engine.block_manager import BlockManagerBase

    own = {f.__code__: name for c in cls.__mro__ if c not in BlockManagerBase.__mro__
           for name, f in vars(c).items() if inspect.isfunction(f)}
    names = [own[frame.f_code] for frame, _ in traceback.walk_tb(exc.__traceback__) if frame.f_code in own]
    return f"{names[-1]}()" if names else "the engine"


def _run_workload(cls: type, stock: BlockManagerRun | None = None) -> BlockManagerRun:
    """Run the workload with ``cls`` as the engine's block manager and check the bookkeeping after
    every step; given the ``stock`` run, also compare the scheduler's decisions step by step.
    Raises `CheckFailed` at the first problem."""
    from minivllm import LLM

    try:
        with _check_model_folder() as folder, _quiet_engine_logs():
            llm = LLM(folder, block_manager_class=cls, **BM_ENGINE_SETTINGS)
    except ValueError as e:  # not a BlockManagerBase subclass: the message names the field
        raise CheckFailed(str(e)) from None
    except Exception as e:  # for example a method of the core left out (abstract)
        raise CheckFailed(f"the engine could not build your block manager: {type(e).__name__}: {e}") from None
    engine = llm.llm_engine
    seqs, prompts, tokens = {}, {}, {}
    step = 0
    while step <= max(BM_ARRIVALS) or engine.has_unfinished_requests():
        for suffix in BM_ARRIVALS.get(step, ()):
            rid = f"r{len(seqs)}"
            engine.add_request(rid, BM_SYSTEM_PROMPT + suffix, BM_PARAMS)
            seqs[rid], prompts[rid] = engine.requests[rid], suffix
        if stock is not None and step >= len(stock.trace):
            raise CheckFailed(f"after step {step - 1} the stock engine had finished every request; with "
                              f"your block manager {len(engine.requests)} are still unfinished")
        try:
            for out in engine.step():
                tokens[out.request_id] = out.outputs[0].token_ids
        except NotImplementedError as e:
            raise CheckFailed(f"step {step}: {_learner_method(cls, e)} raised NotImplementedError: replace "
                              "`# YOUR CODE HERE` and `raise NotImplementedError` with your code") from None
        except Exception as e:  # the learner's bug is the finding, not a crash of the check
            raise CheckFailed(f"step {step}: {_learner_method(cls, e)} raised {type(e).__name__}: {e}") from None
        _check_block_state(engine.block_manager, seqs, step)
        if stock is not None:
            _compare_step(engine.trace, stock.trace, step, engine.block_manager.num_blocks)
        step += 1
    return BlockManagerRun(engine.trace, tokens, prompts)


def _check_block_state(bm, seqs: dict, step: int) -> None:
    """Finished and waiting requests hold no blocks; the running ones pass the invariant check of
    `BlockManagerBase` (called on the base, so a subclass cannot replace it)."""
    from minivllm.engine.block_manager import BlockManagerBase
    from minivllm.engine.sequence import SequenceStatus

    for rid, seq in seqs.items():
        state = {SequenceStatus.FINISHED: "has finished",
                 SequenceStatus.WAITING: "was preempted" if seq.num_preemptions else "waits"}.get(seq.status)
        if state and seq.block_table:
            raise CheckFailed(f"after step {step}: request {rid} {state}, but still holds blocks "
                              f"{seq.block_table}: free() must empty its block table")
        if state and seq.num_computed_tokens:
            raise CheckFailed(f"after step {step}: request {rid} {state}, but its num_computed_tokens is "
                              f"{seq.num_computed_tokens}: free() must reset it to 0")
    running = [s for s in seqs.values() if s.status is SequenceStatus.RUNNING]
    try:
        BlockManagerBase.check_invariants(bm, running)
    except AssertionError as e:
        raise CheckFailed(f"after step {step}: {e}") from None
    except Exception as e:
        raise CheckFailed(f"after step {step}: the block manager's records are malformed "
                          f"({type(e).__name__}: {e})") from None


def _span(chunk: tuple[int, int] | None) -> str:
    if chunk is None:
        return "not at all"
    start, n = chunk
    return f"on token {start}" if n == 1 else f"on tokens {start}-{start + n - 1}"


def _compare_step(mine: list, stock: list, step: int, num_blocks: int) -> None:
    """The scheduler asks the block manager what is cached and what is free; with a block manager
    that answers like the stock one it makes the stock engine's decisions."""
    a, b = mine[step], stock[step]
    free_before = (mine[step - 1].num_free_blocks, stock[step - 1].num_free_blocks) if step else (num_blocks,) * 2
    hint = (f" (prefix-cache blocks hit in this step: {len(a.blocks_cache_hit)} with yours, "
            f"{len(b.blocks_cache_hit)} with the stock one; free blocks before it: {free_before[0]} with "
            f"yours, {free_before[1]} with the stock one)")
    if a.preempted != b.preempted:
        raise CheckFailed(f"step {step}: the scheduler preempted {list(a.preempted)} with your block manager, "
                          f"{list(b.preempted)} with the stock one" + hint)
    ca = {c.request_id: (c.start, c.num_tokens) for c in a.chunks}
    cb = {c.request_id: (c.start, c.num_tokens) for c in b.chunks}
    for rid in list(cb) + [r for r in ca if r not in cb]:
        if ca.get(rid) != cb.get(rid):
            raise CheckFailed(f"step {step}: the scheduler ran request {rid} {_span(ca.get(rid))} with your "
                              f"block manager, {_span(cb.get(rid))} with the stock one" + hint)
    if len(a.blocks_cache_hit) != len(b.blocks_cache_hit):
        raise CheckFailed(f"step {step}: the trace records {len(a.blocks_cache_hit)} prefix-cache block hits "
                          f"with your block manager, {len(b.blocks_cache_hit)} with the stock one: allocate() "
                          "records its hits in self.events.cache_hits")


@functools.lru_cache(maxsize=1)
def stock_block_manager_run() -> BlockManagerRun:
    """The workload run by the stock `BlockManager`: the reference, computed once per process."""
    from minivllm.engine.block_manager import BlockManager

    run = _run_workload(BlockManager)
    if not (run.num_preemptions and run.num_cache_hits):
        raise RuntimeError(f"the block-manager workload no longer exercises preemption ({run.num_preemptions}) "
                           f"and the prefix cache ({run.num_cache_hits} hits): adjust BM_ENGINE_SETTINGS")
    return run


def _stage_block_manager_steps(cls: type, runs: dict) -> str:
    stock = stock_block_manager_run()
    runs["mine"] = _run_workload(cls, stock)
    bs, n = BM_ENGINE_SETTINGS["block_size"], BM_ENGINE_SETTINGS["num_kv_blocks"]
    return (f"the engine ran {len(stock.trace)} steps with your block manager ({len(stock.prompts)} requests "
            f"sharing a system prompt, {n} KV blocks of {bs} tokens): after every step the block tables, "
            f"ref counts, free queue and hashes were consistent, and the scheduler made the stock engine's "
            f"decisions ({stock.num_preemptions} preemptions, {stock.num_cache_hits} prefix-cache block hits)")


def _stage_block_manager_tokens(runs: dict) -> str:
    mine, stock = runs["mine"], stock_block_manager_run()
    for rid, want in stock.output_tokens.items():
        got = mine.output_tokens[rid]
        if got != want:
            pos = next(t for t, (x, y) in enumerate(zip(got, want)) if x != y)
            raise CheckFailed(
                f"request {rid} (prompt ending {mine.prompts[rid]!r}): output token {pos} is {got[pos]} with "
                f"your block manager, {want[pos]} with the stock one, so the model read K/V from a block "
                "that does not hold this request's tokens")
    return (f"all {len(stock.output_tokens)} requests generated the stock engine's {BM_PARAMS.max_tokens} "
            "greedy tokens, reading their K/V through your block tables")


def check_block_manager(cls: type, *, verbose: bool = True) -> CheckResult:
    """Exercise 02: ``cls`` subclasses `BlockManagerBase` with the learner's allocation core
    (``find_cached_prefix``, ``allocate``, ``append_slots``, ``free``).

    1. the real engine runs a workload with a shared system prompt, forced preemption and a second
       wave, with ``cls`` as its block manager (``LLM(..., block_manager_class=cls)``); after every
       step finished and waiting requests hold no blocks, the running ones pass
       `BlockManagerBase.check_invariants`, and the scheduler made the same decisions as with the
       stock `BlockManager`;
    2. every request's generated tokens equal the stock engine's.
    """
    runs: dict[str, BlockManagerRun] = {}
    return _run("check_block_manager", [lambda: _stage_block_manager_steps(cls, runs),
                                        lambda: _stage_block_manager_tokens(runs)], verbose)


# ==== exercise 04: the scheduling policy ==========================================================

# The engine workload: eight requests in two waves, four at most running, a 24-token budget (the
# longer prompts run in chunks, prefill shares steps with decodes) and a KV cache of 24 blocks of 4
# tokens, too small for four requests' outputs (preemption, then recompute).
SP_ARRIVALS = {0: ["import os\nimport sys\n\n\ndef main(argv):\n    \"\"\"Parse the command line and run.\"\"\"\n",
                   "def fibonacci(n):", "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
                   "    def push(self, item):", "def read_lines(path):\n    with open(path) as f:",
                   "for i in range(10):", "def merge(a, b):\n    result = dict(a)\n    for key, value in"],
               8: ["import json\n\n\ndef load(path):", "class Point:\n    def __init__(self, x, y):"]}
SP_ENGINE_SETTINGS = dict(block_size=4, num_kv_blocks=24, max_model_len=128, max_num_seqs=4,
                          max_num_batched_tokens=24, seed=0)
SP_PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
SP_MAX_STEPS_FACTOR = 4  # a run this many times longer than the stock one starves someone


@dataclass
class PolicyRun:
    """What one run of a workload produced under a policy."""

    trace: list  # StepRecords
    output_tokens: dict[str, list[int]]  # request id -> generated tokens (engine runs)
    throughput: float = 0.0  # output tokens per second of virtual time (simulator runs)

    @property
    def num_preemptions(self) -> int:
        return sum(len(r.preempted) for r in self.trace)

    @property
    def num_chunked_prefills(self) -> int:
        """Prefill chunks that stop short of the request's end of prompt: prompts split over steps."""
        return sum(1 for r in self.trace for c in r.chunks if c.is_prefill and c.sampled_token is None)


class AuditedPolicy(SchedulingPolicy):
    """Runs the learner's policy inside the scheduler and checks every step it decides: the token
    budget, ``max_num_seqs``, a request run twice, an empty step while requests are unfinished, a run
    far longer than the stock policy's (``max_steps``). Raises `CheckFailed` in words, naming
    ``where`` the policy runs."""

    def __init__(self, policy: SchedulingPolicy, where: str, max_steps: int | None):
        self.policy, self.where, self.max_steps, self.step = policy, where, max_steps, 0

    def schedule(self, s, out) -> None:
        at = f"{self.where}, step {self.step}"
        if self.max_steps is not None and self.step >= self.max_steps:
            raise CheckFailed(f"{at}: {len(s.running)} requests still run and {len(s.waiting)} wait, "
                              f"{SP_MAX_STEPS_FACTOR} times as many steps as the stock policies needed: your policy "
                              "starves some request (is it preempted and re-admitted over and over, or never "
                              "admitted?)")
        try:
            self.policy.schedule(s, out)
        except NotImplementedError:
            raise CheckFailed(f"{at}: schedule() raised NotImplementedError: replace `# YOUR CODE HERE` and "
                              "`raise NotImplementedError` with your code") from None
        except Exception as e:  # the learner's bug is the finding, not a crash of the check
            raise CheckFailed(f"{at}: your policy raised {type(e).__name__}: {e}") from None
        ids = [c.seq.request_id for c in out.chunks]
        if out.num_batched_tokens > s.max_num_batched_tokens:
            parts = ", ".join(f"{c.seq.request_id}: {c.num_new_tokens}" for c in out.chunks)
            raise CheckFailed(f"{at}: your policy scheduled {out.num_batched_tokens} tokens ({parts}), more than "
                              f"the budget max_num_batched_tokens={s.max_num_batched_tokens}")
        if len(s.running) > s.max_num_seqs:
            raise CheckFailed(f"{at}: {len(s.running)} requests are running after your policy's step, more than "
                              f"max_num_seqs={s.max_num_seqs}")
        if len(set(ids)) < len(ids):
            twice = next(r for r in ids if ids.count(r) > 1)
            raise CheckFailed(f"{at}: your policy ran request {twice} twice in one step")
        if out.is_empty and s.has_unfinished():
            raise CheckFailed(
                f"{at}: your policy scheduled nothing while {len(s.running)} requests run and {len(s.waiting)} "
                f"wait ({s.block_manager.num_free_blocks} free KV blocks): the engine cannot go on. When a running "
                "request cannot get a block, preempt another one (scheduler.preempt) to free its blocks")
        self.step += 1


def _audited(policy, where: str, max_steps: int | None) -> AuditedPolicy:
    if not isinstance(policy, SchedulingPolicy):
        hint = f" (pass an instance: {policy.__name__}())" if isinstance(policy, type) else ""
        raise CheckFailed(f"policy={policy!r} must be an instance of a SchedulingPolicy subclass{hint}")
    return AuditedPolicy(policy, where, max_steps)


def _run_engine_policy(policy, stock: PolicyRun | None = None) -> PolicyRun:
    """The engine workload under ``policy`` (audited every step); raises `CheckFailed`."""
    from minivllm import LLM

    where = "in the engine"
    audited = _audited(policy, where, len(stock.trace) * SP_MAX_STEPS_FACTOR if stock else None)
    with _check_model_folder() as folder, _quiet_engine_logs():
        llm = LLM(folder, batching_policy=audited, **SP_ENGINE_SETTINGS)
    engine = llm.llm_engine
    seqs, tokens, step = {}, {}, 0
    while step <= max(SP_ARRIVALS) or engine.has_unfinished_requests():
        for prompt in SP_ARRIVALS.get(step, ()):
            rid = f"r{len(seqs)}"
            engine.add_request(rid, prompt, SP_PARAMS)
            seqs[rid] = engine.requests[rid]
        try:
            for out in engine.step():
                tokens[out.request_id] = out.outputs[0].token_ids
        except CheckFailed:
            raise
        except Exception as e:  # for example the block manager, out of blocks
            raise CheckFailed(f"{where}, step {step}: {type(e).__name__}: {e}") from None
        _check_block_state(engine.block_manager, seqs, step)
        step += 1
    return PolicyRun(engine.trace, tokens)


@functools.lru_cache(maxsize=1)
def stock_policy_engine_run() -> PolicyRun:
    """The engine workload under the stock continuous policy: the reference, computed once per process."""
    from minivllm.engine.policy import ContinuousBatching

    run = _run_engine_policy(ContinuousBatching())
    if not (run.num_preemptions and run.num_chunked_prefills):
        raise RuntimeError(f"the policy workload no longer exercises preemption ({run.num_preemptions}) and "
                           f"chunked prefill ({run.num_chunked_prefills}): adjust SP_ENGINE_SETTINGS")
    return run


def _stage_policy_engine(policy) -> str:
    stock = stock_policy_engine_run()
    mine = _run_engine_policy(policy, stock)
    for rid, want in stock.output_tokens.items():
        got = mine.output_tokens[rid]
        if got != want:
            pos = next((t for t, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
            raise CheckFailed(f"in the engine: request {rid}: output token {pos} is "
                              f"{got[pos] if pos < len(got) else 'missing'} with your policy, {want[pos]} with "
                              "the stock one (greedy decoding does not depend on the schedule: did a chunk skip "
                              "or repeat prompt tokens?)")
    s = SP_ENGINE_SETTINGS
    return (f"the engine ran {len(stock.output_tokens)} requests in {len(mine.trace)} steps with your policy "
            f"({len(stock.trace)} with the stock one; max_num_seqs={s['max_num_seqs']}, budget "
            f"{s['max_num_batched_tokens']} tokens, {s['num_kv_blocks']} KV blocks of {s['block_size']} tokens): "
            f"budget, max_num_seqs and block bookkeeping held after every step ({mine.num_preemptions} "
            f"preemptions, {mine.num_chunked_prefills} partial prompt chunks), and every request generated the "
            f"stock engine's {SP_PARAMS.max_tokens} greedy tokens")


# The simulator workload: chapter 04's balanced workload at GPU scale, with a KV cache cut to 600
# blocks (9,600 tokens) so that the policy has to preempt there too.
SP_SIM_REQUESTS = dict(name="balanced", num_requests=120, request_rate=8.0)
SP_SIM_SETTINGS = dict(max_num_seqs=32, num_kv_blocks=600)


def _run_sim_policy(policy: SchedulingPolicy | str) -> PolicyRun:
    from minivllm.sim import SimConfig, Simulator, compute_metrics, get_hardware, get_model, preset

    config = SimConfig(get_model("Llama-3.1-8B"), get_hardware("H100-SXM"), **SP_SIM_SETTINGS,
                       batching_policy=policy)
    result = Simulator(config).run(preset(**SP_SIM_REQUESTS).generate())
    metrics = compute_metrics(result.trace, result.arrival_times)
    return PolicyRun(result.trace, {}, metrics.output_throughput)


@functools.lru_cache(maxsize=2)
def stock_policy_sim_run(name: str) -> PolicyRun:
    """The simulator workload under a stock policy (``continuous`` or ``static``), once per process."""
    return _run_sim_policy(name)


def _stage_policy_sim(policy) -> str:
    continuous, static = stock_policy_sim_run("continuous"), stock_policy_sim_run("static")
    max_steps = SP_MAX_STEPS_FACTOR * max(len(continuous.trace), len(static.trace))
    mine = _run_sim_policy(_audited(policy, "in the simulator", max_steps))
    n = SP_SIM_REQUESTS["num_requests"]
    if mine.throughput <= static.throughput:
        raise CheckFailed(f"in the simulator: your policy's output throughput is {mine.throughput:.0f} tokens/s, "
                          f"no better than static batching's {static.throughput:.0f} (stock continuous batching: "
                          f"{continuous.throughput:.0f}): admit waiting requests while the running ones decode")
    return (f"the simulator ran {n} requests (Llama-3.1-8B on an H100, {SP_SIM_SETTINGS['num_kv_blocks']} KV blocks) "
            f"with your policy: {mine.throughput:.0f} output tokens/s, {mine.throughput / static.throughput:.2f}x "
            f"static batching, {mine.throughput / continuous.throughput:.2f}x the stock continuous policy "
            f"({mine.num_preemptions} preemptions)")


def check_scheduling_policy(policy, *, verbose: bool = True) -> CheckResult:
    """Exercise 04: ``policy``, an instance of a `SchedulingPolicy` subclass, decides each step.

    1. the real engine runs a workload of eight requests in two waves with ``policy`` as its
       ``batching_policy``, with chunked prompts, a cap of four running requests and a cache too
       small for them; every step stays within the token budget and ``max_num_seqs``, runs no
       request twice and schedules something while requests are unfinished; after every step the
       block manager's bookkeeping holds; every request generates the stock engine's greedy tokens;
    2. the simulator runs chapter 04's balanced workload at GPU scale under the same per-step audit,
       and the policy's output throughput must beat static batching's.
    """
    return _run("check_scheduling_policy", [lambda: _stage_policy_engine(policy),
                                            lambda: _stage_policy_sim(policy)], verbose)


# ==== exercise 06: the paged decode kernel =========================================================

DecodeFn = Callable[..., torch.Tensor]

# (what the case is, context lengths, query heads per KV head, head size, block size, query scale);
# none is the exercise notebook's own example. The last one's scores come near 100: exp() of them
# overflows float32 unless the running maximum is subtracted.
DECODE_CASES = [
    ("one sequence of 11 tokens in blocks of 16, 1 query head per KV head", [11], 1, 16, 16, 1.0),
    ("one sequence of 50 tokens over 4 blocks of 16 in shuffled order", [50], 2, 32, 16, 1.0),
    ("5 sequences of ragged lengths, 4 query heads per KV head, blocks of 16", [1, 33, 100, 7, 16], 4, 32, 16, 1.0),
    ("3 sequences, 8 query heads per KV head, blocks of 1 token", [3, 20, 9], 8, 16, 1, 1.0),
    ("2 sequences in blocks of 32, head size 64, scores near 100", [70, 31], 2, 64, 32, 40.0),
]


def _decode_device() -> torch.device:
    """Where the learner's Triton kernel runs: the CPU in the interpreter, else the GPU."""
    import os

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return torch.device("cpu" if interpret or not torch.cuda.is_available() else "cuda")


def _not_implemented(e: BaseException) -> bool:
    """Whether ``e`` is, or wraps, the skeleton's NotImplementedError (the Triton interpreter re-raises
    a kernel's exception as an ``InterpreterError``)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, NotImplementedError) or "NotImplementedError" in repr(e):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _stage_decode_case(decode: DecodeFn, case: tuple, seed: int) -> str:
    from minivllm.kernels.reference import varlen_paged_attention

    what, context_lens, group, head_dim, block_size, q_scale = case
    kv_heads, device = 2, _decode_device()
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(need) + 2  # two spare blocks of noise that no table points to
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in need:
        tables.append(order[used:used + n] + [order[-1]] * (max(need) - n))  # padded with a noise block
        used += n
    k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=g)
    q = q_scale * torch.randn(len(context_lens), kv_heads * group, head_dim, generator=g)
    block_tables = torch.tensor(tables, dtype=torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    scale = head_dim ** -0.5
    ones = torch.ones(len(context_lens), dtype=torch.int32)
    want = varlen_paged_attention(q, k_cache, v_cache, block_tables, lens, torch.arange(len(context_lens)),
                                  ones, scale, block_size)
    args = [t.to(device) for t in (q, k_cache, v_cache, block_tables, lens)]
    try:
        got = decode(*args, scale, block_size)
    except Exception as e:  # the learner's bug is the finding, not a crash of the check
        if _not_implemented(e):
            raise CheckFailed("your kernel raised NotImplementedError: replace `# YOUR CODE HERE` and "
                              "`raise NotImplementedError` with the loop body") from None
        raise CheckFailed(f"{what}: your kernel raised {type(e).__name__}: {e}") from None
    if not isinstance(got, torch.Tensor) or got.shape != q.shape:
        shape = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise CheckFailed(f"{what}: the output is {shape}, expected {list(q.shape)} [sequences, heads, head size]")
    got = got.float().cpu()
    bad = ~torch.isclose(got, want, atol=1e-4, rtol=1e-4)
    if bad.any():
        s, h, d = bad.nonzero()[0].tolist()
        hint = (" (not a number: exp() of a large score overflowed; subtract the running maximum)"
                if not torch.isfinite(got[s, h]).all() else "")
        raise CheckFailed(f"{what}: sequence {s} (context {context_lens[s]}), query head {h}: output[{d}] is "
                          f"{got[s, h, d].item():.5f}, the reference gives {want[s, h, d].item():.5f}{hint}")
    return f"{what}: matches the reference"


def check_paged_decode(decode: DecodeFn, *, verbose: bool = True) -> CheckResult:
    """Exercise 06: ``decode(q, k_cache, v_cache, block_tables, context_lens, scale, block_size)``
    returns the attention of each sequence's one query (``q``: ``[seqs, heads, head_dim]``) over its
    ``context_lens[s]`` cached tokens (``k_cache``/``v_cache``: ``[slots, kv_heads, head_dim]``), found
    through ``block_tables[s]``. Each stage is a shape the notebook does not use, checked against
    `minivllm.kernels.reference.varlen_paged_attention` (float32, tolerance 1e-4)."""
    return _run("check_paged_decode", [lambda c=c, i=i: _stage_decode_case(decode, c, seed=100 + i)
                                       for i, c in enumerate(DECODE_CASES)], verbose)


# ==== exercise 07: the verification step of speculative decoding ==================================
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
                f"verifications of 2 drafts, the {name} does not follow the target's p = {VERIFY_P[j]} (chi-square p "
                f"{'< 1e-300' if pval < 1e-300 else f'= {pval:.1e}'}, below {P_VALUE_THRESHOLD:g}): {what}"
                + (f". Also: {outside}" if outside else ""))
        if outside:
            raise CheckFailed(outside)
    return (f"how often each position is reached, and the token that comes there (the first, the second after an "
            f"accepted draft, the bonus after two), follow the rule's exact distribution, with a draft model's q and "
            f"with draft_probs=None ({trials:,} verifications each, chi-square p > {P_VALUE_THRESHOLD:g}); no token "
            "the residual excludes was ever emitted")


@functools.lru_cache(maxsize=3)
def spec_check_engine(method: str | None):
    """The course target with ``method``'s speculation (None: none), built once per process."""
    from minivllm import LLM, course

    spec = method and {"method": method, "num_speculative_tokens": VERIFY_K,
                       **({"model": course.model_path("draft")} if method == "draft_model" else {})}
    with _quiet_engine_logs():
        return LLM(course.model_path("target"), max_model_len=256, max_num_seqs=16, seed=0, speculative_config=spec)


def _stage_verify_engine(verify: VerifyFn) -> str:
    want = [o.outputs[0].token_ids for o in spec_check_engine(None).generate(ENGINE_PROMPTS, VERIFY_GREEDY,
                                                                              use_tqdm=False)]
    accepted = {}
    for method in ("draft_model", "ngram"):
        engine = f"inside the engine ({method}, k={VERIFY_K})"
        decoder = spec_check_engine(method).llm_engine.spec_decoder

        def audited(draft_tokens, draft_probs, target_probs, generator=None):
            where = f"{engine}: drafts {draft_tokens}, {_q_kind(draft_probs)}"
            out = _call_verify(verify, draft_tokens, draft_probs, target_probs, generator, where)
            why = _outside_support(out, draft_tokens, draft_probs, target_probs)
            if why:
                raise CheckFailed(f"{where}: {why}")
            return out

        original, decoder.verify = decoder.verify, audited
        try:
            greedy = spec_check_engine(method).generate(ENGINE_PROMPTS, VERIFY_GREEDY, use_tqdm=False)
            spec_check_engine(method).generate(ENGINE_PROMPTS, VERIFY_SAMPLED, use_tqdm=False)
        except CheckFailed:
            raise
        except Exception as e:  # the engine choked on what verify() returned
            raise CheckFailed(f"{engine}: LLM.generate raised {type(e).__name__}: {e}") from None
        finally:
            decoder.verify = original
        for out, tokens in zip(greedy, want):
            got = out.outputs[0].token_ids
            if got != tokens:
                pos = next((t for t, (a, b) in enumerate(zip(got, tokens)) if a != b), min(len(got), len(tokens)))
                raise CheckFailed(
                    f"{engine}, greedy: prompt {out.prompt!r}: output token {pos} is "
                    f"{got[pos] if pos < len(got) else 'missing'} with your verify, "
                    f"{tokens[pos] if pos < len(tokens) else 'missing'} without speculation")
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
    return _run("check_rejection_sampler", [lambda: _stage_verify_contract(verify),
                                            lambda: _stage_verify_distribution(verify),
                                            lambda: _stage_verify_engine(verify)], verbose)


# ==== exercise 08: the row-parallel linear layer ===================================================
# The learner writes two functions: ``input_shard(x, rank, world_size)``, the slice of the layer's
# input that a rank multiplies, and ``row_parallel_forward(self, x)``, the forward of
# `minivllm.layers.linear.RowParallelLinear` on that slice. The check runs them in two gloo processes:
# each rank builds the stock layer, loads its shard of the full weight with the stock
# ``weight_loader``, swaps in the learner's forward as ``RowParallelLinear.forward`` and calls the
# layer, so the learner's code runs where the engine runs its own.
#
# Spawned processes start empty, and a function defined in a notebook cell lives in ``__main__``,
# which they cannot import (pickle sends functions by their module and name). So the check sends
# the forward's *source* (`inspect.getsource`) and each rank executes it in a namespace holding
# what the layer's own module imports (`ROW_PARALLEL_NAMESPACE`): the learner's function must use
# only those names. ``input_shard`` runs in this process, so it needs no such care.

ROW_PARALLEL_WORLD = 2
# (what the case is, input shape, output features, bias); none is the exercise notebook's own example.
ROW_PARALLEL_CASES = [
    ("1 token, 8 -> 4 features, no bias", (1, 8), 4, False),
    ("5 tokens, 16 -> 12 features, with bias", (5, 16), 12, True),
    ("2 x 3 tokens (a 3-D input), 32 -> 8 features, with bias", (2, 3, 32), 8, True),
    ("7 tokens, 64 -> 48 features, no bias", (7, 64), 48, False),
]
ROW_PARALLEL_NAMESPACE = "import torch\nimport torch.distributed as dist\nimport torch.nn.functional as F\n" \
                         "from torch import nn\nfrom minivllm.distributed.parallel_state import tensor_parallel_group\n"
ROW_PARALLEL_TIMEOUT_S = 60.0  # the whole run: two fresh processes import torch, then a few tiny matmuls
ROW_PARALLEL_STRAGGLER_S = 10.0  # once one rank has answered, how long the other may take


def _row_parallel_rank(rank: int, init_method: str, source: str, name: str, cases: list, conn) -> None:
    """One rank of the check (runs in a spawned process): the stock layer with the learner's
    forward. Sends ``("done", [(output, all_reduce calls)] per case)`` or ``("raised", case, what,
    whether it is the skeleton's NotImplementedError)``."""
    import torch.distributed as dist

    from minivllm.distributed.comm import count_collectives
    from minivllm.layers.linear import RowParallelLinear

    torch.set_num_threads(1)
    case = None
    try:
        namespace: dict = {}
        exec(ROW_PARALLEL_NAMESPACE, namespace)
        exec(compile(source, f"<your {name}>", "exec"), namespace)
        RowParallelLinear.forward = namespace[name]
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=ROW_PARALLEL_WORLD)
        outputs = []
        for case, (x, weight, bias) in enumerate(cases):
            layer = RowParallelLinear(weight.shape[1], weight.shape[0], bias is not None, rank, ROW_PARALLEL_WORLD)
            layer.weight_loader(layer.weight, weight)
            if bias is not None:
                layer.weight_loader(layer.bias, bias)
            with count_collectives() as counts, torch.no_grad():
                y = layer(x)
            # numpy arrays travel by value; a tensor would travel as shared memory this process frees on exit
            outputs.append((y.numpy() if isinstance(y, torch.Tensor) else y, counts.get("all_reduce", [0, 0])[0]))
        conn.send(("done", outputs))
    except BaseException as e:  # the learner's bug is the finding: report it, never a bare traceback
        conn.send(("raised", case, f"{type(e).__name__}: {e}", _not_implemented(e)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _row_parallel_data(case: tuple, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    _, shape, out_features, bias = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    weight = torch.randn(out_features, shape[-1], generator=g)
    return x, weight, torch.randn(out_features, generator=g) if bias else None


def _learner_source(fn: Callable, what: str) -> str:
    import textwrap

    if not callable(fn) or not hasattr(fn, "__code__") or fn.__name__ == "<lambda>":
        raise CheckFailed(f"{what}={fn!r} must be a function defined with `def`")
    try:
        return textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        raise CheckFailed(f"the source of {what} ({fn.__name__}) cannot be read: define it with `def` in a "
                          "notebook cell or a .py file") from None


def _stage_input_shard(input_shard: Callable, cases: list) -> str:
    """Each rank's input slice must be the input features its weight shard multiplies: the stock
    ``weight_loader`` gives rank r the weight's columns r*k .. (r+1)*k - 1."""
    for (what, *_), (x, _, _) in zip(ROW_PARALLEL_CASES, cases):
        k = x.shape[-1] // ROW_PARALLEL_WORLD
        for rank in range(ROW_PARALLEL_WORLD):
            want = x[..., rank * k:(rank + 1) * k]
            try:
                got = input_shard(x.clone(), rank, ROW_PARALLEL_WORLD)
            except Exception as e:  # the learner's bug is the finding, not a crash of the check
                if _not_implemented(e):
                    raise CheckFailed("input_shard() raised NotImplementedError: replace `# YOUR CODE HERE` and "
                                      "`raise NotImplementedError` with your code") from None
                raise CheckFailed(f"{what}: input_shard(x, rank={rank}, world_size={ROW_PARALLEL_WORLD}) raised "
                                  f"{type(e).__name__}: {e}") from None
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                shape = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise CheckFailed(f"{what}: input_shard(x, rank={rank}, world_size={ROW_PARALLEL_WORLD}) is {shape} "
                                  f"for x of shape {list(x.shape)}; expected {list(want.shape)}: the last "
                                  f"dimension (input features) split in {ROW_PARALLEL_WORLD}")
            if not torch.equal(got, want):
                raise CheckFailed(
                    f"wrong shard slicing: {what}: input_shard(x, rank={rank}, world_size={ROW_PARALLEL_WORLD}) "
                    f"is not input features {rank * k}-{(rank + 1) * k - 1}, the weight columns rank {rank} holds "
                    f"(the stock weight_loader gives rank r the contiguous columns r*k .. (r+1)*k - 1)")
    return (f"input_shard gives each of {ROW_PARALLEL_WORLD} ranks the input features its weight shard "
            f"multiplies, in {len(cases)} shapes")


def _run_ranks(source: str, name: str, per_rank: list[list]) -> list[list]:
    """Run `_row_parallel_rank` in one spawned process per rank; each rank's [(output, calls)]."""
    import multiprocessing as mp
    import time
    from multiprocessing.connection import wait

    from minivllm.distributed.executor import _free_port, shutdown_workers

    ctx = mp.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    conns, procs = [], []
    for rank in range(ROW_PARALLEL_WORLD):
        parent, child = ctx.Pipe()
        procs.append(ctx.Process(target=_row_parallel_rank, daemon=True,
                                 args=(rank, init_method, source, name, per_rank[rank], child)))
        procs[-1].start()
        child.close()
        conns.append(parent)
    replies: dict[int, tuple] = {}
    deadline = time.monotonic() + ROW_PARALLEL_TIMEOUT_S
    try:
        while len(replies) < ROW_PARALLEL_WORLD:
            ready = wait([c for r, c in enumerate(conns) if r not in replies], max(0.0, deadline - time.monotonic()))
            if not ready:
                waiting = [r for r in range(ROW_PARALLEL_WORLD) if r not in replies]
                answered = f" after rank {next(iter(replies))} had finished" if replies else ""
                raise CheckFailed(
                    f"rank {waiting[0]} did not finish{answered}: it is waiting in a collective that the other rank "
                    f"never called (every rank must call dist.all_reduce the same number of times)")
            for conn in ready:
                rank = conns.index(conn)
                try:
                    replies[rank] = conn.recv()
                except EOFError:
                    raise CheckFailed(f"rank {rank}'s process died (exit code {procs[rank].exitcode}) while "
                                      "running your forward") from None
                if replies[rank][0] == "raised":
                    _, case, what, not_implemented = replies[rank]
                    if not_implemented:
                        raise CheckFailed("row_parallel_forward() raised NotImplementedError: replace "
                                          "`# YOUR CODE HERE` and `raise NotImplementedError` with your code")
                    where = f"{ROW_PARALLEL_CASES[case][0]}: " if case is not None else ""
                    done = [r for r, reply in replies.items() if reply[0] == "done"]
                    if done:  # its peer had left: it was waiting in a collective the peer never called
                        raise CheckFailed(f"{where}rank {rank} was still waiting in a collective when rank {done[0]} "
                                          "had finished (every rank must call dist.all_reduce the same number "
                                          "of times)")
                    hint = (f" (the check runs your function from its source alone in fresh processes: it may use "
                            f"torch, dist, F, nn and tensor_parallel_group, and no other name of your notebook)"
                            if what.startswith("NameError") else "")
                    raise CheckFailed(f"{where}rank {rank}: your forward raised {what}{hint}")
                deadline = min(deadline, time.monotonic() + ROW_PARALLEL_STRAGGLER_S)
    finally:
        shutdown_workers(procs, conns)
    return [replies[r][1] for r in range(ROW_PARALLEL_WORLD)]


def _stage_row_parallel_forward(forward: Callable, input_shard: Callable, cases: list) -> str:
    import numpy as np

    source = _learner_source(forward, "row_parallel_forward")
    world = ROW_PARALLEL_WORLD
    per_rank = [[(input_shard(x.clone(), r, world), w, b) for x, w, b in cases] for r in range(world)]
    results = _run_ranks(source, forward.__name__, per_rank)
    for i, ((what, *_), (x, weight, bias)) in enumerate(zip(ROW_PARALLEL_CASES, cases)):
        want = F.linear(x, weight, bias)  # the unsplit layer
        for rank in range(world):
            got, calls = results[rank][i]
            got = torch.from_numpy(got) if isinstance(got, np.ndarray) else got
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                shape = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise CheckFailed(f"{what}: rank {rank}'s output is {shape}, expected {list(want.shape)}")
            if torch.allclose(got, want, atol=1e-4, rtol=1e-4):
                continue
            if calls == 0:
                raise CheckFailed(f"missing all-reduce: {what}: rank {rank} never called dist.all_reduce, so its "
                                  "output is only its own partial sum; sum the ranks' partial outputs")
            if bias is not None and torch.allclose(got, want + (world - 1) * bias, atol=1e-4, rtol=1e-4):
                raise CheckFailed(f"bias added on every rank: {what}: the output holds the bias {world} times, "
                                  f"once per rank, as the all-reduce sums it too; add it on rank 0 only")
            d = int((got - want).abs().flatten().argmax())
            raise CheckFailed(f"{what}: rank {rank}'s output[{d}] (flattened) is {got.flatten()[d]:.5f}, the unsplit "
                              f"layer gives {want.flatten()[d]:.5f} (your forward called dist.all_reduce {calls} "
                              f"time{'s' * (calls != 1)})")
    return (f"in {world} gloo processes, the stock RowParallelLinear with your forward equals the unsplit "
            f"layer (F.linear on the full weight) on every rank, in {len(cases)} shapes with and without bias")


def check_row_parallel_linear(row_parallel_forward: Callable, input_shard: Callable, *,
                              verbose: bool = True) -> CheckResult:
    """Exercise 08: ``input_shard(x, rank, world_size)`` is the slice of the input ``x`` that rank
    ``rank`` multiplies, and ``row_parallel_forward(self, x)`` the forward of a
    `RowParallelLinear` (``self.weight``: this rank's columns of the weight, ``self.bias``: the whole
    bias or None, ``self.tp_rank``, ``self.tp_size``) on that slice.

    1. ``input_shard`` matches the columns the stock weight loader gives each rank;
    2. in two gloo processes (spawned, 127.0.0.1), the stock layer with ``row_parallel_forward`` as
       its forward gives every rank the unsplit layer's output (F.linear on the full weight), for
       several shapes with and without bias. The forward is sent by its source (see above)."""
    cases = [_row_parallel_data(c, seed=800 + i) for i, c in enumerate(ROW_PARALLEL_CASES)]
    return _run("check_row_parallel_linear",
                [lambda: _stage_input_shard(input_shard, cases),
                 lambda: _stage_row_parallel_forward(row_parallel_forward, input_shard, cases)], verbose)


__all__ = ["BlockManagerRun", "CheckFailed", "CheckResult", "HISTORY", "LearnerSampler", "check_block_manager",
           "check_engine", "check_paged_decode", "check_rejection_sampler", "check_row_parallel_linear",
           "check_sampling", "chi_square_pvalue", "describe", "reference_probs", "spec_check_engine",
           "stock_block_manager_run"]
