"""Prefill/decode disaggregation in the simulator (chapter 10): a prefill pool and a decode pool, each
of its own instances (an instance: one engine on ``tp x pp`` GPUs, its own scheduler, KV cache and
clock), joined by a KV link.

    from minivllm.sim import get_hardware, get_model
    from minivllm.sim.disagg import DisaggConfig, DisaggSimulator, PoolConfig
    config = DisaggConfig(get_model("Llama-3.1-8B"), get_hardware("H100-SXM"), prefill=PoolConfig(1),
                          decode=PoolConfig(1), link="infiniband", max_model_len=8192)
    result = DisaggSimulator(config).run(requests)
    compute_metrics(result.trace, result.arrival_times)  # TTFT, TPOT, ITL as for one engine

A request's life, as vLLM's P/D (``NixlConnector``) runs it:

1. **Prefill.** A router sends it to the prefill instance with the fewest outstanding tokens, which
   runs it with ``max_tokens=1`` through its own real `Scheduler` (chunked prefill, batching with
   other prompts): the prompt's KV is computed and one token sampled at the step's end ``t_p``.
2. **Routing and admission.** At ``t_p`` the request goes to the decode instance with the fewest
   outstanding tokens, whose queue admits it in arrival order (FCFS) once its `BlockManager` can
   allocate blocks for the prompt's KV and the next token, and it runs fewer than ``max_num_seqs``
   requests (those whose KV is still on the wire count): decode
   admission is limited by the decode pool's free KV. Blocks that the decode side's prefix cache
   already holds are neither allocated again nor sent (as vLLM's connector counts local hits first).
3. **Transfer.** Once admitted (at ``t_a``), the KV crosses the link (`minivllm.sim.kv_transfer`):
   ``bytes / bandwidth + latency``, where each GPU sends its own share over its own link. A prefill
   instance sends, and a decode instance receives, one transfer after another (FIFO), so a busy
   link queues transfers instead of sharing its bandwidth; its throughput is conserved either way.
   **Layer-pipelined** (``layer_pipelined=True``, Splitwise's and DistServe's push during the
   prefill): each layer's KV leaves as soon as it is computed, so after the prefill's end only the
   last layer's share remains, unless the link is slower than the prefill makes KV, in which case
   the wire time counted from the prefill's first step binds. This assumes the decode side had room
   from the start; the simulator grants the overlap only to a request admitted at ``t_p`` without
   waiting (one that waited sends everything after its admission).
4. **Decode.** When its KV has arrived the request joins the decode instance's running batch (at the
   instance's next step) with its prompt already computed, and decodes there. A decode instance that
   runs out of blocks preempts as any engine does, and recomputes the preempted request itself.

**Where the first token comes from** (``first_token``): ``"prefill"`` (the default; DistServe's and
Splitwise's accounting) streams the token the prefill sampled at once, so TTFT ends at the prefill's
step and the transfer shows in the first inter-token gap; ``"decode"`` is what vLLM's own proxy does
(``toy_proxy_server``: the prefill's token is dropped, and the decode instance recomputes the last
prompt token, ``num_computed_tokens = num_tokens - 1``, and samples the first token itself), so TTFT
also pays the decode admission, the transfer and one decode step.

Not modelled: the prefill instance frees a request's blocks when its step ends (vLLM keeps them until
the decode side has read them, so a backed-up decode pool would also fill the prefill pool's KV);
speculative decoding; transfers sharing a link's bandwidth at once (they queue instead).
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field, replace

from minivllm.core.sequence import Sequence
from minivllm.core.trace import StepRecord
from minivllm.sim.deployment import StepCost
from minivllm.sim.hardware import DTYPE_BYTES, Hardware
from minivllm.sim.kv_transfer import KVLink, kv_link
from minivllm.sim.model_specs import ModelSpec
from minivllm.sim.planner import ParallelLayout
from minivllm.sim.simulator import (DUMMY_TOKEN, Replica, SimConfig, Simulator, check_arrival_order, collector_paused,
                                    least_loaded, length_stop, merged_steps)
from minivllm.sim.workload import Request

FIRST_TOKEN_SIDES = ("prefill", "decode")
# what DisaggConfig sets for both pools (a pool's own value would make the KV of the two sides differ)
_POOL_WIDE = ("dtype", "kv_cache_dtype", "layout", "speculative")


class PoolConfig:
    """One pool: ``instances`` engines of ``tp x pp`` GPUs each, with the engine arguments of
    `SimConfig` (``max_num_seqs``, ``max_num_batched_tokens``, ``gpu_memory_utilization``,
    ``max_model_len``, ``block_size``, ``num_kv_blocks``, ``enable_prefix_caching``, ``cuda_graphs``, ...)."""

    def __init__(self, instances: int = 1, tp: int = 1, pp: int = 1, **engine_args):
        if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
            raise ValueError(f"PoolConfig.instances={instances!r} must be an int >= 1")
        self.layout = ParallelLayout(tp=tp, pp=pp, dp=instances)  # its own checks of tp and pp
        for name in _POOL_WIDE:
            if name in engine_args:
                raise ValueError(f"PoolConfig({name}=...): {name} is set for both pools by DisaggConfig"
                                 + (", and speculative decoding is not modelled in P/D" * (name == "speculative")))
        self.instances, self.tp, self.pp = instances, tp, pp
        self.engine_args = dict(engine_args)

    @property
    def gpus_per_instance(self) -> int:
        return self.tp * self.pp

    @property
    def num_gpus(self) -> int:
        return self.layout.num_gpus

    def sim_config(self, model: ModelSpec, hardware: Hardware, dtype: str, kv_cache_dtype: str) -> SimConfig:
        """The pool as one `SimConfig` whose DP replicas are its instances."""
        return SimConfig(model, hardware, dtype, layout=self.layout, kv_cache_dtype=kv_cache_dtype,
                         **self.engine_args)

    def _key(self) -> tuple:
        return self.instances, self.tp, self.pp, tuple(sorted(self.engine_args.items()))

    def __eq__(self, other) -> bool:
        return isinstance(other, PoolConfig) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in sorted(self.engine_args.items()))
        return f"PoolConfig(instances={self.instances}, tp={self.tp}, pp={self.pp}{args})"

    def __str__(self) -> str:
        layout = "".join(f" x {n}={v}" for n, v in (("TP", self.tp), ("PP", self.pp)) if v > 1)
        return f"{self.instances} instance{'s' * (self.instances > 1)}{layout} ({self.num_gpus} GPUs)"


@dataclass(frozen=True)
class DisaggConfig:
    """A disaggregated deployment: ``prefill`` and ``decode`` pools of ``model`` on ``hardware``,
    joined by ``link`` (``"nvlink"``, ``"infiniband"``, ``"ethernet"`` or a `KVLink`). ``dtype`` and
    ``kv_cache_dtype`` hold for both pools (the KV must mean the same on both sides)."""

    model: ModelSpec
    hardware: Hardware
    prefill: PoolConfig = field(default_factory=PoolConfig)
    decode: PoolConfig = field(default_factory=PoolConfig)
    link: str | KVLink = "infiniband"
    layer_pipelined: bool = False
    first_token: str = "prefill"
    dtype: str = "bf16"
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelSpec):
            raise ValueError(f"model={self.model!r} must be a ModelSpec (minivllm.sim.get_model)")
        if not isinstance(self.hardware, Hardware):
            raise ValueError(f"hardware={self.hardware!r} must be a Hardware (minivllm.sim.get_hardware)")
        for side in ("prefill", "decode"):
            if not isinstance(getattr(self, side), PoolConfig):
                raise ValueError(f"{side}={getattr(self, side)!r} must be a PoolConfig")
        if not isinstance(self.layer_pipelined, bool):
            raise ValueError(f"layer_pipelined={self.layer_pipelined!r} must be a bool")
        if self.first_token not in FIRST_TOKEN_SIDES:
            raise ValueError(f"first_token={self.first_token!r} must be one of {FIRST_TOKEN_SIDES}")
        self.kv_link()  # a link that does not exist, or NVLink across nodes, is refused here
        if self.link == "nvlink" and self.num_gpus > self.hardware.node_size:
            raise ValueError(f"link='nvlink' joins the GPUs of one node, but the pools use {self.num_gpus} GPUs and "
                             f"a node has {self.hardware.node_size} {self.hardware.name}: use 'infiniband' or "
                             "'ethernet', or fewer GPUs")
        for side in ("prefill", "decode"):
            self.sim_config(side)  # the engine's own checks of each pool's arguments

    @property
    def num_gpus(self) -> int:
        return self.prefill.num_gpus + self.decode.num_gpus

    def kv_link(self) -> KVLink:
        return kv_link(self.link, self.hardware)

    def sim_config(self, side: str) -> SimConfig:
        """The ``side`` ("prefill" or "decode") pool as a `SimConfig`; a refusal names the pool."""
        try:
            return getattr(self, side).sim_config(self.model, self.hardware, self.dtype, self.kv_cache_dtype)
        except ValueError as e:
            raise ValueError(f"{side} pool: {e}") from None


@dataclass(frozen=True)
class KVTransfer:
    """One request's KV on its way from a prefill instance to a decode instance (times in seconds)."""

    request_id: str
    prefill_instance: int
    decode_instance: int
    num_tokens: int  # tokens whose KV crossed the link (the decode side's prefix-cache hits did not)
    num_bytes: float  # all GPUs together
    prefill_end: float  # the prefill's last step ended
    admitted: float  # the decode instance allocated its blocks
    start: float  # the link began sending (earlier than prefill_end when layer-pipelined)
    end: float  # the last byte left (the link is free for the next transfer)
    ready: float  # end + latency: the decode instance may run it from its next step on

    @property
    def admission_wait(self) -> float:
        """Seconds waiting for decode KV blocks (or a ``max_num_seqs`` slot)."""
        return self.admitted - self.prefill_end

    @property
    def transfer_time(self) -> float:
        """Seconds from admission until the KV is there: the link's queue, the wire, the latency."""
        return self.ready - self.admitted


