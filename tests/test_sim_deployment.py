"""The simulator on a parallel deployment: one GPU is exactly the single-GPU cost model, TP and PP
step costs against hand-worked rooflines, DP routing, fp8 KV, CUDA graphs, speculative decoding
against its closed form, and the settings a deployment refuses."""
from __future__ import annotations

import math

import pytest

from minivllm.sim import (CostModel, DeploymentCost, Lengths, ParallelLayout, Request, SimConfig, SimSpeculation,
                          Simulator, Workload, compute_metrics, get_hardware, get_model, plan_layout, preset)
from minivllm.sim.deployment import KERNELS_PER_LAYER

LLAMA, H100 = get_model("Llama-3.1-8B"), get_hardware("H100-SXM")


def sim(layout=ParallelLayout(), **kw):
    return Simulator(SimConfig(LLAMA, H100, layout=layout, **({"max_model_len": 8192} | kw)))


# ---- one GPU: today's simulation, bit for bit ------------------------------------------------------
def test_one_gpu_step_costs_are_the_cost_models_to_the_last_bit():
    one = DeploymentCost(plan_layout(LLAMA, H100))
    cost = CostModel(LLAMA, H100)
    for step in [(1, 1, 1, 1000, 1000), (1, 2048, 1, 2048, 2048 * 2049 / 2), (37, 290, 33, 51_234, 80_000.5)]:
        assert one.step_cost(*step).time_s == cost.step_time(*step)


def test_one_gpu_run_is_the_single_gpu_simulation_step_for_step():
    """Every step of a run lasts exactly what the single-GPU cost model gives its chunks."""
    result = sim().run(preset("balanced", 150, request_rate=30).generate())
    cost = CostModel(LLAMA, H100)
    for rec, step_cost in zip(result.trace, result.step_costs):
        ends = [c.start + c.num_tokens for c in rec.chunks]
        pairs = sum(c.num_tokens * (c.start + e + 1) / 2 for c, e in zip(rec.chunks, ends))
        sampled = sum(c.sampled_token is not None for c in rec.chunks)
        want = cost.step_time(len(rec.chunks), rec.num_batched_tokens, sampled, sum(ends), pairs)
        assert rec.duration == pytest.approx(want, rel=1e-12) and step_cost.time_s == want
    assert set(result.step_replicas) == {0}


# ---- TP and PP against hand-worked rooflines ---------------------------------------------------------
def test_tp2_decode_step_by_hand():
    """One request decoding at context 1000 on two H100s (TP=2): each GPU reads half the layers' weights,
    4 of the 8 KV heads, and the two all-reduces per layer (plus the embedding's) and the logits'
    all-gather cost their latency and their wire bytes on NVLink's 450 GB/s each way."""
    plan = plan_layout(LLAMA, H100, ParallelLayout(tp=2))
    weights = plan.weight_bytes_per_gpu
    # q, o: 2 * 4096 * 16 heads * 128; k, v: 2 * 4096 * 4 * 128; norms 2 * 4096; MLP 3 * 4096 * 7168, per layer;
    # vocabulary halves of the embedding and the LM head, the final norm
    per_layer = 2 * 4096 * 16 * 128 + 2 * 4096 * 4 * 128 + 2 * 4096 + 3 * 4096 * 7168
    assert weights == 2 * (32 * per_layer + 2 * 64128 * 4096 + 4096)
    memory = (weights + 32 * 2 * 4 * 128 * 2 * 1000) / 3.35e12
    all_reduce = 65 * (10e-6 + 4096 * 2 * 2 * (1 / 2) / 450e9)
    all_gather = 10e-6 + 64128 * 2 * 1 / 450e9
    step = DeploymentCost(plan).step_cost(1, 1, 1, 1000, 1000)
    assert step.bound == "memory" and step.micro_batches == 1
    assert step.communication_s == pytest.approx(all_reduce + all_gather)
    assert step.time_s == pytest.approx(memory + all_reduce + all_gather + H100.step_overhead)
    # against one GPU: about half the memory time, plus 0.66 ms of collectives
    one = DeploymentCost(plan_layout(LLAMA, H100)).step_cost(1, 1, 1, 1000, 1000)
    assert step.memory_s == pytest.approx(one.memory_s / 2, rel=0.01)


