"""The check of exercise 04: the scheduling policy."""
from __future__ import annotations

import functools
from dataclasses import dataclass

from minivllm.core.policy import SchedulingPolicy
from minivllm.course.checks.base import (
    check_model_folder, CheckFailed, CheckResult, quiet_engine_logs, run_stages, token_mismatch)
from minivllm.course.checks.block_manager import check_block_state
from minivllm.sampling_params import SamplingParams

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
    with check_model_folder() as folder, quiet_engine_logs():
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
        check_block_state(engine.block_manager, seqs, step)
        step += 1
    return PolicyRun(engine.trace, tokens)


@functools.lru_cache(maxsize=1)
def stock_policy_engine_run() -> PolicyRun:
    """The engine workload under the stock continuous policy: the reference, computed once per process."""
    from minivllm.core.policy import ContinuousBatching

    run = _run_engine_policy(ContinuousBatching())
    if not (run.num_preemptions and run.num_chunked_prefills):
        raise RuntimeError(f"the policy workload no longer exercises preemption ({run.num_preemptions}) and "
                           f"chunked prefill ({run.num_chunked_prefills}): adjust SP_ENGINE_SETTINGS")
    return run


def _stage_policy_engine(policy) -> str:
    stock = stock_policy_engine_run()
    mine = _run_engine_policy(policy, stock)
    for rid, want in stock.output_tokens.items():
        diff = token_mismatch(mine.output_tokens[rid], want, "with your policy", "with the stock one")
        if diff:
            raise CheckFailed(f"in the engine: request {rid}: {diff} (greedy decoding does not depend on the "
                              "schedule: did a chunk skip or repeat prompt tokens?)")
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
    return run_stages("check_scheduling_policy", [lambda: _stage_policy_engine(policy),
                                            lambda: _stage_policy_sim(policy)], verbose)
