"""The engine in virtual time: the real Scheduler and BlockManager, a cost model instead of a GPU.

`Simulator.run` feeds a workload's requests to the scheduler as the virtual clock reaches their
arrival times and runs the engine's own step (`minivllm.core.step.run_step`): the scheduler
decides, the cost model says how long the step took, every sampled token is a dummy, and a request
ends at its workload output length (as with ``ignore_eos``). The trace is a list of the same
`StepRecord` the real engine writes.

The deployment is a `ParallelLayout`: each of its ``dp`` replicas is one engine (its own scheduler
and KV cache) on ``tp x pp`` GPUs, whose steps `DeploymentCost` prices; the planner (`plan_layout`)
sizes the cache from the same weights, activations and KV bytes per GPU it reports. A router sends
each arriving request to the replica with the fewest outstanding tokens (the engine's
`DataParallelEngine` rule); replicas step independently, each on its own clock, and events are taken
in time order. With speculative decoding (`SimSpeculation`) the scheduler reserves draft slots as
in the engine and each draft is accepted with the given probability.
"""
from __future__ import annotations

import gc
import random
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from minivllm.config.cache import CacheConfig
from minivllm.config.parts import split_args
from minivllm.config.scheduler import SchedulerConfig
from minivllm.core.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from minivllm.core.sequence import Sequence, check_request_fits
from minivllm.core.step import run_step
from minivllm.core.trace import StepRecord, StepRecorder
from minivllm.sampling_params import SamplingParams
from minivllm.sim.deployment import DeploymentCost, StepCost
from minivllm.sim.hardware import Hardware
from minivllm.sim.model_specs import ModelSpec
from minivllm.sim.planner import LayoutPlan, ParallelLayout, plan_layout
from minivllm.sim.speculation import SimSpeculation
from minivllm.sim.workload import Request

DUMMY_TOKEN = 0
NOTHING_RAN = StepCost(0.0, 0.0, 0.0, 0.0, 0.0, 1)  # the cost of a step that scheduled nothing


class SimConfig:
    """The engine settings the simulator honours, in the engine's own parts (`CacheConfig`,
    `SchedulerConfig`) with the same flat names, defaults and checks:
    ``SimConfig(model, hardware, max_num_seqs=64, block_size=32)``. ``dtype`` is the weights' on the
    simulated GPU (``"bf16"``, ``"fp16"``, ``"fp8"``, ``"fp32"``), ``kv_cache_dtype`` the KV cache's
    (``"auto"``: the same); ``layout`` the GPUs (TP, PP, DP; EP for MoE models); ``cuda_graphs=False``
    runs eager (a kernel launch per kernel); ``speculative`` turns on speculative decoding."""

    def __init__(self, model: ModelSpec, hardware: Hardware, dtype: str = "bf16", *,
                 layout: ParallelLayout = ParallelLayout(), kv_cache_dtype: str = "auto", cuda_graphs: bool = True,
                 speculative: SimSpeculation | None = None, **engine_args):
        parts = split_args(engine_args, {"cache_config": CacheConfig, "scheduler_config": SchedulerConfig},
                           [], "SimConfig")
        if "kv_cache_memory" in engine_args:
            raise ValueError("kv_cache_memory is the CPU engine's; the simulator sizes the cache from "
                             "gpu_memory_utilization or num_kv_blocks")
        if not isinstance(layout, ParallelLayout):
            raise ValueError(f"layout={layout!r} must be a ParallelLayout")
        if speculative is not None and not isinstance(speculative, SimSpeculation):
            raise ValueError(f"speculative={speculative!r} must be a SimSpeculation or None")
        self.model, self.hardware, self.dtype, self.kv_cache_dtype = model, hardware, dtype, kv_cache_dtype
        self.layout, self.cuda_graphs, self.speculative = layout, cuda_graphs, speculative
        self.cache_config = CacheConfig(**parts["cache_config"])
        self.scheduler_config = SchedulerConfig(**parts["scheduler_config"])
        self.max_model_len = self.scheduler_config.resolve_max_model_len(
            model.max_model_len, limit_name=f"{model.name} max_model_len")

    def plan(self) -> LayoutPlan:
        """The planner's view of this deployment: memory per GPU and the KV tokens a replica holds,
        with room kept for the profiled forward pass of a full token budget."""
        sched = self.scheduler_config
        return plan_layout(self.model, self.hardware, self.layout, dtype=self.dtype,
                           kv_cache_dtype=self.kv_cache_dtype, context_len=self.max_model_len,
                           gpu_memory_utilization=self.cache_config.gpu_memory_utilization,
                           max_num_batched_tokens=sched.max_num_batched_tokens, max_num_seqs=sched.max_num_seqs)

    def __repr__(self) -> str:
        extras = "".join(f", {name}={getattr(self, name)}" for name, default in _REPR_DEFAULTS.items()
                         if getattr(self, name) != default)
        return (f"SimConfig({self.model.name}, {self.hardware.name}, {self.dtype}, {self.cache_config}, "
                f"{self.scheduler_config}{extras})")


