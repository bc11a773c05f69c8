"""The parallelism planner: every formula on made-up models small enough to count by hand, real
models against their published sizes, the verdicts, and bad layouts."""
from __future__ import annotations

import pytest

from minivllm.config.parallel import pipeline_stages
from minivllm.sim import Hardware, ModelSpec, ParallelLayout, get_hardware, get_model, plan_layout

# d=4, 4 heads and 2 KV heads of 2, MLP 6, 3 layers, vocabulary 10, untied. Per layer: q, o 2*4*4*2 = 64,
# k, v 2*4*2*2 = 32, norms 8 (attention 104) + MLP 3*4*6 = 72 = 176; embedding 40, LM head 40, final norm 4.
TOY = ModelSpec("toy", vocab_size=10, hidden_size=4, intermediate_size=6, num_layers=3, num_heads=4,
                num_kv_heads=2, head_dim=2, tie_word_embeddings=False, max_model_len=100)
# the same with 4 experts (top 2) of MLP 2 and one shared expert in layers 1 and 2, layer 0 dense.
# Expert 3*4*2 = 24; MoE MLP: router 4*4 = 16 + 5 experts * 24 = 136; a token runs 16 + 3 * 24 = 88.
TOY_MOE = ModelSpec("toy-moe", 10, 4, 6, 3, 4, 2, 2, False, 100, num_experts=4, num_experts_per_token=2,
                    moe_intermediate_size=2, num_shared_experts=1, num_dense_layers=1)
# 1000 bytes of memory, 1000 B/s, 1000 FLOP/s, a 200 B/s link (100 B/s each way)
TOY_GPU = Hardware("toy-gpu", 1000, 1000, {"bf16": 1000}, interconnect_bandwidth=200)


def toy_plan(layout=ParallelLayout(), model=TOY, gpu=TOY_GPU, **kw):
    kw = {"gpu_memory_utilization": 1.0, "context_len": 5, "step_tokens": 4, "max_num_batched_tokens": None} | kw
    return plan_layout(model, gpu, layout, **kw)


def comm(plan, parallelism, op):
    (c,) = [c for c in plan.communication if (c.parallelism, c.op) == (parallelism, op)]
    return c


# ---- model shapes -----------------------------------------------------------------------------
def test_moe_parameter_counts_by_hand():
    assert TOY.num_params == TOY.active_params == 3 * 176 + 84
    # dense layer 104 + 72, MoE layers 104 + 136 (all experts) or 104 + 88 (the ones a token runs)
    assert TOY_MOE.num_params == 176 + 2 * 240 + 84
    assert TOY_MOE.active_params == 176 + 2 * 192 + 84
    assert TOY_MOE.kv_bytes_per_token(2) == TOY.kv_bytes_per_token(2) == 2 * 3 * 2 * 2 * 2


@pytest.mark.parametrize("name,total,active,rel", [
    ("Qwen3-30B-A3B", 30.5e9, 3.3e9, 0.02),  # the model cards: 30.5B total, 3.3B activated
    ("Qwen3-235B-A22B", 235e9, 22e9, 0.01),  # 235B total, 22B activated
    ("DeepSeek-V3", 671e9, 37e9, 0.04),  # 671B total (without the 14B MTP module), 37B activated
])
def test_moe_models_match_published_sizes(name, total, active, rel):
    spec = get_model(name)
    assert spec.num_params == pytest.approx(total, rel=0.005)
    assert spec.active_params == pytest.approx(active, rel=rel)


def test_deepseek_kv_cache_is_the_mla_latent():
    # 61 layers * (kv_lora_rank 512 + rope 64) values * 2 bytes, no separate K and V
    assert get_model("DeepSeek-V3").kv_bytes_per_token(2) == 61 * 576 * 2


# ---- weights and KV per GPU -------------------------------------------------------------------
def test_one_gpu_holds_the_whole_model():
    p = toy_plan()
    assert p.stage_weight_bytes == (2 * 612,) and p.stage_kv_bytes_per_token == (2 * 3 * 2 * 2 * 2,)
    assert p.communication == () and p.bubble_fraction == 0
    # 1224 bytes of weights on a 1000-byte GPU
    assert p.kv_tokens == 0 and not p.fits and "does not fit: 0.0 GB of weights per GPU" in p.verdict