@dataclass
class DisaggResult:
    config: DisaggConfig
    link: KVLink
    prefill_num_blocks: int  # per instance
    decode_num_blocks: int
    trace: list[StepRecord]  # what the client sees, by end time: both pools ("prefill"), the decode pool ("decode")
    prefill_trace: list[StepRecord]
    decode_trace: list[StepRecord]
    prefill_step_costs: list[StepCost]  # aligned with prefill_trace
    decode_step_costs: list[StepCost]
    prefill_step_instances: list[int]
    decode_step_instances: list[int]
    requests: list[Sequence]  # each request's last side (decode, or prefill if it ended there), arrival order
    arrival_times: dict[str, float]
    transfers: list[KVTransfer]  # in admission order


@dataclass(eq=False)
class _Handoff:
    """A request between its prefill and its decode."""

    seq: Sequence  # the decode side's
    prefill_instance: int
    prefill_start: float
    prefill_end: float
    kv_tokens: int  # tokens the decode side will hold computed when the KV has arrived
    transfer: KVTransfer | None = None


@dataclass
class _Decoder:
    """A decode instance: its engine, the requests routed to it waiting for blocks, and those whose
    KV is on the wire."""

    replica: Replica
    pending: deque[_Handoff] = field(default_factory=deque)
    receiving: list[_Handoff] = field(default_factory=list)
    receive_free: float = 0.0  # when its link is free to receive the next transfer

    @property
    def outstanding_tokens(self) -> int:
        return self.replica.outstanding_tokens + sum(h.seq.num_outstanding_tokens for h in self.pending) \
            + sum(h.seq.num_outstanding_tokens for h in self.receiving)

    def next_step_time(self) -> float:
        s = self.replica.scheduler
        if s.running or (s.waiting and not self.receiving):
            return self.replica.now
        if self.receiving:  # idle until the first KV arrives
            # (also with only preempted requests waiting: the blocks of the KV on the wire are taken, and
            # a step that could admit none of them would be empty)
            return max(self.replica.now, min(h.transfer.ready for h in self.receiving))
        return math.inf