_REPR_DEFAULTS = {"layout": ParallelLayout(), "kv_cache_dtype": "auto", "cuda_graphs": True, "speculative": None}


@dataclass
class SimResult:
    config: SimConfig
    num_blocks: int  # per replica
    trace: list[StepRecord]  # every replica's steps, by end time
    requests: list[Sequence]  # in arrival order, all finished
    arrival_times: dict[str, float] = field(default_factory=dict)
    step_costs: list[StepCost] = field(default_factory=list)  # aligned with trace
    step_replicas: list[int] = field(default_factory=list)  # the replica of each step, aligned with trace


@dataclass
class Replica:
    """One data-parallel replica: its scheduler (and block manager) and its virtual clock."""

    scheduler: Scheduler
    recorder: StepRecorder = field(default_factory=StepRecorder)
    now: float = 0.0
    steps: list[tuple[StepRecord, StepCost]] = field(default_factory=list)

    @property
    def outstanding_tokens(self) -> int:
        """The router's measure of its load (as `DataParallelEngine`'s)."""
        s = self.scheduler
        return sum(q.num_outstanding_tokens for q in s.running) + sum(q.num_outstanding_tokens for q in s.waiting)

    def add(self, seq: Sequence) -> None:
        """Queue an arriving request; an idle replica's clock jumps to its arrival."""
        if not self.scheduler.has_unfinished():
            self.now = max(self.now, seq.arrival_time)
        self.scheduler.add(seq)


def least_loaded(instances: list) -> int:
    """The index of the instance with the fewest ``outstanding_tokens`` (the first of equals): the
    router's choice."""
    return 0 if len(instances) == 1 else min(range(len(instances)), key=lambda j: instances[j].outstanding_tokens)


def merged_steps(replicas: list[Replica]) -> list[tuple[StepRecord, StepCost, int]]:
    """Every replica's steps by end time (then step number), each with its cost and its replica's index."""
    return sorted(((rec, cost, r) for r, rep in enumerate(replicas) for rec, cost in rep.steps),
                  key=lambda x: (x[0].end_time, x[0].step))


def check_arrival_order(seqs: list[Sequence]) -> None:
    """Refuse requests out of arrival order or with a request_id twice."""
    if any(a.arrival_time > b.arrival_time for a, b in zip(seqs, seqs[1:])):
        raise ValueError("requests must be sorted by arrival_time")
    if len({s.request_id for s in seqs}) < len(seqs):
        raise ValueError("request_id values must be unique")