def test_tensor_parallel_splits_heads_mlp_and_vocabulary():
    # TP=2: q, o 2*4*2*2 = 32, k, v one KV head 2*4*1*2 = 16, norms 8, MLP 36; vocabulary 5 rows of 4
    p = toy_plan(ParallelLayout(tp=2))
    assert p.stage_weight_bytes == (2 * (3 * (32 + 16 + 8 + 36) + 20 + 20 + 4),)
    assert p.stage_kv_bytes_per_token == (2 * 3 * 1 * 2 * 2,)
    assert p.kv_tokens == (1000 - 640) // 24


def test_tp_beyond_the_kv_heads_replicates_them():
    # TP=4 > 2 KV heads: each GPU keeps one; q, o one head 16, k, v 16, norms 8, MLP 18; vocabulary ceil(10/4) = 3 rows
    p = toy_plan(ParallelLayout(tp=4))
    assert p.stage_weight_bytes == (2 * (3 * (16 + 16 + 8 + 18) + 12 + 12 + 4),)
    assert p.stage_kv_bytes_per_token == (2 * 3 * 1 * 2 * 2,)  # as much KV per GPU as TP=2


def test_pipeline_stages_follow_vllm():
    assert pipeline_stages(3, 2) == (2, 1)  # the extra layer on the second-to-last stage
    assert pipeline_stages(10, 4) == (2, 3, 3, 2)
    assert pipeline_stages(61, 4) == (15, 15, 16, 15)  # vLLM's docs, DeepSeek-V3 at PP=4
    assert pipeline_stages(8, 4) == (2, 2, 2, 2)