class DisaggSimulator:
    def __init__(self, config: DisaggConfig):
        if not isinstance(config, DisaggConfig):
            raise ValueError(f"config={config!r} must be a DisaggConfig")
        self.config = c = config
        self.prefill = _pool_simulator(c, "prefill")  # plans, prices steps, checks requests
        self.decode = _pool_simulator(c, "decode")
        self.link = c.kv_link()
        self.kv_bytes_per_token = c.model.kv_bytes_per_token(DTYPE_BYTES[self.decode.plan.kv_cache_dtype])
        # the GPU with the most KV bytes per token, on either side, sets the wire time (see kv_transfer)
        self.gpu_kv_bytes_per_token = max(max(self.prefill.plan.stage_kv_bytes_per_token),
                                          max(self.decode.plan.stage_kv_bytes_per_token))

    def transfer_seconds(self, num_tokens: int) -> float:
        """``num_tokens`` of KV over the link on an idle link, not pipelined: bytes / bandwidth + latency."""
        return self.link.wire_seconds(num_tokens * self.gpu_kv_bytes_per_token) + self.link.latency

    def run(self, requests: list[Request]) -> DisaggResult:
        """Simulate ``requests`` (sorted by arrival time) to completion through both pools."""
        with collector_paused():
            return self._run(requests)

    def _sequences(self, requests: list[Request]) -> list[tuple[Sequence, Sequence]]:
        """Each request as the prefill side runs it (one token) and as the decode side will; refuses
        what either pool's engine would refuse."""
        pairs = []
        for r in requests:
            try:
                prefill = self.prefill.make_sequence(replace(r, output_len=1))
            except ValueError as e:
                raise ValueError(f"prefill pool: {e}") from None
            try:
                decode = self.decode.make_sequence(r)
            except ValueError as e:
                raise ValueError(f"decode pool: {e}") from None
            pairs.append((prefill, decode))
        check_arrival_order([p for p, _ in pairs])
        return pairs

    def _run(self, requests: list[Request]) -> DisaggResult:
        c = self.config
        pairs = self._sequences(requests)
        decode_of = {p: d for p, d in pairs}
        max_len = self.decode.config.max_model_len
        check_stop = length_stop({d: min(d.num_prompt_tokens + d.sampling_params.max_tokens, max_len) for _, d in pairs}
                                 | {p: p.num_prompt_tokens + 1 for p, _ in pairs})
        prefills = [self.prefill.make_replica() for _ in range(c.prefill.instances)]
        decoders = [_Decoder(self.decode.make_replica()) for _ in range(c.decode.instances)]
        self._send_free = [0.0] * len(prefills)  # when each prefill instance's link is free to send
        self._transfers: list[KVTransfer] = []
        handoffs: list[tuple[float, int, _Handoff]] = []  # a heap by prefill end
        prefill_instance: dict[Sequence, int] = {}
        last: dict[str, Sequence] = {d.request_id: d for _, d in pairs}
        order = itertools.count()  # ties in the handoff heap go by prefill end, then first come
        i, num_steps = 0, 0
        while True:  # the earliest event next: an arrival, a handoff, or the step of the instance most behind
            t_arrival = pairs[i][0].arrival_time if i < len(pairs) else math.inf
            t_handoff = handoffs[0][0] if handoffs else math.inf
            prefill = min((r for r in prefills if r.scheduler.has_unfinished()), key=lambda r: r.now, default=None)
            t_prefill = prefill.now if prefill else math.inf
            decoder = min(decoders, key=lambda d: d.next_step_time())
            t_decode = decoder.next_step_time()
            if t_arrival <= min(t_handoff, t_prefill, t_decode) and i < len(pairs):
                seq = pairs[i][0]
                k = least_loaded(prefills)
                prefills[k].add(seq)
                prefill_instance[seq] = k
                i += 1
            elif t_handoff <= min(t_prefill, t_decode) and handoffs:
                _, _, h = heapq.heappop(handoffs)
                d = least_loaded(decoders)
                decoders[d].pending.append(h)
                self._admit(decoders[d], d, t_handoff)
            elif t_prefill <= t_decode and prefill is not None:
                record, finished = self.prefill.step(prefill, check_stop, num_steps)
                num_steps += 1
                for seq in finished:
                    h = self._handoff(seq, decode_of[seq], prefill_instance[seq], record.end_time)
                    if h is None:  # a one-token request ends on the prefill side
                        last[seq.request_id] = seq
                    else:
                        heapq.heappush(handoffs, (record.end_time, next(order), h))
            elif math.isfinite(t_decode):
                d = decoders.index(decoder)
                rep = decoder.replica
                rep.now = t_decode  # an idle instance's clock jumps to its first KV's arrival
                self._join_ready(decoder)
                self.decode.step(rep, check_stop, num_steps, allow_empty=bool(decoder.receiving))
                num_steps += 1
                self._admit(decoder, d, rep.now)  # finished requests freed blocks
            else:
                break
        prefill_steps = merged_steps(prefills)
        decode_steps = merged_steps([d.replica for d in decoders])
        shown = decode_steps if c.first_token == "decode" else sorted(
            prefill_steps + decode_steps, key=lambda s: (s[0].end_time, s[0].step))
        return DisaggResult(
            c, self.link, self.prefill.num_blocks, self.decode.num_blocks, [s[0] for s in shown],
            [s[0] for s in prefill_steps], [s[0] for s in decode_steps], [s[1] for s in prefill_steps],
            [s[1] for s in decode_steps], [s[2] for s in prefill_steps], [s[2] for s in decode_steps],
            [last[p.request_id] for p, _ in pairs], {p.request_id: p.arrival_time for p, _ in pairs},
            self._transfers)

    def _handoff(self, prefill_seq: Sequence, seq: Sequence, instance: int, prefill_end: float) -> _Handoff | None:
        """The decode side's request once its prefill ended; None when nothing is left to decode."""
        if self.config.first_token == "prefill":
            if seq.sampling_params.max_tokens <= 1:
                return None
            seq.token_ids.append(DUMMY_TOKEN)  # the prefill's token, streamed to the client already
            seq.first_scheduled_time = prefill_seq.first_scheduled_time
            seq.first_token_time = prefill_end
            kv_tokens = seq.num_prompt_tokens  # the decode's first step computes the new token's KV
        else:  # vLLM: the decode side recomputes the last prompt token and samples the first token
            kv_tokens = seq.num_prompt_tokens - 1
        return _Handoff(seq, instance, prefill_seq.first_scheduled_time, prefill_end, kv_tokens)

    def _admit(self, decoder: _Decoder, index: int, now: float) -> None:
        """Allocate blocks for the requests waiting at ``decoder``, first come first served, while its
        KV cache and ``max_num_seqs`` allow; each one admitted starts its transfer."""
        s = decoder.replica.scheduler
        bm = s.block_manager
        while decoder.pending and not s.waiting:  # preempted requests get the blocks back first
            if len(s.running) + len(s.waiting) + len(decoder.receiving) >= s.max_num_seqs:
                return
            h = decoder.pending[0]
            seq = h.seq
            cached = bm.find_cached_prefix(seq)
            hit = bm.cached_prefix_tokens(seq, cached)
            # room for its KV and its next token, so its first decode step needs no preemption (as the
            # engine's `minivllm.disagg` admission); FCFS: no one overtakes the request at the front
            if not bm.can_allocate(seq, h.kv_tokens - hit + 1, cached):
                return
            decoder.pending.popleft()
            s.receive_transferred(seq, cached, h.kv_tokens)
            h.transfer = self._transfer(h, index, decoder, now, h.kv_tokens - hit)
            self._transfers.append(h.transfer)
            decoder.receiving.append(h)

    def _transfer(self, h: _Handoff, index: int, decoder: _Decoder, admitted: float, num_tokens: int) -> KVTransfer:
        wire = self.link.wire_seconds(num_tokens * self.gpu_kv_bytes_per_token)
        p = h.prefill_instance
        if self.config.layer_pipelined and admitted == h.prefill_end:
            # the layers left while the prefill ran: the last one's share after its end, or the wire time
            # from the prefill's first step if the link is the slower
            start = max(h.prefill_start, self._send_free[p], decoder.receive_free)
            end = max(start + wire, h.prefill_end + wire / self.config.model.num_layers)
        else:
            start = max(admitted, self._send_free[p], decoder.receive_free)
            end = start + wire
        self._send_free[p] = decoder.receive_free = end
        return KVTransfer(h.seq.request_id, p, index, num_tokens, num_tokens * self.kv_bytes_per_token,
                          h.prefill_end, admitted, start, end, end + self.link.latency)

    def _join_ready(self, decoder: _Decoder) -> None:
        """The requests whose KV has arrived join the running batch, in arrival order."""
        now = decoder.replica.now
        ready = [h for h in decoder.receiving if h.transfer.ready <= now]
        for h in ready:
            decoder.receiving.remove(h)
            decoder.replica.scheduler.start_transferred(h.seq)



def _pool_simulator(config: DisaggConfig, side: str) -> Simulator:
    try:
        return Simulator(config.sim_config(side))
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(f"{side} pool") else f"{side} pool: {message}") from None
