"""The check of exercise 02: the block manager."""
from __future__ import annotations

import functools
import inspect
import traceback
from dataclasses import dataclass

from minivllm.course.checks.base import (
    check_model_folder, CheckFailed, CheckResult, quiet_engine_logs, run_stages, token_mismatch)
from minivllm.sampling_params import SamplingParams

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
    from minivllm.core.block_manager import BlockManagerBase

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
        with check_model_folder() as folder, quiet_engine_logs():
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
        check_block_state(engine.block_manager, seqs, step)
        if stock is not None:
            _compare_step(engine.trace, stock.trace, step, engine.block_manager.num_blocks)
        step += 1
    return BlockManagerRun(engine.trace, tokens, prompts)


def check_block_state(bm, seqs: dict, step: int) -> None:
    """Finished and waiting requests hold no blocks; the running ones pass the invariant check of
    `BlockManagerBase` (called on the base, so a subclass cannot replace it)."""
    from minivllm.core.block_manager import BlockManagerBase
    from minivllm.core.sequence import SequenceStatus

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
    from minivllm.core.block_manager import BlockManager

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
        diff = token_mismatch(mine.output_tokens[rid], want, "with your block manager", "with the stock one")
        if diff:
            raise CheckFailed(f"request {rid} (prompt ending {mine.prompts[rid]!r}): {diff}, so the model read "
                              "K/V from a block that does not hold this request's tokens")
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
    return run_stages("check_block_manager", [lambda: _stage_block_manager_steps(cls, runs),
                                        lambda: _stage_block_manager_tokens(runs)], verbose)
