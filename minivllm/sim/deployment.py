"""One replica's engine step on its ``tp x pp`` GPUs: the cost model's roofline split over a
parallel layout, with the layout's communication, pipeline and kernel launches.

A step of ``R`` chunks and ``T`` tokens (``S`` of them sampled), ``C`` context tokens and ``P``
attention pairs (see `minivllm.sim.cost_model`) runs as ``m = min(pp, R)`` micro-batches: vLLM keeps
``pp`` batches in flight, and a step with fewer requests than stages cannot fill them. Each
micro-batch carries ``1/m`` of the step; on a GPU of stage ``s`` (``L_s`` of the ``L`` layers) it costs

    t_s      = max(bytes_s / bandwidth, flops_s / peak) + comm_s + launches_s
    bytes_s  = weights_s + kv_s * C / m           the stage's weights; its layers' and KV heads' context
    flops_s  = (2 P_active * L_s / L * T / m + 4 L_s H h * P / m + [last stage] 2 V d * S / m) / tp
    comm_s   = the stage's collectives for ``T / m`` tokens (`LayoutPlan.micro_batch_communication`)
    launches_s = KERNELS_PER_LAYER * L_s * launch_overhead, only without CUDA graphs (eager mode)

Weights and KV per GPU come from the planner (`plan_layout`), so the memory the simulator sizes its
cache by and the bytes it charges each step are the same figures. A micro-batch passes the stages
one after another and each stage serves all ``m`` micro-batches, so the step takes

    time = max(sum_s t_s, m * max_s t_s) + step_overhead + seq_overhead * R

With ``m = pp`` every stage is busy the whole step (no flush between steps, as vLLM's scheduler keeps
the pipeline fed); with fewer micro-batches the stages wait on each other: the pipeline bubble. A
memory-bound decode step therefore costs about what one GPU's would (each stage reads ``1/pp`` of the
weights, ``pp`` times in a row): pipeline parallelism buys memory and throughput at full load, not
latency. At TP = PP = 1 with CUDA graphs this is `CostModel.step_time`, to the last bit.

CUDA graphs replay a whole step's kernels with one launch (vLLM captures steps of up to 512 tokens;
longer ones are big prefills, whose long kernels hide their launches anyway, so they are not charged
either). ``KERNELS_PER_LAYER`` counts a Llama layer's kernels (two norms, q/k/v, rotary, KV store,
attention, o, gate/up, activation, down and the residual adds): an assumption, as is adding their
launch time to the GPU's rather than overlapping them.
"""
from __future__ import annotations

from dataclasses import dataclass

from minivllm.sim.cost_model import CostModel
from minivllm.sim.planner import LayoutPlan

KERNELS_PER_LAYER = 12


@dataclass(frozen=True, slots=True)
class StepCost:
    """Where one step's time went, summed along one micro-batch's path through the stages."""

    memory_s: float  # weight and KV reads at full bandwidth
    compute_s: float  # FLOPs at peak
    communication_s: float  # collectives (latency and wire time)
    overhead_s: float  # scheduling, per-request work, kernel launches
    time_s: float  # the step's wall time
    micro_batches: int

    @property
    def bound(self) -> str:
        """Which side of the roofline set the step's model time: ``"memory"`` or ``"compute"``."""
        return "memory" if self.memory_s >= self.compute_s else "compute"


class DeploymentCost:
    """Step costs of one replica of ``plan`` (its layout's DP is the simulator's business)."""

    def __init__(self, plan: LayoutPlan, cuda_graphs: bool = True):
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs={cuda_graphs!r} must be a bool")
        self.plan, self.cuda_graphs = plan, cuda_graphs
        model, hw, layout = plan.model, plan.hardware, plan.layout
        if layout.cp > 1:
            raise ValueError(f"ParallelLayout.cp={layout.cp}: the simulator does not run context parallelism "
                             "(the planner's figures only)")
        self.cost = cost = CostModel(model, hw, plan.dtype, plan.kv_cache_dtype)
        self.bandwidth, self.peak = hw.memory_bandwidth, cost.peak_flops
        tp, last = layout.tp, layout.pp - 1
        self.stages = []  # per stage: weights, KV/token, flops/token, flops/pair, flops/sample, comm coefficients, launches
        for s, layers in enumerate(plan.stage_layers):
            share = layers / model.num_layers
            fixed = _comm_seconds(plan, s, 0.0, 0.0)
            per_token = _comm_seconds(plan, s, 1.0, 0.0) - fixed
            per_sample = _comm_seconds(plan, s, 0.0, 1.0) - fixed
            launches = KERNELS_PER_LAYER * layers * hw.launch_overhead
            self.stages.append((plan.stage_weight_bytes[s], plan.stage_kv_bytes_per_token[s],
                                cost.linear_flops_per_token * share / tp, cost.attn_flops_per_pair * share / tp,
                                cost.lm_head_flops_per_sample / tp if s == last else 0.0,
                                fixed, per_token, per_sample, launches))

    def step_cost(self, num_chunks: int, num_tokens: int, num_sampled: int, context_tokens: int,
                  attention_pairs: float) -> StepCost:
        """The cost of a step (arguments as `CostModel.step_time`)."""
        m = max(1, min(self.plan.layout.pp, num_chunks))
        tokens, sampled, context, pairs = num_tokens, num_sampled, context_tokens, attention_pairs
        if m > 1:  # (undivided on one micro-batch: CostModel's exact arithmetic)
            tokens, sampled, context, pairs = tokens / m, sampled / m, context / m, pairs / m
        eager = not self.cuda_graphs
        memory = compute = comm = launch = total = longest = 0.0
        for weights, kv, f_token, f_pair, f_sample, c_fixed, c_token, c_sample, launches in self.stages:
            mem = (weights + kv * context) / self.bandwidth
            flops = (f_token * tokens + f_sample * sampled + f_pair * pairs) / self.peak
            com = c_fixed + c_token * tokens + c_sample * sampled
            lau = launches if eager else 0.0
            t = max(mem, flops) + com + lau
            memory, compute, comm, launch, total = memory + mem, compute + flops, comm + com, launch + lau, total + t
            longest = max(longest, t)
        hw = self.plan.hardware
        time = max(total, m * longest) + hw.step_overhead + hw.seq_overhead * num_chunks
        return StepCost(memory, compute, comm, hw.step_overhead + hw.seq_overhead * num_chunks + launch, time, m)


def _comm_seconds(plan: LayoutPlan, stage: int, tokens: float, sampled: float) -> float:
    """Seconds of a stage's collectives for one micro-batch: linear in tokens and samples."""
    return sum(c.calls_per_step * c.link_latency + c.wire_bytes_per_step / c.link_bandwidth
               for c in plan.micro_batch_communication(stage, tokens, sampled))
