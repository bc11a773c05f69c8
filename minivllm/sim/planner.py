"""Plan a multi-GPU deployment on paper: weights and KV cache per GPU, the KV tokens that fit, the
communication of each kind of parallelism and its time on the GPUs' link, the pipeline bubble, and a
verdict. Pure arithmetic on a `ModelSpec` and a `Hardware` (no torch).

    from minivllm.sim import ParallelLayout, get_hardware, get_model, plan_layout
    p = plan_layout(get_model("Llama-3.1-70B"), get_hardware("H100-SXM"), ParallelLayout(tp=2))
    print(p.verdict)

The layout uses vLLM's sizes; the model runs on ``tp * pp * dp * cp`` GPUs:

* ``tp`` tensor parallel (Megatron): q, o, the MLP and the experts are split ``tp`` ways, k and v by
  KV head (``K / tp`` heads per GPU; when ``tp > K`` every GPU keeps one KV head, replicated
  ``tp / K`` times, as vLLM does); the embedding and LM head are split by vocabulary (rounded up, as
  padded shards are); norms and routers are whole on every GPU.
* ``pp`` pipeline parallel: contiguous layer ranges, ``L // pp`` each; the ``L % pp`` extra layers go
  one each to the stages before the last, from the second-to-last backwards (vLLM's `get_pp_indices`),
  sparing the last stage, which holds the LM head. The first stage holds the embedding; an LM head
  tied to it is a second copy when it sits on another stage.
* ``dp`` data parallel: whole replicas, no communication between them during inference.
* ``ep`` expert parallel: the routed experts of a MoE layer are spread whole over ``ep`` of the
  ``tp * dp`` GPUs of a stage (``E / ep`` each, replicated ``tp * dp / ep`` times); vLLM's
  ``enable_expert_parallel`` is ``ep = tp * dp``. Shared experts stay split ``tp`` ways.
* ``cp`` context parallel: a sequence's tokens are spread over ``cp`` GPUs, each holding the KV of its
  own tokens (ring attention; the engine does not run it).

Memory per GPU of stage ``s`` (``b`` bytes per element of the weights, ``b_kv`` of the KV cache, which
may be fp8 when the weights are not): weights ``b * (its share of each part)``; KV bytes per token
``2 * L_s * K_gpu * h * b_kv`` for the tokens it owns. Before sizing its cache an engine runs one
forward pass of ``max_num_batched_tokens`` tokens and keeps room for its peak: the activations
(``act_s``: per token the MLP's gate and up outputs and their product, ``3 m / tp``, the q, k, v heads
and two hidden-size vectors, at ``b`` bytes) and, on the last stage, fp32 logits and probabilities
for ``max_num_seqs`` rows (``2 * 4 * V`` bytes each); CUDA's own memory (``non_torch_bytes``) comes
off too, as vLLM subtracts it. KV tokens of one replica:

    cp * min_s floor((memory * utilisation - weights_s - act_s - non_torch) / kv_s)

(every GPU of a replica must hold its part of each token, as vLLM takes the smallest cache over its
workers). For Llama-3.1-8B on an H100 at 0.9 this gives 448,100 tokens; vLLM logs 447,088 (weights
14.99 GiB, activation peak 1.24 GiB, non-torch 0.35 GiB; the estimate's activations are 1.12 GiB).

Communication of one GPU of stage ``s`` in a step of ``T`` tokens (``S`` of them sampled) run as
``m`` micro-batches, ``t = T / cp / m`` tokens of a micro-batch on this GPU. The *payload* is the
tensor handed to one collective call (what an engine's trace counts); the *wire* bytes are what this
GPU sends over its link for it. Calls per step are ``m`` times the calls per micro-batch:

    parallelism, op  calls per micro-batch    payload per call               wire per call
    tp all_reduce    2 * L_s (+1 embedding    t * d * b                      payload * 2 (tp-1) / tp  (ring)
                     on the first stage)
    tp all_gather    1 (last stage: logits)   S / cp / m * ceil(V / tp) * b  payload * (tp-1)         (ring)
    pp send          2 (all but the last)     t * d * b                      payload                  (point to point)
    ep all_to_all    2 * MoE layers of L_s    t / tp * k * d * b             payload * (ep-1) / ep    (uniform)
    cp send          (cp-1) * L_s             t * 2 * K_gpu * h * b          payload                  (ring pass-KV)

``op`` is named as `minivllm.core.records.CollectiveCount.op` names the engine's measured
collectives, whose bytes are payloads too.

Tensor parallel does two all-reduces per layer (after the attention's o projection and after the
MLP), each of the step's hidden states; EP's dispatch and combine move each token's hidden state to
its top-k experts and back; with ``tp > 1`` a TP group's ranks hold the same tokens, so each
dispatches a ``1 / tp`` share. A pipeline stage sends each micro-batch's hidden states and residual
to the next (two tensors, as vLLM and minivllm do). Time = calls * latency + wire bytes / one
direction of the link. Inside a node the link is the interconnect (half the datasheet's
``interconnect_bandwidth``, which counts both directions; a ring sends and receives at once);
GPUs are numbered stage after stage, ``node_size`` to a node, and a group that spans nodes (TP
larger than a node, a stage boundary between two nodes, EP over more GPUs than a node) runs at the
network's bandwidth and latency. `LayoutPlan.stage_communication` holds every stage's numbers,
`LayoutPlan.communication` those of the stage whose GPU communicates longest, and
`LayoutPlan.micro_batch_communication` a stage's calls for any number of tokens (the simulator's
steps).

Compute per token is the GPU's share (``1 / (tp * pp * cp)``) of the FLOPs the cost model gives a
token at ``context_len``, at the GPU's peak rate: the least time the GPU spends on a token, reached
at full load (prefill, big batches). A layout is communication-bound when its communication per
token takes longer: tensor parallel's all-reduces sit between the matmuls and cannot hide behind
them. This is why vLLM advises pipeline over tensor parallelism without NVLink: per token TP sends
about ``4 L (tp-1) / tp`` hidden-size vectors, PP two per stage boundary.

Pipeline bubble with ``m`` micro-batches flushed together (GPipe): ``(pp - 1) / (m + pp - 1)`` of each
stage's time is idle; the default ``m = pp`` is the number of batches vLLM keeps in flight.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

from minivllm.config.parallel import pipeline_stages
from minivllm.sim.cost_model import CostModel
from minivllm.sim.hardware import DTYPE_BYTES, Hardware, kv_dtype_of
from minivllm.sim.model_specs import ModelSpec

GB = 1e9


@dataclass(frozen=True)
class ParallelLayout:
    """How many GPUs share each dimension of the work (vLLM's sizes, see the module)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    cp: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelLayout.{f.name}={value!r} must be an int >= 1")
        if (self.tp * self.dp) % self.ep:
            raise ValueError(f"ParallelLayout.ep={self.ep} must divide tp * dp = {self.tp * self.dp}, the GPUs "
                             "of a pipeline stage that share the experts")

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def __str__(self) -> str:
        return " x ".join(f"{f.name.upper()}={getattr(self, f.name)}" for f in fields(self)
                          if getattr(self, f.name) > 1) or "1 GPU"


@dataclass(frozen=True)
class Communication:
    """One kind of collective as one GPU sees it in a step of ``step_tokens`` tokens (see the module)."""

    parallelism: str  # tp, pp, ep, cp
    op: str  # all_reduce, all_gather, send, all_to_all
    calls_per_step: int
    payload_bytes_per_call: float  # the tensor handed to one call
    wire_bytes_per_call: float  # what this GPU sends over its link for one call
    step_tokens: int
    link_bandwidth: float  # bytes/s in one direction
    link_latency: float = 0.0  # seconds per call

    @property
    def payload_bytes_per_step(self) -> float:
        return self.calls_per_step * self.payload_bytes_per_call

    @property
    def wire_bytes_per_step(self) -> float:
        return self.calls_per_step * self.wire_bytes_per_call

    @property
    def wire_bytes_per_token(self) -> float:
        return self.wire_bytes_per_step / self.step_tokens

    @property
    def seconds_per_step(self) -> float:
        return self.calls_per_step * self.link_latency + self.wire_bytes_per_step / self.link_bandwidth

    @property
    def seconds_per_token(self) -> float:
        return self.seconds_per_step / self.step_tokens


@dataclass(frozen=True)
class LayoutPlan:
    """What `plan_layout` found; per-stage tuples are indexed by pipeline stage, per GPU of that stage."""

    model: ModelSpec
    hardware: Hardware
    layout: ParallelLayout
    dtype: str
    kv_cache_dtype: str
    context_len: int
    gpu_memory_utilization: float
    step_tokens: int
    sampled_tokens: int
    micro_batches: int
    stage_layers: tuple[int, ...]
    stage_weight_bytes: tuple[int, ...]
    stage_activation_bytes: tuple[int, ...]  # the profiled forward pass's peak (0 when not profiled)
    stage_kv_bytes_per_token: tuple[int, ...]
    kv_tokens: int  # tokens of KV cache one replica holds (0 if the weights do not fit)
    compute_seconds_per_token: float

    @property
    def usable_bytes(self) -> float:
        return self.hardware.memory_bytes * self.gpu_memory_utilization

    @property
    def stage_kv_cache_bytes(self) -> tuple[float, ...]:
        """Memory left for the KV cache on a GPU of each stage (negative when nothing is left)."""
        return tuple(self.usable_bytes - w - a - self.hardware.non_torch_bytes
                     for w, a in zip(self.stage_weight_bytes, self.stage_activation_bytes))

    @cached_property
    def stage_communication(self) -> tuple[tuple[Communication, ...], ...]:
        """Every stage's collectives in a step of ``step_tokens`` run as ``micro_batches``."""
        cp, m = self.layout.cp, self.micro_batches
        return tuple(self.micro_batch_communication(s, self.step_tokens / cp / m, self.sampled_tokens / cp / m,
                                                    micro_batches=m)
                     for s in range(self.layout.pp))

    def micro_batch_communication(self, stage: int, tokens: float, sampled: float,
                                  micro_batches: int = 1) -> tuple[Communication, ...]:
        """A GPU of ``stage``'s collectives for micro-batches of ``tokens`` tokens on it (``sampled``
        of them sampled), ``micro_batches`` of them in the step (see the module's table)."""
        model, hw, lay = self.model, self.hardware, self.layout
        tp, pp, ep, cp = lay.tp, lay.pp, lay.ep, lay.cp
        b, d, h = DTYPE_BYTES[self.dtype], model.hidden_size, model.head_dim
        n, num_moe = self.stage_layers[stage], self._stage_moe_layers[stage]
        kv_heads = kv_heads_per_gpu(model, tp)
        node = hw.node_size
        # (parallelism, op, calls per micro-batch, payload per call, wire per payload byte, spans nodes)
        kinds = []
        if tp > 1:
            kinds.append(("tp", "all_reduce", 2 * n + (stage == 0), tokens * d * b, 2 * (tp - 1) / tp, tp > node))
            if stage == pp - 1:
                kinds.append(("tp", "all_gather", 1, sampled * -(-model.vocab_size // tp) * b, tp - 1, tp > node))
        if pp > 1 and stage < pp - 1:
            first_next = (stage + 1) * tp  # GPUs are numbered stage after stage
            kinds.append(("pp", "send", 2, tokens * d * b, 1, first_next // node != (first_next - 1) // node))
        if ep > 1 and num_moe:
            kinds.append(("ep", "all_to_all", 2 * num_moe, tokens / tp * model.num_experts_per_token * d * b,
                          (ep - 1) / ep, tp * lay.dp > node))
        if cp > 1:
            kv = 2 * kv_heads * h * DTYPE_BYTES[self.kv_cache_dtype]
            kinds.append(("cp", "send", (cp - 1) * n, tokens * kv, 1, tp * pp * cp > node))
        comms = []
        for kind, op, calls, payload, factor, spans_nodes in kinds:
            bandwidth, latency = hw.link(spans_nodes)
            comms.append(Communication(kind, op, micro_batches * calls, payload, payload * factor,
                                       max(1, round(tokens * cp * micro_batches)), bandwidth, latency))
        return tuple(comms)

    @property
    def _stage_moe_layers(self) -> list[int]:
        return moe_layers_per_stage(self.model, self.stage_layers)

    @property
    def weight_bytes_per_gpu(self) -> int:
        return max(self.stage_weight_bytes)

    @property
    def kv_bytes_per_token_per_gpu(self) -> int:
        return max(self.stage_kv_bytes_per_token)

    @property
    def max_concurrency(self) -> int:
        """Requests of ``context_len`` tokens the whole layout holds at once (all ``dp`` replicas)."""
        return self.layout.dp * (self.kv_tokens // self.context_len)

    @property
    def bubble_fraction(self) -> float:
        p, m = self.layout.pp, self.micro_batches
        return (p - 1) / (m + p - 1)

    @property
    def communication(self) -> tuple[Communication, ...]:
        """The communication of the stage whose GPU communicates longest."""
        return max(self.stage_communication, key=lambda comms: sum(c.seconds_per_token for c in comms))

    @property
    def communication_seconds_per_token(self) -> float:
        return sum(c.seconds_per_token for c in self.communication)

    @property
    def fits(self) -> bool:
        return self.kv_tokens >= self.context_len

    @property
    def communication_bound(self) -> bool:
        return self.communication_seconds_per_token > self.compute_seconds_per_token

    @property
    def verdict(self) -> str:
        where = f"{self.model.name} ({self.dtype}) on {self.layout.num_gpus} x {self.hardware.name}"
        where += f" ({self.layout})" if self.layout.num_gpus > 1 else ""
        if min(self.stage_kv_cache_bytes) <= 0:
            heaviest = self.stage_kv_cache_bytes.index(min(self.stage_kv_cache_bytes))
            stage = f" on pipeline stage {heaviest}" if self.layout.pp > 1 else ""
            weights, activations = self.stage_weight_bytes[heaviest], self.stage_activation_bytes[heaviest]
            return (f"{where}: does not fit: {weights / GB:.1f} GB of weights per GPU{stage}"
                    + (f" and {activations / GB:.1f} GB of activations" if activations else "")
                    + f", over the {self.usable_bytes / GB:.1f} GB usable at gpu_memory_utilization="
                    f"{self.gpu_memory_utilization}; use more GPUs (TP, PP or EP), or a smaller dtype")
        if not self.fits:
            return (f"{where}: does not fit: room for {self.kv_tokens} tokens of KV cache, fewer than one "
                    f"request of {self.context_len}; use more GPUs or a shorter context")
        n = self.max_concurrency
        capacity = (f"{self.kv_tokens} KV tokens per replica, {n} request{'s' * (n != 1)} of "
                    f"{self.context_len} tokens at once")
        if not self.communication:
            return f"{where}: fits: {capacity}"
        comm, compute = self.communication_seconds_per_token * 1e6, self.compute_seconds_per_token * 1e6
        if self.communication_bound:
            worst = max(self.communication, key=lambda c: c.seconds_per_token)
            advice = (" Pipeline parallelism sends two hidden-size vectors per token per stage instead of "
                      "two all-reduces per layer: without NVLink vLLM advises PP over TP."
                      if worst.parallelism == "tp" else "")
            return (f"{where}: communication-bound: fits ({capacity}), but at full load the "
                    f"{worst.parallelism.upper()} {worst.op} alone "
                    f"takes {worst.seconds_per_token * 1e6:.1f} us per token on its "
                    f"{worst.link_bandwidth / GB:.0f} GB/s link (each way), all communication {comm:.1f} "
                    f"us against {compute:.1f} us of compute per token.{advice}")
        return (f"{where}: fits: {capacity}; communication {comm:.1f} us per token against {compute:.1f} us "
                "of compute at full load")


def kv_heads_per_gpu(model: ModelSpec, tp: int) -> int:
    """KV heads one GPU holds: ``K / tp``, or one (replicated) when ``tp > K``."""
    k = model.num_kv_heads
    if model.num_heads % tp:
        raise ValueError(f"ParallelLayout.tp={tp} must divide {model.name}'s num_heads={model.num_heads}")
    if (k % tp) if tp <= k else (tp % k):
        raise ValueError(f"ParallelLayout.tp={tp} must divide {model.name}'s num_kv_heads={k} or be a "
                         "multiple of it")
    return max(1, k // tp)


def plan_layout(model: ModelSpec, hardware: Hardware, layout: ParallelLayout = ParallelLayout(), *,
                dtype: str = "bf16", kv_cache_dtype: str | None = None, context_len: int = 8192,
                gpu_memory_utilization: float = 0.9, step_tokens: int = 256, sampled_tokens: int | None = None,
                micro_batches: int | None = None, max_num_batched_tokens: int | None = 8192,
                max_num_seqs: int = 256) -> LayoutPlan:
    """Plan ``model`` in ``dtype`` (its KV cache in ``kv_cache_dtype``, default the same) on
    ``layout.num_gpus`` GPUs of ``hardware``; a step runs ``step_tokens`` tokens per replica,
    ``sampled_tokens`` of them sampled (default: all, a decode step), in ``micro_batches`` pipeline
    micro-batches (default ``pp``). Room is kept for a profiled forward pass of
    ``max_num_batched_tokens`` tokens sampling ``max_num_seqs`` rows (None: none kept). See the module
    for the formulas."""
    cost = CostModel(model, hardware, dtype)  # checks the dtype and that the hardware has its FLOP rate
    kv_dtype = kv_dtype_of(dtype, kv_cache_dtype)
    for name, value in (("context_len", context_len), ("step_tokens", step_tokens), ("max_num_seqs", max_num_seqs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if max_num_batched_tokens is not None and (isinstance(max_num_batched_tokens, bool)
                                               or not isinstance(max_num_batched_tokens, int)
                                               or max_num_batched_tokens < 1):
        raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens!r} must be an int >= 1 or None")
    if context_len > model.max_model_len:
        raise ValueError(f"context_len={context_len} exceeds {model.name}'s max_model_len={model.max_model_len}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization!r} must be in (0, 1]")
    sampled = step_tokens if sampled_tokens is None else sampled_tokens
    if isinstance(sampled, bool) or not isinstance(sampled, int) or not 0 <= sampled <= step_tokens:
        raise ValueError(f"sampled_tokens={sampled_tokens!r} must be an int in 0..step_tokens={step_tokens}")
    m = layout.pp if micro_batches is None else micro_batches
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"micro_batches={micro_batches!r} must be an int >= 1")
    tp, pp, ep, cp = layout.tp, layout.pp, layout.ep, layout.cp
    if ep > 1 and not model.num_experts:
        raise ValueError(f"ParallelLayout.ep={ep}: {model.name} is dense, it has no experts to spread")
    if model.num_experts % ep:
        raise ValueError(f"ParallelLayout.ep={ep} must divide {model.name}'s num_experts={model.num_experts}")
    if (tp * pp * cp > 1 or ep > 1) and not hardware.interconnect_bandwidth > 0:
        raise ValueError(f"hardware.interconnect_bandwidth={hardware.interconnect_bandwidth}: {hardware.name} "
                         f"has no link between devices for {layout}")
    if tp * pp * cp > hardware.node_size and not hardware.network_bandwidth > 0:
        raise ValueError(f"hardware.network_bandwidth={hardware.network_bandwidth}: {layout} spans more than a "
                         f"node of {hardware.node_size} {hardware.name}, and there is no network between nodes")
    kv_heads = kv_heads_per_gpu(model, tp)
    stages = pipeline_stages(model.num_layers, pp)

    b, d, h = DTYPE_BYTES[dtype], model.hidden_size, model.head_dim

    def split(n: int) -> int:
        return -(-n // tp)

    # one layer's weights on one GPU: attention (q, o and k, v by head), norms, then the MLP
    attention = 2 * d * (model.num_heads // tp) * h + 2 * d * kv_heads * h + 2 * d
    dense_layer = attention + split(model.dense_mlp_params)
    routed = model.num_experts * model.expert_params
    experts = routed // ep if ep > 1 else split(routed)
    moe_layer = attention + model.num_experts * d + experts + split(model.num_shared_experts * model.expert_params)
    vocab_shard = split(model.vocab_size) * d

    weights, activations, kv = [], [], []
    for s, (n, num_moe) in enumerate(zip(stages, moe_layers_per_stage(model, stages))):
        w = (n - num_moe) * dense_layer + num_moe * moe_layer
        if s == 0:
            w += vocab_shard
        if s == pp - 1:
            w += d + (0 if model.tie_word_embeddings and pp == 1 else vocab_shard)
        weights.append(w * b)
        kv.append(2 * n * kv_heads * h * DTYPE_BYTES[kv_dtype])
        activations.append(0 if max_num_batched_tokens is None else _activation_bytes(
            model, tp, kv_heads, b, n - num_moe, num_moe, min(max_num_batched_tokens, context_len),
            max_num_seqs if s == pp - 1 else 0))
    free = [hardware.memory_bytes * gpu_memory_utilization - w - a - hardware.non_torch_bytes
            for w, a in zip(weights, activations)]
    kv_tokens = cp * min(int(f // k) for f, k in zip(free, kv)) if min(free) > 0 else 0

    flops = cost.step_flops(step_tokens, sampled, step_tokens * context_len) / step_tokens
    compute = flops / (tp * pp * cp) / cost.peak_flops
    return LayoutPlan(model, hardware, layout, dtype, kv_dtype, context_len, gpu_memory_utilization, step_tokens,
                      sampled, m, stages, tuple(weights), tuple(activations), tuple(kv), kv_tokens, compute)


def moe_layers_per_stage(model: ModelSpec, stages) -> list[int]:
    """MoE layers on each pipeline stage: those from index ``num_dense_layers`` on."""
    firsts = [sum(stages[:s]) for s in range(len(stages))]
    return [max(0, f + n - max(f, model.num_dense_layers)) if model.num_experts else 0
            for f, n in zip(firsts, stages)]


def _activation_bytes(model: ModelSpec, tp: int, kv_heads: int, b: int, num_dense: int, num_moe: int,
                      tokens: int, sampled_rows: int) -> int:
    """Peak memory of a profiled forward pass of ``tokens`` tokens on one GPU, above the weights (see
    the module): the widest layer's live tensors per token, and the last stage's fp32 logits and
    probabilities for ``sampled_rows`` rows."""
    mlp = max(model.intermediate_size if num_dense else 0,
              (model.num_experts_per_token + model.num_shared_experts) * model.moe_intermediate_size
              if num_moe else 0)
    heads = model.num_heads // tp + 2 * kv_heads
    per_token = (3 * -(-mlp // tp) + heads * model.head_dim + 2 * model.hidden_size) * b
    return tokens * per_token + min(sampled_rows, tokens) * 2 * 4 * model.vocab_size


@dataclass(frozen=True)
class ContextParallelCost:
    """One sequence of ``context_len`` tokens whose KV cache is spread by token over ``cp`` GPUs, as
    one GPU of the group sees it (see `context_parallel_cost` for the formulas)."""

    model: ModelSpec
    hardware: Hardware
    cp: int
    tp: int
    context_len: int
    kv_bytes_per_token: int  # K and V of one token, all layers, on the GPU that holds it
    prefill_wire_bytes_per_token: float  # ring attention (pass-KV): per prompt token
    decode_wire_bytes_per_token: float  # decode context parallel: per generated token
    decode_calls_per_token: int  # collectives per generated token (three per layer)
    pass_kv_decode_wire_bytes_per_token: float  # decode by passing the KV around the ring instead
    ring_hide_tokens: float  # a ring block of at least this many tokens per GPU hides its send

    @property
    def kv_bytes_per_gpu(self) -> float:
        """The sequence's KV cache on one GPU: its ``ceil(context_len / cp)`` tokens."""
        return -(-self.context_len // self.cp) * self.kv_bytes_per_token

    @property
    def link(self) -> tuple[float, float]:
        """(bytes/s in one direction, seconds per call) of the group's link."""
        return self.hardware.link(self.tp * self.cp > self.hardware.node_size)

    @property
    def decode_comm_seconds_per_token(self) -> float:
        bandwidth, latency = self.link
        if self.cp == 1:
            return 0.0
        return self.decode_calls_per_token * latency + self.decode_wire_bytes_per_token / bandwidth

    @property
    def prefill_comm_seconds(self) -> float:
        """The ring's wire time for the whole prompt of ``context_len`` tokens (latency not counted:
        each hop is one send of a big block)."""
        return 0.0 if self.cp == 1 else self.context_len * self.prefill_wire_bytes_per_token / self.link[0]


def context_parallel_cost(model: ModelSpec, hardware: Hardware, cp: int, context_len: int, *, tp: int = 1,
                          dtype: str = "bf16", kv_cache_dtype: str | None = None) -> ContextParallelCost:
    """Memory and traffic of one sequence of ``context_len`` tokens spread by token over ``cp`` GPUs,
    each holding ``H / tp`` query heads and ``K_gpu`` KV heads (`kv_heads_per_gpu`) of every layer.
    With ``e = 2 L K_gpu h b_kv`` the KV bytes of one token on its GPU, ``b`` the activations' bytes
    per element and ``H_gpu = H / tp``, one GPU of the group:

    * holds ``ceil(C / cp) * e`` bytes of the sequence's KV cache;
    * **prefill, ring attention passing KV** (what ``cp`` means in `plan_layout`): every GPU holds
      ``C / cp`` of the prompt's tokens and passes its K/V block to the next GPU ``cp - 1`` times per
      layer, so it sends ``(cp - 1) / cp * e`` bytes per prompt token; a block's send hides behind the
      attention of the block before it when a GPU's block has at least
      ``K_gpu * b_kv * F / (2 * H_gpu * B)`` tokens (``F`` the GPU's FLOP/s, ``B`` the link's bytes/s
      one way: ``4 H_gpu h n^2`` FLOPs of attention against ``2 K_gpu h b_kv n`` bytes to send);
    * **decode context parallel** (vLLM's ``decode_context_parallel_size``, which shards the KV cache
      by token over GPUs of the TP group that would otherwise hold the same KV heads): the new token's
      attention runs on every GPU over its own tokens, then per layer an all-gather of the query heads
      (``(cp - 1) H_gpu h b`` bytes sent), an all-gather of the partial softmax's log-sum-exp in fp32
      (``(cp - 1) cp H_gpu 4``) and a reduce-scatter of the partial outputs (``(cp - 1) H_gpu h b``):
      ``L (cp - 1) H_gpu (2 h b + 4 cp)`` bytes and ``3 L`` calls per generated token, whatever ``C``;
    * passing the KV around the ring for a decode token instead would send the GPU's whole shard
      ``cp - 1`` times per token: ``(cp - 1) ceil(C / cp) e`` bytes (why decode moves queries, not KV).
    """
    for name, value in (("cp", cp), ("tp", tp), ("context_len", context_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPE_BYTES)}")
    kv_dtype = kv_dtype_of(dtype, kv_cache_dtype)
    if cp > 1 and not hardware.interconnect_bandwidth > 0:
        raise ValueError(f"hardware.interconnect_bandwidth={hardware.interconnect_bandwidth}: {hardware.name} "
                         f"has no link between devices for cp={cp}")
    if tp * cp > hardware.node_size and not hardware.network_bandwidth > 0:
        raise ValueError(f"hardware.network_bandwidth={hardware.network_bandwidth}: tp * cp = {tp * cp} spans "
                         f"more than a node of {hardware.node_size} {hardware.name}, and there is no network")
    kv_heads = kv_heads_per_gpu(model, tp)
    b, b_kv, h, L = DTYPE_BYTES[dtype], DTYPE_BYTES[kv_dtype], model.head_dim, model.num_layers
    q_heads = model.num_heads // tp
    e = 2 * L * kv_heads * h * b_kv
    shard = -(-context_len // cp)
    link_bandwidth, _ = hardware.link(tp * cp > hardware.node_size)
    hide = (kv_heads * b_kv * hardware.peak_flops(dtype) / (2 * q_heads * link_bandwidth)) if cp > 1 else 0.0
    return ContextParallelCost(
        model, hardware, cp, tp, context_len, e,
        prefill_wire_bytes_per_token=(cp - 1) / cp * e,
        decode_wire_bytes_per_token=L * (cp - 1) * q_heads * (2 * h * b + 4 * cp),
        decode_calls_per_token=3 * L if cp > 1 else 0,
        pass_kv_decode_wire_bytes_per_token=(cp - 1) * shard * e,
        ring_hide_tokens=hide)