def test_pipeline_parallel_splits_layers_and_keeps_the_smallest_kv_cache():
    p = toy_plan(ParallelLayout(pp=2))
    # stage 0: layers 0-1 + embedding = 2*176 + 40; stage 1: layer 2 + LM head + final norm = 176 + 44
    assert p.stage_layers == (2, 1)
    assert p.stage_weight_bytes == (2 * 392, 2 * 220)
    assert p.stage_kv_bytes_per_token == (32, 16)
    assert p.kv_tokens == min((1000 - 784) // 32, (1000 - 440) // 16) == 6
    assert p.weight_bytes_per_gpu == 784 and p.kv_bytes_per_token_per_gpu == 32


def test_tied_lm_head_is_a_second_copy_only_on_another_stage():
    tied = ModelSpec("tied", 10, 4, 6, 3, 4, 2, 2, True, 100)
    assert toy_plan(model=tied).stage_weight_bytes == (2 * (3 * 176 + 40 + 4),)
    assert toy_plan(ParallelLayout(pp=2), model=tied).stage_weight_bytes == (2 * 392, 2 * 220)


def test_expert_parallel_spreads_routed_experts_whole():
    # TP=2, EP=4 over tp*dp = 4 GPUs: attention 56, router 16, one routed expert 24, half the shared one 12
    p = toy_plan(ParallelLayout(tp=2, dp=2, ep=4), model=TOY_MOE)
    assert p.stage_weight_bytes == (2 * ((56 + 36) + 2 * (56 + 16 + 24 + 12) + 20 + 20 + 4),)
    # without EP every routed expert is split two ways: 4 * 24 / 2 = 48
    q = toy_plan(ParallelLayout(tp=2), model=TOY_MOE)
    assert q.stage_weight_bytes == (2 * ((56 + 36) + 2 * (56 + 16 + 48 + 12) + 20 + 20 + 4),)


def test_context_parallel_multiplies_the_kv_tokens_of_a_replica():
    single, cp = toy_plan(ParallelLayout(pp=2)), toy_plan(ParallelLayout(pp=2, cp=2))
    assert cp.kv_tokens == 2 * single.kv_tokens and cp.stage_weight_bytes == single.stage_weight_bytes


def test_data_parallel_replicates_and_multiplies_concurrency():
    p = toy_plan(ParallelLayout(pp=2, dp=3), context_len=3)
    assert p.stage_weight_bytes == toy_plan(ParallelLayout(pp=2)).stage_weight_bytes
    assert p.max_concurrency == 3 * (6 // 3) and p.layout.num_gpus == 6


# ---- communication ------------------------------------------------------------------------------
def test_tensor_parallel_communication_by_hand():
    p = toy_plan(ParallelLayout(tp=2))  # a decode step of 4 tokens, all sampled
    ar = comm(p, "tp", "all_reduce")
    # two per layer + the embedding's, each of 4 tokens * d=4 * 2 bytes; a ring sends 2 (n-1)/n of it
    assert (ar.calls_per_step, ar.payload_bytes_per_call, ar.payload_bytes_per_step) == (7, 32, 224)
    assert ar.wire_bytes_per_step == 224 * 2 * 1 / 2 and ar.wire_bytes_per_token == 56
    assert ar.seconds_per_token == pytest.approx(56 / 100)  # one direction of the 200 B/s link
    ag = comm(p, "tp", "all_gather")
    # the LM head's logits: 4 sampled rows of this GPU's 5 vocabulary entries, sent to the other GPU
    assert (ag.calls_per_step, ag.payload_bytes_per_call, ag.wire_bytes_per_call) == (1, 40, 40)
    q = toy_plan(ParallelLayout(tp=4))
    assert comm(q, "tp", "all_reduce").wire_bytes_per_call == 32 * 2 * 3 / 4
    assert comm(q, "tp", "all_gather").wire_bytes_per_call == 4 * 3 * 2 * 3  # 3 other shards of 3 entries


def test_a_prefill_step_gathers_only_the_sampled_logits():
    p = toy_plan(ParallelLayout(tp=2), step_tokens=4, sampled_tokens=1)
    assert comm(p, "tp", "all_gather").payload_bytes_per_call == 1 * 5 * 2
    assert comm(p, "tp", "all_reduce").payload_bytes_per_call == 32


def test_pipeline_sends_hidden_states_per_micro_batch_and_has_a_bubble():
    p = toy_plan(ParallelLayout(pp=2))  # default 2 micro-batches of 2 tokens
    send = comm(p, "pp", "send")
    # hidden states and residual of each micro-batch: 2 tokens * d=4 * 2 bytes each
    assert (send.calls_per_step, send.payload_bytes_per_call, send.wire_bytes_per_step) == (4, 2 * 4 * 2, 64)
    assert p.bubble_fraction == pytest.approx(1 / 3)
    assert toy_plan(ParallelLayout(pp=2), micro_batches=1).bubble_fraction == pytest.approx(1 / 2)
    assert toy_plan(ParallelLayout(pp=3), micro_batches=6).bubble_fraction == pytest.approx(2 / 8)


def test_tensor_and_pipeline_parallel_communicate_per_stage_and_micro_batch():
    p = toy_plan(ParallelLayout(tp=2, pp=2))  # 2 micro-batches of 2 tokens, all sampled
    first, last = p.stage_communication
    # stage 0 (2 layers): per micro-batch 2 * 2 + 1 (embedding) all-reduces of 2 tokens * d=4 * 2 B,
    # and the hidden states and residual sent on
    assert [(c.parallelism, c.op, c.calls_per_step, c.payload_bytes_per_call) for c in first] == [
        ("tp", "all_reduce", 2 * 5, 16), ("pp", "send", 2 * 2, 16)]
    # stage 1 (1 layer): 2 all-reduces per micro-batch, and each micro-batch's 2 rows of 5 logits
    assert [(c.parallelism, c.op, c.calls_per_step, c.payload_bytes_per_call) for c in last] == [
        ("tp", "all_reduce", 2 * 2, 16), ("tp", "all_gather", 2 * 1, 20)]
    # the busiest GPU is on stage 0: all-reduce 160 B + send 64 B on the wire, against 80 + 40
    assert p.communication == first


def test_expert_all_to_all_by_hand():
    p = toy_plan(ParallelLayout(tp=2, dp=2, ep=4), model=TOY_MOE)
    a2a = comm(p, "ep", "all_to_all")
    # dispatch + combine in 2 MoE layers; this GPU's 4 / tp = 2 tokens, each to 2 experts, d=4, 2 bytes;
    # with uniform routing 3 of 4 copies leave the GPU
    assert (a2a.calls_per_step, a2a.payload_bytes_per_call, a2a.wire_bytes_per_call) == (4, 32, 24)


def test_context_parallel_ring_passes_kv_blocks():
    p = toy_plan(ParallelLayout(cp=2))
    ring = comm(p, "cp", "send")
    # each of 3 layers passes its KV block once around a ring of 2: 2 tokens * (K and V) * 2 heads * 2 * 2 B
    assert (ring.calls_per_step, ring.payload_bytes_per_call) == (3, 2 * 2 * 2 * 2 * 2)


def test_compute_per_token_is_the_gpus_share_of_the_flops():
    p = toy_plan(ParallelLayout(tp=2))
    # 2 * 528 decoder weights + 2 * 40 LM head + 4 * 3 layers * 4 heads * 2 * 5 keys, half on each GPU
    assert p.compute_seconds_per_token == pytest.approx((1056 + 80 + 480) / 2 / 1000)
    assert p.communication_seconds_per_token == pytest.approx((56 + 10) / 100)
    assert not p.communication_bound
    slow = toy_plan(ParallelLayout(tp=2), gpu=Hardware("slow-link", 1000, 1000, {"bf16": 1000}, 100))
    assert slow.communication_bound  # 1.32 s of communication against 0.808 s of compute


# ---- real models -------------------------------------------------------------------------------
def test_llama_70b_on_two_h100s():
    h100, llama = get_hardware("H100-SXM"), get_model("Llama-3.1-70B")
    one = plan_layout(llama, h100)
    assert one.weight_bytes_per_gpu == pytest.approx(141e9, rel=0.002)  # 141 GB of bf16 weights
    assert not one.fits and one.kv_tokens == 0 and "does not fit" in one.verdict
    p = plan_layout(llama, h100, ParallelLayout(tp=2), gpu_memory_utilization=1.0)
    assert p.weight_bytes_per_gpu == pytest.approx(70.6e9, rel=0.002)
    # the profiled pass of 8192 tokens: per token the MLP's gate, up and product (3 * 28672 / 2), 32 q and
    # 2 * 4 KV heads of 128, two hidden vectors of 8192, in bf16; fp32 logits and probabilities of 256 rows
    activations = 8192 * (3 * 28672 // 2 + (32 + 2 * 4) * 128 + 2 * 8192) * 2 + 256 * 2 * 4 * 128256
    assert p.stage_activation_bytes == (activations,) and activations == pytest.approx(1.32e9, rel=0.01)
    left = 79.11 * 2 ** 30 - p.weight_bytes_per_gpu - activations - 0.35 * 2 ** 30  # CUDA's own 0.35 GiB
    assert left == pytest.approx(12.65e9, rel=0.01)
    # 4 of the 8 KV heads per GPU: 2 * 80 layers * 4 * 128 * 2 B = 160 KiB per token
    assert p.kv_bytes_per_token_per_gpu == 160 * 1024
    assert p.kv_tokens == int(left // 163840)
    ar = comm(p, "tp", "all_reduce")
    assert ar.calls_per_step == 161 and ar.payload_bytes_per_call == 256 * 8192 * 2


def test_one_h100_holds_the_kv_tokens_vllm_logs_for_llama_8b():
    """vLLM's log for Llama-3.1-8B on an H100 at 0.9: total_gpu_memory 79.11 GiB, weights 14.99 GiB,
    non-torch 0.35 GiB, activation peak 1.24 GiB, "GPU KV cache size: 447,088 tokens"."""
    p = plan_layout(get_model("Llama-3.1-8B"), get_hardware("H100-SXM"))
    activations = 8192 * (3 * 14336 + (32 + 16) * 128 + 2 * 4096) * 2 + 256 * 2 * 4 * 128256
    assert p.kv_tokens == (79.11 * 2 ** 30 * 0.9 - 2 * 8_030_261_248 - activations - 0.35 * 2 ** 30) // 131072
    assert p.kv_tokens == pytest.approx(447_088, rel=0.005)


def test_an_h200_holds_the_kv_blocks_a_real_run_measured():
    """minivllm on an H200, Qwen3-0.6B's shape, block size 16, its default token budget of 2048:
    72,527 blocks (the datasheet's 141 GB gave 68,505)."""
    p = plan_layout(get_model("Qwen3-0.6B"), get_hardware("H200"), max_num_batched_tokens=2048)
    assert p.kv_tokens // 16 == pytest.approx(72_527, rel=0.002)


def test_deepseek_v3_kv_is_replicated_under_tp_and_fits_eight_h200s_in_fp8():
    ds, h200 = get_model("DeepSeek-V3"), get_hardware("H200")
    p = plan_layout(ds, h200, ParallelLayout(tp=8), dtype="fp8")
    assert p.kv_bytes_per_token_per_gpu == 61 * 576  # the MLA latent whole on every GPU, as vLLM keeps it
    assert p.fits and "fits" in p.verdict
    assert not plan_layout(ds, h200, ParallelLayout(tp=8)).fits  # 1.34 TB of bf16 weights over 8 x 141 GB


def test_without_nvlink_tp_is_communication_bound_and_pp_is_not():
    llama, l4 = get_model("Llama-3.1-8B"), get_hardware("L4")
    tp = plan_layout(llama, l4, ParallelLayout(tp=8))
    pp = plan_layout(llama, l4, ParallelLayout(pp=8))
    # TP: 65 all-reduces of d=4096 * 2 B per token, 2 * 7/8 of it on the wire, at 32 GB/s each way, and
    # 15 us of latency per call over the step's 256 tokens
    assert comm(tp, "tp", "all_reduce").seconds_per_token == pytest.approx(65 * 8192 * 1.75 / 32e9 + 65 * 15e-6 / 256)
    assert tp.communication_bound and "communication-bound" in tp.verdict and "PP over TP" in tp.verdict
    # PP: hidden state and residual of each token, once per stage boundary
    # (the step's 256 tokens as 8 micro-batches: 16 sends, each with its latency)
    assert pp.communication_seconds_per_token == pytest.approx(2 * 8192 / 32e9 + 8 * 2 * 15e-6 / 256)
    assert not pp.communication_bound and "fits" in pp.verdict
    # the same TP over NVLink is not
    assert not plan_layout(llama, get_hardware("A100-80GB"), ParallelLayout(tp=8)).communication_bound


def test_a_context_longer_than_the_cache_does_not_fit():
    p = plan_layout(get_model("Llama-3.1-70B"), get_hardware("H100-SXM"), ParallelLayout(tp=2),
                    context_len=32768)  # 25.6k tokens of KV at utilisation 0.9
    assert p.kv_tokens > 0 and not p.fits and "fewer than one request" in p.verdict


# ---- bad input -----------------------------------------------------------------------------------
GQA = ModelSpec("gqa", 10, 12, 6, 3, 12, 4, 1, False, 100)
LLAMA, H100 = get_model("Llama-3.1-8B"), get_hardware("H100-SXM")


@pytest.mark.parametrize("make,match", [
    (lambda: ParallelLayout(tp=0), "tp=0"),
    (lambda: ParallelLayout(pp=1.5), "pp=1.5"),
    (lambda: ParallelLayout(cp=True), "cp=True"),
    (lambda: ParallelLayout(tp=2, ep=4), "ep=4"),
    (lambda: plan_layout(LLAMA, H100, ParallelLayout(tp=3)), "tp=3.*num_heads=32"),
    (lambda: toy_plan(ParallelLayout(tp=6), model=GQA), "tp=6.*num_kv_heads=4"),
    (lambda: plan_layout(LLAMA, H100, ParallelLayout(pp=33)), "pp=33.*num_layers=32"),
    (lambda: plan_layout(LLAMA, H100, ParallelLayout(tp=2, ep=2)), "ep=2.*dense"),
    (lambda: toy_plan(ParallelLayout(dp=3, ep=3), model=TOY_MOE), "ep=3.*num_experts=4"),
    (lambda: plan_layout(LLAMA, H100, context_len=200_000), "context_len=200000"),
    (lambda: plan_layout(LLAMA, H100, gpu_memory_utilization=0), "gpu_memory_utilization=0"),
    (lambda: plan_layout(LLAMA, get_hardware("A100-80GB"), dtype="fp8"), "dtype='fp8'"),
    (lambda: plan_layout(LLAMA, H100, dtype="int4"), "dtype='int4'"),
    (lambda: plan_layout(LLAMA, H100, step_tokens=0), "step_tokens=0"),
    (lambda: plan_layout(LLAMA, H100, step_tokens=4, sampled_tokens=5), "sampled_tokens=5"),
    (lambda: plan_layout(LLAMA, H100, ParallelLayout(pp=2), micro_batches=0), "micro_batches=0"),
    (lambda: plan_layout(LLAMA, Hardware("no-link", 1e9, 1e9, {"bf16": 1e9}), ParallelLayout(tp=2)),
     "interconnect_bandwidth=0"),
    (lambda: ModelSpec("m", 10, 4, 6, 3, 4, 2, 2, False, 100, num_experts=4, num_experts_per_token=5,
                       moe_intermediate_size=2), "num_experts_per_token=5"),
    (lambda: ModelSpec("m", 10, 4, 6, 3, 4, 2, 2, False, 100, moe_intermediate_size=2), "num_experts=0"),
    (lambda: ModelSpec("m", 10, 4, 6, 3, 4, 2, 2, False, 100, num_experts=4, num_experts_per_token=1,
                       moe_intermediate_size=2, num_dense_layers=3), "num_dense_layers=3"),
    (lambda: ModelSpec("m", 10, 4, 6, 3, 4, 2, 2, False, 100, num_experts=-1), "num_experts=-1"),
])
def test_bad_layouts_raise_value_error_naming_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_context_parallel_cost_formulas_and_agreement_with_plan_layout():
    from minivllm.sim.planner import context_parallel_cost

    llama, h100 = get_model("Llama-3.1-8B"), get_hardware("H100-SXM")
    e = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads of 128, bf16: 128 KiB per token
    one = context_parallel_cost(llama, h100, 1, 131072)
    assert one.kv_bytes_per_token == e and one.kv_bytes_per_gpu == 131072 * e
    assert (one.prefill_wire_bytes_per_token, one.decode_wire_bytes_per_token, one.decode_calls_per_token,
            one.pass_kv_decode_wire_bytes_per_token, one.decode_comm_seconds_per_token,
            one.prefill_comm_seconds) == (0, 0, 0, 0, 0, 0)
    four = context_parallel_cost(llama, h100, 4, 131073)
    assert four.kv_bytes_per_gpu == 32769 * e  # ceil(C / cp) tokens
    assert four.prefill_wire_bytes_per_token == 3 / 4 * e
    # the ring's bytes per prompt token are plan_layout's cp send
    plan = plan_layout(llama, h100, ParallelLayout(cp=4), context_len=131072, step_tokens=8192)
    (send,) = plan.communication
    assert (send.parallelism, send.op) == ("cp", "send")
    assert send.wire_bytes_per_token == pytest.approx(four.prefill_wire_bytes_per_token)
    # decode: per layer, all-gather q (3 * 32 heads * 128 * 2 B), LSEs (3 * 4 * 32 * 4 B), reduce-scatter out
    assert four.decode_wire_bytes_per_token == 32 * (3 * 32 * 128 * 2 + 3 * 4 * 32 * 4 + 3 * 32 * 128 * 2)
    assert four.decode_calls_per_token == 96
    assert four.decode_comm_seconds_per_token == pytest.approx(96 * 10e-6 + four.decode_wire_bytes_per_token / 450e9)
    assert four.pass_kv_decode_wire_bytes_per_token == 3 * 32769 * e
    assert four.prefill_comm_seconds == pytest.approx(131073 * 0.75 * e / 450e9)
    # the block a GPU needs for its send to hide: K b F / (2 H B) = 8 * 2 * 989e12 / (2 * 32 * 450e9)
    assert four.ring_hide_tokens == pytest.approx(8 * 2 * 989e12 / (2 * 32 * 450e9))
    # with tp, the GPU holds H / tp query heads and K / tp KV heads
    tp2 = context_parallel_cost(llama, h100, 2, 1000, tp=2)
    assert tp2.kv_bytes_per_token == e // 2
    assert tp2.decode_wire_bytes_per_token == 32 * 1 * 16 * (2 * 128 * 2 + 4 * 2)
    # past a node, the network
    assert context_parallel_cost(llama, h100, 16, 1000).link == (h100.network_bandwidth, h100.network_latency)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cp=0), "cp=0"), (dict(cp=2.0), "cp=2.0"), (dict(context_len=0), "context_len=0"),
    (dict(tp=3), "tp=3"), (dict(dtype="int3"), "dtype"), (dict(kv_cache_dtype="int3"), "kv_cache_dtype"),
])
def test_context_parallel_cost_refuses_bad_input(kwargs, match):
    from minivllm.sim.planner import context_parallel_cost

    args = dict(cp=2, context_len=1000) | kwargs
    with pytest.raises(ValueError, match=match):
        context_parallel_cost(get_model("Llama-3.1-8B"), get_hardware("H100-SXM"), **args)
