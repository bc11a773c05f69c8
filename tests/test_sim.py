"""The simulator: metrics on a hand-made trace, workload statistics, the cost model on hand-checked
cases, the real scheduler's decisions reproduced step for step, and bad inputs."""
from __future__ import annotations

import gc
import math
from pathlib import Path

import numpy as np
import pytest

from minivllm import LLM, SamplingParams
from minivllm.core.trace import ChunkRecord, StepRecord
from minivllm.sim import (SLO, CostModel, Hardware, Lengths, ModelSpec, Request, SimConfig, Simulator, Workload,
                          compute_metrics, get_hardware, get_model, preset, request_timelines, step_timeline)


# ---- metrics on a hand-made trace -------------------------------------------------------------
def record(step, start, end, chunks, finished=(), preempted=(), free=10):
    return StepRecord(step=step, start_time=start, end_time=end,
                      chunks=tuple(ChunkRecord(*c) for c in chunks), preempted=preempted,
                      finished=tuple((rid, "length") for rid in finished), blocks_allocated=(),
                      blocks_freed=(), blocks_cache_hit=(), blocks_evicted=(), num_free_blocks=free,
                      num_cached_free_blocks=0, num_running=1, num_waiting=0, blocks=None)


# A arrives at 0 with 4 prompt tokens, B at 0.5 with 3; both generate 3 tokens.
# A's tokens come at 1, 2, 4; B's at 2, 4, 5.
HAND_TRACE = [
    record(0, 0, 1, [("A", 0, 4, True, 7)], free=8),
    record(1, 1, 2, [("A", 4, 1, False, 7), ("B", 0, 3, True, 7)], free=6),
    record(2, 2, 4, [("A", 5, 1, False, 7), ("B", 3, 1, False, 7)], finished=["A"], free=7),
    record(3, 4, 5, [("B", 4, 1, False, 7)], finished=["B"], free=10),
]
ARRIVALS = {"A": 0.0, "B": 0.5}


def test_metrics_match_hand_computed_values():
    m = compute_metrics(HAND_TRACE, ARRIVALS, SLO(ttft=1.2))
    assert m.num_requests == 2 and m.duration == 5
    assert (m.total_input_tokens, m.total_output_tokens) == (7, 6)
    assert m.request_throughput == pytest.approx(0.4)
    assert m.output_throughput == pytest.approx(1.2)
    assert m.total_token_throughput == pytest.approx(2.6)
    assert m.goodput == pytest.approx(0.2)  # only A's TTFT (1.0) meets 1.2 s; B's is 1.5
    assert (m.ttft.mean, m.ttft.median, m.ttft.p99) == pytest.approx((1.25, 1.25, 1.495))
    assert (m.tpot.mean, m.tpot.median) == pytest.approx((1.5, 1.5))  # (4-1)/2 and (5-2)/2
    assert (m.itl.mean, m.itl.median, m.itl.p99) == pytest.approx((1.5, 1.5, 2.0))  # gaps 1, 2, 2, 1
    assert (m.e2e.mean, m.e2e.median, m.e2e.p99) == pytest.approx((4.25, 4.25, 4.495))
    assert m.num_preemptions == 0
    assert "Mean TTFT (ms)" in m.table() and "1250.00" in m.table()


def test_timelines_and_step_series_from_the_hand_trace():
    a, b = request_timelines(HAND_TRACE, ARRIVALS)
    assert (a.request_id, a.first_scheduled, a.first_token, a.finished, a.token_times) == ("A", 0, 1, 4, (1, 2, 4))
    assert (b.first_scheduled, b.num_prompt_tokens, b.tpot) == (1, 3, 1.5)
    t = step_timeline(HAND_TRACE, num_blocks=10)
    assert t.kv_usage.tolist() == pytest.approx([0.2, 0.4, 0.3, 0.0])