def length_stop(stop_at: dict[Sequence, int]) -> Callable[[Sequence, int], bool]:
    """``run_step``'s ``check_stop`` for the engine's length stop (max_tokens or max_model_len), given
    as the total length each request stops at."""
    def check_stop(seq: Sequence, token: int) -> bool:
        if len(seq.token_ids) >= stop_at[seq]:
            seq.finish_reason = "length"
            return True
        return False

    return check_stop


class Simulator:
    def __init__(self, config: SimConfig):
        self.config = c = config
        self.plan = plan = c.plan()
        if min(plan.stage_kv_cache_bytes) <= 0:
            raise ValueError(plan.verdict)
        self.cost = DeploymentCost(plan, c.cuda_graphs)
        cache = c.cache_config
        if cache.num_kv_blocks is not None:
            self.num_blocks = cache.num_kv_blocks
        else:
            self.num_blocks = plan.kv_tokens // cache.block_size
            if c.max_model_len > self.num_blocks * cache.block_size:  # vLLM refuses to start, as here
                raise ValueError(f"max_model_len={c.max_model_len} is larger than the KV cache holds "
                                 f"({self.num_blocks * cache.block_size} tokens per replica): lower max_model_len, "
                                 "raise gpu_memory_utilization, or use more GPUs (TP or PP)")
        spec = c.speculative
        draft = spec.draft_for(c.model) if spec is not None else None
        self.draft_cost = None if draft is None else DeploymentCost(
            plan_layout(draft, c.hardware, ParallelLayout(tp=c.layout.tp), dtype=c.dtype,
                        context_len=min(draft.max_model_len, c.max_model_len), max_num_batched_tokens=None),
            c.cuda_graphs)
        self.now = 0.0
        self._rng: random.Random | None = None  # draft acceptance, seeded per run
        self.last_cost: StepCost | None = None

    def make_sequence(self, request: Request) -> Sequence:
        """A request as the engine would queue it; refuses (ValueError) what the engine refuses."""
        c, n = self.config, len(request.prompt_token_ids)
        try:
            if n < 1:
                raise ValueError("prompt_token_ids is empty: a request needs at least one token")
            check_request_fits(n, request.output_len, max_model_len=c.max_model_len,
                               block_size=c.cache_config.block_size, num_blocks=self.num_blocks)
        except ValueError as e:
            raise ValueError(f"request {request.request_id}: {e}") from None
        params = SamplingParams(max_tokens=request.output_len, ignore_eos=True)
        return Sequence(request.request_id, request.prompt_token_ids, params, arrival_time=request.arrival_time)

    def run(self, requests: list[Request]) -> SimResult:
        """Simulate ``requests`` (sorted by arrival time) to completion; returns the trace."""
        with collector_paused():
            return self._run(requests)

    def make_replica(self) -> Replica:
        c, cache = self.config, self.config.cache_config
        k = c.speculative.num_speculative_tokens if c.speculative else 0
        return Replica(c.scheduler_config.make_scheduler(cache.make_block_manager(self.num_blocks), c.max_model_len,
                                                          num_speculative_tokens=k))

    def _run(self, requests: list[Request]) -> SimResult:
        c = self.config
        seqs = [self.make_sequence(r) for r in requests]
        check_arrival_order(seqs)
        check_stop = length_stop({s: min(s.num_prompt_tokens + s.sampling_params.max_tokens, c.max_model_len)
                                  for s in seqs})
        self._rng = random.Random(c.speculative.seed) if c.speculative else None
        replicas = [self.make_replica() for _ in range(c.layout.dp)]
        i, num_steps = 0, 0
        while True:  # the earliest event next: an arrival, or the step of the replica whose clock is behind
            replica = min((r for r in replicas if r.scheduler.has_unfinished()), key=lambda r: r.now, default=None)
            if i < len(seqs) and (replica is None or seqs[i].arrival_time <= replica.now):
                replicas[least_loaded(replicas)].add(seqs[i])
                i += 1
                continue
            if replica is None:
                break
            self.step(replica, check_stop, num_steps)
            num_steps += 1
        steps = merged_steps(replicas)
        return SimResult(c, self.num_blocks, [s[0] for s in steps], seqs, {s.request_id: s.arrival_time for s in seqs},
                         [s[1] for s in steps], [s[2] for s in steps])

    def step(self, replica: Replica, check_stop: Callable[[Sequence, int], bool], index: int, *,
             allow_empty: bool = False) -> tuple[StepRecord, list[Sequence]]:
        """Run ``replica``'s next engine step (number ``index``) on its clock with this simulator's
        cost model; its record and cost go to ``replica.steps`` (an empty step, which ``allow_empty``
        permits, costs nothing). Returns the record and the requests it finished."""
        self.now = replica.now
        self.last_cost = NOTHING_RAN
        record, finished = run_step(replica.scheduler, self.execute, self.clock, check_stop, index, replica.recorder,
                                    allow_empty=allow_empty)
        replica.now = self.now
        replica.steps.append((record, self.last_cost))
        for seq in finished:
            seq.finished_time = record.end_time
        return record, finished

    def clock(self) -> float:
        return self.now

    def execute(self, out: SchedulerOutput) -> dict[Sequence, int | list[int]]:
        """Advance the virtual clock by the step's cost; a dummy token for every chunk that samples
        (with speculative decoding, the accepted drafts and one more)."""
        sampled: dict[Sequence, int | list[int]] = {}
        num_tokens = context = num_drafts = decoding = decode_context = 0
        pairs = 0.0
        for j, chunk in enumerate(out.chunks):
            n, start = chunk.num_new_tokens, chunk.start
            end = start + n
            num_tokens += n
            context += end
            pairs += n * (start + end + 1) / 2
            if not chunk.samples:
                slots = end - chunk.seq.num_tokens  # draft slots the scheduler reserved past the known tokens
                if slots > 0:
                    out.chunks[j] = chunk = _with_drafts(chunk, slots)
                    num_drafts += slots
            if chunk.samples:
                if chunk.draft_token_ids:
                    accepted = self.config.speculative.num_accepted(self._rng, len(chunk.draft_token_ids))
                    sampled[chunk.seq] = [DUMMY_TOKEN] * (accepted + 1)
                    decoding += 1
                    decode_context += end
                else:
                    sampled[chunk.seq] = DUMMY_TOKEN
        cost = self.cost.step_cost(len(out.chunks), num_tokens, len(sampled), context, pairs)
        if self.draft_cost is not None and decoding:
            k = self.config.speculative.num_speculative_tokens
            first = self.draft_cost.step_cost(len(out.chunks), num_tokens - num_drafts, len(sampled), context, pairs)
            rest = self.draft_cost.step_cost(decoding, decoding, decoding, decode_context, decode_context)
            cost = _plus_drafting(cost, first.time_s + (k - 1) * rest.time_s)
        self.last_cost = cost
        self.now += cost.time_s
        return sampled


def _with_drafts(chunk: ScheduledChunk, slots: int) -> ScheduledChunk:
    """The chunk carrying ``slots`` dummy draft tokens in its reserved slots (what the engine's
    proposer puts there)."""
    return replace(chunk, draft_token_ids=(DUMMY_TOKEN,) * slots)


def _plus_drafting(cost: StepCost, seconds: float) -> StepCost:
    """The step's cost with the draft model's passes added (counted as overhead of the target's step)."""
    return replace(cost, overhead_s=cost.overhead_s + seconds, time_s=cost.time_s + seconds)


@contextmanager
def collector_paused() -> Iterator[None]:
    """A run builds millions of acyclic records that all outlive it, and the cyclic collector would
    scan them all on their way to its oldest generation (seconds for 10,000 requests). Keep it off
    during the run, then move what the run built to the oldest generation unscanned (freeze, then
    unfreeze); a later full collection still sees it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.unfreeze()
        if was_enabled:
            gc.enable()