def test_pp2_decode_costs_one_gpus_time_and_fills_with_two_micro_batches():
    """PP=2: a lone request passes both stages in turn (about one GPU's weight reads, one stage idle at
    a time); two requests run as two micro-batches, each stage busy the whole step."""
    plan = plan_layout(LLAMA, H100, ParallelLayout(pp=2))
    assert plan.stage_layers == (16, 16)
    w0, w1 = plan.stage_weight_bytes
    kv = 16 * 2 * 8 * 128 * 2  # each stage's 16 layers
    send = 2 * (10e-6 + 4096 * 2 / 450e9)  # hidden states and residual, first stage to second
    lone = DeploymentCost(plan).step_cost(1, 1, 1, 1000, 1000)
    assert lone.micro_batches == 1
    assert lone.time_s == pytest.approx((w0 + kv * 1000) / 3.35e12 + send + (w1 + kv * 1000) / 3.35e12
                                        + H100.step_overhead)
    pair = DeploymentCost(plan).step_cost(2, 2, 2, 2000, 2000)  # two decodes of context 1000
    t0, t1 = (w0 + kv * 1000) / 3.35e12 + send, (w1 + kv * 1000) / 3.35e12
    assert pair.micro_batches == 2
    assert pair.time_s == pytest.approx(max(t0 + t1, 2 * max(t0, t1)) + H100.step_overhead + 2 * H100.seq_overhead)


def test_pp_across_nodes_pays_the_network():
    """TP=8 x PP=2 on 16 H100s: the stage boundary is between two nodes, on 50 GB/s InfiniBand."""
    plan = plan_layout(get_model("Llama-3.1-70B"), H100, ParallelLayout(tp=8, pp=2))
    (send,) = [c for c in plan.stage_communication[0] if c.parallelism == "pp"]
    assert (send.link_bandwidth, send.link_latency) == (50e9, 25e-6)
    inside = plan_layout(get_model("Llama-3.1-70B"), H100, ParallelLayout(tp=4, pp=2))
    (send,) = [c for c in inside.stage_communication[0] if c.parallelism == "pp"]
    assert (send.link_bandwidth, send.link_latency) == (450e9, 10e-6)


# ---- data parallel: the router -----------------------------------------------------------------------
def test_dp2_routes_by_outstanding_tokens_and_serves_two_requests_at_one_requests_pace():
    reqs = [Request("a", 0.0, [1] * 500, 100), Request("b", 0.0, [2] * 500, 100)]
    two = sim(ParallelLayout(dp=2)).run(reqs)
    alone = sim().run(reqs[:1])
    finished = {s.request_id: s.finished_time for s in two.requests}
    assert finished["a"] == finished["b"] == alone.requests[0].finished_time  # each alone on its replica
    assert sorted(set(two.step_replicas)) == [0, 1]
    # the heavier replica is avoided: a long request first, then two short ones go to the other replica
    reqs = [Request("long", 0.0, [1] * 4000, 500), Request("s1", 0.0, [2] * 100, 10), Request("s2", 0.0, [3] * 100, 10)]
    result = sim(ParallelLayout(dp=2)).run(reqs)
    by_replica = {}
    for rec, r in zip(result.trace, result.step_replicas):
        for c in rec.chunks:
            by_replica.setdefault(c.request_id, set()).add(r)
    assert by_replica["s1"] == by_replica["s2"] != by_replica["long"]


def test_dp_doubles_throughput_at_saturation():
    work = Workload(400, math.inf, Lengths("fixed", 512), Lengths("fixed", 128)).generate()  # splits evenly
    one = compute_metrics(*_run(sim(max_num_seqs=32), work))
    two = compute_metrics(*_run(sim(ParallelLayout(dp=2), max_num_seqs=32), work))
    assert two.output_throughput == pytest.approx(2 * one.output_throughput, rel=0.1)


def _run(s, work):
    r = s.run(work)
    return r.trace, r.arrival_times