def test_a_preempted_request_is_counted_and_its_recompute_is_not_an_output_token():
    # C (2 prompt tokens) samples at 1, is preempted in step 1 by D, recomputes 3 tokens in step 2
    trace = [record(0, 0, 1, [("C", 0, 2, True, 5), ("D", 0, 2, True, 5)]),
             record(1, 1, 2, [("D", 2, 1, False, 5)], preempted=("C",)),
             record(2, 2, 3, [("C", 0, 3, True, 5), ("D", 3, 1, False, 5)], finished=["C", "D"])]
    m = compute_metrics(trace, {"C": 0.0, "D": 0.0})
    assert m.num_preemptions == 1 and m.total_output_tokens == 5 and m.total_input_tokens == 4
    c, d = request_timelines(trace, {"C": 0.0, "D": 0.0})
    assert (c.num_preemptions, c.token_times, c.num_prompt_tokens) == (1, (1, 3), 2)
    assert step_timeline(trace, 10).preemptions.tolist() == [0, 1, 0]


# ---- workloads ------------------------------------------------------------------------------------
@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrival_gaps_have_the_rate_and_burstiness_asked_for(burstiness):
    w = Workload(20000, 8.0, Lengths("fixed", 4), Lengths("fixed", 2), burstiness=burstiness, seed=3)
    gaps = np.diff(w.arrival_times(np.random.default_rng(3)))
    # gamma(shape k, mean 1/rate): coefficient of variation 1/sqrt(k); 1 for a Poisson process
    assert gaps.mean() == pytest.approx(1 / 8, rel=4 / math.sqrt(burstiness * len(gaps)))
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_length_distributions():
    rng = np.random.default_rng(0)
    n = 20000
    assert set(Lengths("fixed", 7).sample(rng, n)) == {7}
    u = Lengths("uniform", 100, 50).sample(rng, n)
    assert u.min() >= 50 and u.max() <= 150 and u.mean() == pytest.approx(100, abs=1.5)
    ln = Lengths("lognormal", 200, 0.5, maximum=10**6).sample(rng, n)
    # log of the draws: normal with sigma 0.5 and mean log(200) - 0.5**2 / 2
    assert np.log(ln).std() == pytest.approx(0.5, rel=0.03)
    assert ln.mean() == pytest.approx(200, rel=0.02)
    assert Lengths("lognormal", 200, 1.0, maximum=300).sample(rng, n).max() == 300


def test_workload_is_seeded_and_shares_prefixes():
    w = Workload(50, 2.0, Lengths("uniform", 40, 20), Lengths("fixed", 5), shared_prefix_len=16,
                 num_prefix_groups=2, vocab_size=100, seed=1)
    a, b = w.generate(), w.generate()
    assert a == b
    assert a != Workload(50, 2.0, Lengths("uniform", 40, 20), Lengths("fixed", 5), seed=2).generate()
    prefixes = {tuple(r.prompt_token_ids[:16]) for r in a}
    assert len(prefixes) == 2
    assert all(17 <= len(r.prompt_token_ids) <= 60 and r.output_len == 5 for r in a)
    assert a[0].arrival_time == 0 and all(x.arrival_time <= y.arrival_time for x, y in zip(a, a[1:]))
    assert all(r.arrival_time == 0 for r in Workload(5, math.inf, Lengths("fixed", 3), Lengths("fixed", 3)).generate())


# ---- model shapes and the cost model ----------------------------------------------------------------
def test_model_shapes_match_published_sizes():
    assert get_model("Llama-3.1-8B").num_params == 8_030_261_248  # the hub's parameter count
    assert get_model("Llama-3.1-8B").kv_bytes_per_token(2) == 128 * 1024  # 2 * 32 layers * 8 heads * 128 * 2 B
    qwen = get_model("Qwen3-0.6B")
    assert qwen.num_layers * qwen.layer_params == pytest.approx(0.44e9, rel=0.01)  # "non-embedding 0.44B"
    assert get_model("Llama-3.1-70B").num_params == pytest.approx(70.6e9, rel=0.01)


def test_model_spec_from_a_checkpoint_folder(checkpoint):
    import json
    folder = checkpoint("qwen3")
    with open(Path(folder) / "config.json") as f:
        raw = json.load(f)
    spec = ModelSpec.from_folder(folder)
    assert (spec.hidden_size, spec.num_layers, spec.num_kv_heads, spec.vocab_size) == (
        raw["hidden_size"], raw["num_hidden_layers"], raw["num_key_value_heads"], raw["vocab_size"])


def test_cost_model_on_hand_checked_steps():
    h100 = get_hardware("H100-SXM")
    cost = CostModel(get_model("Llama-3.1-8B"), h100, "bf16")
    # one decode at context 1000: memory-bound, weights (16.06 GB) + 1000 tokens of KV at 3.35 TB/s
    expected = (2 * 8_030_261_248 + 131072 * 1000) / 3.35e12 + h100.step_overhead
    assert cost.step_time(1, 1, 1, 1000, 1000) == pytest.approx(expected)
    assert expected - h100.step_overhead == pytest.approx(4.833e-3, rel=1e-3)  # 4.8 ms per decode step
    # a 2048-token prompt from scratch: compute-bound; linear layers 2 * 6.98e9 FLOPs per token,
    # lm_head once, attention 4 * 32 layers * 32 heads * 128 * (2048 * 2049 / 2) pairs
    flops = 2 * 6_979_584_000 * 2048 + 2 * 525_336_576 + 4 * 32 * 32 * 128 * 2048 * 2049 / 2
    assert cost.step_time(1, 2048, 1, 2048, 2048 * 2049 / 2) == pytest.approx(flops / 989e12 + h100.step_overhead)


def test_per_request_overhead_adds_linearly():
    hw = Hardware("toy", 1e9, 1e9, {"fp32": 1e12}, step_overhead=0.01, seq_overhead=0.002)
    cost = CostModel(get_model("Qwen3-0.6B"), hw, "fp32")
    assert cost.step_time(5, 5, 5, 50, 50) - cost.step_time(1, 5, 5, 50, 50) == pytest.approx(4 * 0.002)


# ---- the simulator runs the real scheduler -------------------------------------------------------
@pytest.mark.parametrize("policy,chunked,blocks", [("continuous", True, 12), ("continuous", False, 40),
                                                    ("static", True, 40)])
def test_simulator_schedules_exactly_like_the_real_engine(checkpoint, policy, chunked, blocks):
    """Same requests, same settings, same number of KV blocks: the real engine and the simulator
    run identical chunks and preemptions in every step (12 blocks force preemptions)."""
    folder = checkpoint("qwen3")
    spec = ModelSpec.from_folder(folder)
    requests = Workload(12, math.inf, Lengths("uniform", 30, 20), Lengths("uniform", 12, 8),
                        vocab_size=spec.vocab_size, seed=5).generate()
    requests = [Request(str(i), 0.0, r.prompt_token_ids, r.output_len) for i, r in enumerate(requests)]
    budget = 48 if chunked else 256
    llm = LLM(folder, device="cpu", block_size=8, max_num_seqs=5, max_num_batched_tokens=budget, max_model_len=256,
              num_kv_blocks=blocks, enable_chunked_prefill=chunked, batching_policy=policy)
    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests],
                 [SamplingParams(max_tokens=r.output_len, ignore_eos=True) for r in requests], use_tqdm=False)
    sim = Simulator(SimConfig(spec, get_hardware("L4"), block_size=8, max_num_seqs=5, max_num_batched_tokens=budget,
                              max_model_len=256, num_kv_blocks=blocks, enable_chunked_prefill=chunked,
                              batching_policy=policy))
    result = sim.run(requests)

    def schedule(trace):
        return [([(c.request_id, c.start, c.num_tokens, c.sampled_token is None) for c in r.chunks], r.preempted,
                 [rid for rid, _ in r.finished]) for r in trace]

    real = schedule(llm.llm_engine.trace)
    assert schedule(result.trace) == real
    if blocks == 12:
        assert any(preempted for _, preempted, _ in real), "the small cache was meant to force preemptions"
    assert all(len(s.output_token_ids) == r.output_len for s, r in zip(result.requests, requests))