# ---- memory knobs ----------------------------------------------------------------------------------
def test_fp8_kv_cache_doubles_the_blocks():
    bf16, fp8 = sim(), sim(kv_cache_dtype="fp8")
    assert fp8.num_blocks in (2 * bf16.num_blocks, 2 * bf16.num_blocks + 1)
    assert fp8.plan.weight_bytes_per_gpu == bf16.plan.weight_bytes_per_gpu


def test_eager_mode_pays_a_launch_per_kernel():
    graphs, eager = sim().cost, sim(cuda_graphs=False).cost
    decode = (8, 8, 8, 8000, 8000)
    extra = KERNELS_PER_LAYER * 32 * H100.launch_overhead  # 1.7 ms for Llama-3.1-8B's 32 layers
    assert eager.step_cost(*decode).time_s - graphs.step_cost(*decode).time_s == pytest.approx(extra)
    assert eager.step_cost(*decode).overhead_s - graphs.step_cost(*decode).overhead_s == pytest.approx(extra)


# ---- speculative decoding ---------------------------------------------------------------------------
@pytest.mark.parametrize("k,alpha", [(3, 0.6), (5, 0.8)])
def test_tokens_per_decode_step_match_the_closed_form(k, alpha):
    spec = SimSpeculation("ngram", k, alpha, seed=1)
    result = sim(speculative=spec).run(
        Workload(40, math.inf, Lengths("fixed", 64), Lengths("fixed", 400), seed=2).generate())
    emitted = [1 + c.num_accepted for rec in result.trace for c in rec.chunks if c.draft_token_ids]
    assert all(len(c.draft_token_ids) <= k for rec in result.trace for c in rec.chunks)
    mean, n = sum(emitted) / len(emitted), len(emitted)
    var = sum((e - mean) ** 2 for e in emitted) / n
    assert mean == pytest.approx(spec.expected_tokens_per_step, abs=4 * math.sqrt(var / n))
    assert all(len(s.output_token_ids) == 400 for s in result.requests)  # nothing past max_tokens


def test_no_acceptance_emits_one_token_per_step_and_the_draft_model_costs_time():
    work = Workload(8, math.inf, Lengths("fixed", 64), Lengths("fixed", 50), seed=3).generate()
    plain = sim().run(work)
    never = sim(speculative=SimSpeculation("ngram", 4, 0.0)).run(work)
    assert [len(r.chunks) for r in never.trace] == [len(r.chunks) for r in plain.trace]
    drafted = sim(speculative=SimSpeculation("draft_model", 4, 0.0)).run(work)
    assert drafted.trace[-1].end_time > never.trace[-1].end_time > plain.trace[-1].end_time
    assert SimSpeculation("draft_model", 4, 0.5).draft_for(LLAMA).name == "Llama-3.2-1B"


# ---- refused deployments ---------------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: Simulator(SimConfig(get_model("Llama-3.1-70B"), H100)), "does not fit"),
    (lambda: Simulator(SimConfig(LLAMA, get_hardware("L4"))), "max_model_len=131072 is larger than the KV cache"),
    (lambda: Simulator(SimConfig(LLAMA, H100, layout=ParallelLayout(tp=3))), "tp=3"),
    (lambda: Simulator(SimConfig(LLAMA, H100, layout=ParallelLayout(cp=2))), "cp=2"),
    (lambda: Simulator(SimConfig(LLAMA, H100, kv_cache_dtype="int4")), "kv_cache_dtype='int4'"),
    (lambda: SimConfig(LLAMA, H100, layout=(2, 1)), "layout"),
    (lambda: SimConfig(LLAMA, H100, speculative="ngram"), "speculative"),
    (lambda: SimSpeculation("eagle", 2, 0.5), "method='eagle'"),
    (lambda: SimSpeculation("ngram", 0, 0.5), "num_speculative_tokens=0"),
    (lambda: SimSpeculation("ngram", 2, 1.0), "acceptance_rate=1.0"),
    (lambda: SimSpeculation("draft_model", 2, 0.5, draft=get_model("Qwen3-0.6B")).draft_for(LLAMA), "vocab"),
    (lambda: DeploymentCost(plan_layout(LLAMA, H100), cuda_graphs="yes"), "cuda_graphs"),
])
def test_refused_deployments_say_why(make, match):
    with pytest.raises(ValueError, match=match):
        make()