def test_virtual_clock_idles_until_the_next_arrival():
    sim = Simulator(SimConfig(get_model("Llama-3.1-8B"), get_hardware("H100-SXM")))
    reqs = [Request("a", 0.0, [1] * 100, 3), Request("b", 100.0, [2] * 100, 3)]
    result = sim.run(reqs)
    a, b = request_timelines(result.trace, result.arrival_times)
    assert a.finished < 1 and b.first_scheduled == 100.0
    assert b.ttft == pytest.approx(a.ttft)  # an idle engine serves both alike
    # each step's duration is the cost model's: prefill (100 tokens), then two decodes
    cost = CostModel(get_model("Llama-3.1-8B"), get_hardware("H100-SXM"))
    assert result.trace[0].duration == pytest.approx(cost.step_time(1, 100, 1, 100, 100 * 101 / 2))
    assert result.trace[1].duration == pytest.approx(cost.step_time(1, 1, 1, 101, 101))


@pytest.mark.parametrize("enabled", [True, False])
def test_a_run_leaves_the_garbage_collector_as_it_found_it(enabled):
    """The simulator pauses the cyclic collector during a run (and on a refused request)."""
    sim = Simulator(SimConfig(get_model("Llama-3.1-8B"), get_hardware("H100-SXM")))
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        sim.run([Request("a", 0.0, [1] * 20, 2)])
        assert gc.isenabled() is enabled
        with pytest.raises(ValueError, match="prompt_token_ids is empty"):
            sim.run([Request("b", 0.0, [], 2)])
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


def test_continuous_batching_beats_static_under_load():
    workload = preset("balanced", 300, request_rate=math.inf, seed=0).generate()
    tput = {}
    for policy in ("static", "continuous"):
        sim = Simulator(SimConfig(get_model("Llama-3.1-8B"), get_hardware("H100-SXM"), max_num_seqs=64,
                                  batching_policy=policy))
        r = sim.run(workload)
        tput[policy] = compute_metrics(r.trace, r.arrival_times).output_throughput
    assert tput["continuous"] > 1.3 * tput["static"]


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,field", [
    (lambda: Lengths("zipf", 10), "kind"),
    (lambda: Lengths("fixed", 0), "mean"),
    (lambda: Lengths("uniform", 10, 10), "spread"),
    (lambda: Workload(0, 1.0, Lengths("fixed", 1), Lengths("fixed", 1)), "num_requests"),
    (lambda: Workload(1, 0.0, Lengths("fixed", 1), Lengths("fixed", 1)), "request_rate"),
    (lambda: Workload(1, 1.0, Lengths("fixed", 1), Lengths("fixed", 1), burstiness=-1), "burstiness"),
    (lambda: preset("heavy", 10, 1.0), "preset"),
    (lambda: get_model("GPT-5"), "model"),
    (lambda: get_hardware("TPU"), "hardware"),
    (lambda: CostModel(get_model("Llama-3.1-8B"), get_hardware("A100-80GB"), "fp8"), "dtype"),
    (lambda: Hardware("x", 0, 1, {"bf16": 1}), "memory_bytes"),
    (lambda: SimConfig(get_model("Llama-3.1-8B"), get_hardware("H100-SXM"), max_num_seqs=0), "max_num_seqs"),
    (lambda: SimConfig(get_model("Llama-3.1-8B"), get_hardware("H100-SXM"), gpu_memory_utilization=1.5),
     "gpu_memory_utilization"),
    (lambda: SimConfig(get_model("Llama-3.1-8B"), get_hardware("H100-SXM"), batching_policy="fifo"),
     "batching_policy"),
    (lambda: Simulator(SimConfig(get_model("Llama-3.1-70B"), get_hardware("L4"))), "gpu_memory_utilization"),
    (lambda: Simulator(SimConfig(get_model("Llama-3.1-8B"), get_hardware("H100-SXM"), num_kv_blocks=2))
     .run([Request("r", 0.0, [1] * 40, 1)]), "needs 3 KV blocks"),
    (lambda: Simulator(SimConfig(get_model("Llama-3.1-8B"), get_hardware("H100-SXM")))
     .run([Request("r", 0.0, [1], 1), Request("r", 1.0, [1], 1)]), "request_id"),
    (lambda: Simulator(SimConfig(get_model("Llama-3.1-8B"), get_hardware("H100-SXM")))
     .run([Request("a", 1.0, [1], 1), Request("b", 0.0, [1], 1)]), "arrival_time"),
    (lambda: SLO(ttft=0), "ttft"),
    (lambda: compute_metrics([], {}), "trace"),
])
def test_bad_input_raises_value_error_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()
