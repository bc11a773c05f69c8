"""Tuning in the simulator: goodput, percentiles and costs against hand-computed runs; the frontier; the
auto-tuner against an exhaustive evaluation of the same candidates; refused input."""
from __future__ import annotations

import math

import pytest

from minivllm.sim import Hardware, Lengths, ParallelLayout, SimConfig, Simulator, Workload, get_hardware, get_model
from minivllm.sim.evaluation import PercentileSLO, summarize_run, verdict
from minivllm.sim.presets import TUNING_PRESETS, tuning_workload
from minivllm.sim.tuner import (Candidate, Refused, auto_tune, evaluate, frontier, layouts_for, same_run_key,
                                sim_config)
from minivllm.sim.workload import Request

MS = 1e-3
# every step costs 1 ms plus 1 ms per scheduled request; the roofline is negligible and memory-bound
CLOCKWORK = Hardware("clockwork", 100e9, 1e30, {"bf16": 1e40}, step_overhead=MS, seq_overhead=MS)


def clockwork_run(slo: PercentileSLO):
    """Three requests at time 0, 10-token prompts, 2, 3 and 4 output tokens, two at a time:

    step  chunks               ends at   tokens
    1     a, b prefill         3 ms      a1 b1
    2     a, b decode          6 ms      a2 (a done) b2
    3     b decode, c prefill  9 ms      b3 (b done) c1
    4-6   c decode             11, 13, 15 ms   c2 c3 c4 (c done)

    TTFT a=3, b=3, c=9 ms; TPOT a=(6-3)/1=3, b=(9-3)/2=3, c=(15-9)/3=2 ms; duration 15 ms."""
    requests = [Request(rid, 0.0, [100 * i + t for t in range(10)], n)
                for i, (rid, n) in enumerate([("a", 2), ("b", 3), ("c", 4)])]
    config = SimConfig(get_model("Qwen3-0.6B"), CLOCKWORK, max_num_seqs=2, max_model_len=64)
    return summarize_run(Simulator(config).run(requests), slo, math.inf)


def test_goodput_and_percentiles_by_hand():
    s = clockwork_run(PercentileSLO(ttft=5 * MS, tpot=3.1 * MS))
    m = s.metrics
    assert m.duration == pytest.approx(15 * MS)
    assert m.ttft.median == pytest.approx(3 * MS)
    # numpy's linear interpolation over [3, 3, 9]: 3 + 0.98 * 6
    assert m.ttft.p99 == pytest.approx(8.88 * MS)
    assert dict(m.tpot.percentiles)[50.0] == pytest.approx(3 * MS) and m.tpot.p99 == pytest.approx(3 * MS)
    assert m.itl.mean == pytest.approx((3 + 3 + 3 + 2 + 2 + 2) / 6 * MS)
    assert m.goodput == pytest.approx(2 / (15 * MS))  # a and b meet both targets, c's TTFT is 9 ms
    assert s.goodput_per_gpu == s.goodput
    assert s.mean_queue_wait == pytest.approx(2 * MS)  # c waits from 0 to step 3's start at 6 ms
    assert s.peak_running == 2 and s.memory_bound_share == 1.0
    # 9 tokens in 15 ms = 600 tok/s; one GPU at $3.6 an hour is $0.001 a second
    assert s.cost_per_million_tokens(3.6) == pytest.approx(0.001 / 600 * 1e6)
    assert clockwork_run(PercentileSLO(ttft=10 * MS, tpot=3.1 * MS)).metrics.goodput == pytest.approx(3 / (15 * MS))
    assert clockwork_run(PercentileSLO(ttft=5 * MS, tpot=2.5 * MS)).metrics.goodput == 0


def test_the_slo_at_a_percentile():
    assert clockwork_run(PercentileSLO(ttft=9 * MS, tpot=3.1 * MS, percentile=99)).slo_met  # p99 TTFT 8.88 ms
    missed = clockwork_run(PercentileSLO(ttft=8 * MS, tpot=3.1 * MS, percentile=99))
    assert not missed.slo_met and set(missed.slo.misses(missed.metrics)) == {"ttft"}
    assert clockwork_run(PercentileSLO(ttft=3.1 * MS, tpot=3.1 * MS, percentile=50)).slo_met  # both medians 3 ms
    tight = clockwork_run(PercentileSLO(tpot=2.5 * MS, percentile=50))
    assert tight.slo.misses(tight.metrics) == {"tpot": (pytest.approx(3 * MS), 2.5 * MS)}
    assert verdict(tight, max_num_seqs=2, max_num_batched_tokens=2048).constraint == "SLO"
    assert str(PercentileSLO(ttft=0.5, tpot=0.05)) == "p99 TTFT <= 500 ms and TPOT <= 50 ms"


def test_presets_are_seeded_and_fit_their_shapes():
    assert set(TUNING_PRESETS) == {"chat", "rag", "code", "batch", "bursty"}
    chat = tuning_workload("chat", 200).generate()
    assert chat == tuning_workload("chat", 200).generate()
    assert 150 < sorted(len(r.prompt_token_ids) for r in chat)[100] < 350  # median about 250
    rag = tuning_workload("rag", 50).generate()
    assert all(4000 <= len(r.prompt_token_ids) <= 8000 for r in rag)
    code = tuning_workload("code", 50).generate()
    assert len({tuple(r.prompt_token_ids[:1024]) for r in code}) <= 8  # 8 shared repository prefixes
    assert all(r.arrival_time == 0 for r in tuning_workload("batch", 20).generate())
    assert tuning_workload("bursty", 10).burstiness == 0.2
    assert all(p.max_total_len <= 16384 for p in TUNING_PRESETS.values())  # the lab's max_model_len


SMALL = Workload(40, 40.0, Lengths("lognormal", 300, 0.5, 1024), Lengths("lognormal", 60, 0.5, 256), seed=1)
QWEN = get_model("Qwen3-0.6B")
H100 = get_hardware("H100-SXM")


def test_frontier_traces_throughput_and_latency_per_rate():
    llama = get_model("Llama-3.1-8B")
    configs = {"1 GPU": SimConfig(llama, H100, max_model_len=2048),
               "TP=2": SimConfig(llama, H100, layout=ParallelLayout(tp=2), max_model_len=2048),
               "too big": SimConfig(get_model("Llama-3.1-70B"), H100, max_model_len=2048)}
    curves = frontier(configs, lambda r: Workload(30, r, SMALL.prompt_len, SMALL.output_len, seed=1), [40.0, 5.0],
                      PercentileSLO(tpot=0.05), workers=2)
    one, tp2, big = curves
    assert [p.request_rate for p in one.points] == [5.0, 40.0]
    assert one.points[1].output_throughput > one.points[0].output_throughput
    assert tp2.points[1].tpot_p99 < one.points[1].tpot_p99  # two GPUs read an 8B model's weights: shorter steps
    assert big.points == () and [r for r, _ in big.refused] == [5.0, 40.0] and "not fit" in big.refused[0][1]
    with pytest.raises(ValueError, match="configs"):
        frontier({}, lambda r: SMALL, [1.0])
    with pytest.raises(ValueError, match="rates"):
        frontier(configs, lambda r: SMALL, [0.0])
    with pytest.raises(ValueError, match="workload_factory"):
        frontier(configs, lambda r: SMALL, [1.0])  # a workload at another rate


def test_auto_tune_finds_the_exhaustive_best_and_reports_refusals():
    slo = PercentileSLO(ttft=0.2, tpot=0.02)
    seqs, budgets = (2, 32), (512, 2048)
    result = auto_tune(QWEN, H100, 3, SMALL, slo, max_num_seqs=seqs, max_num_batched_tokens=budgets, top=2,
                       workers=2, max_model_len=2048)
    # TP=3 does not divide Qwen3-0.6B's 16 heads: refused, not a crash
    assert {c.layout.tp for c, _ in result.refused} == {3} and all("tp=3" in r for _, r in result.refused)
    every = {}
    for layout in layouts_for(3):
        for n in seqs:
            for b in budgets:
                c = Candidate(layout, n, b)
                s = evaluate(sim_config(QWEN, H100, "bf16", c, {"max_model_len": 2048}), SMALL, slo)
                if not isinstance(s, Refused):
                    every[c] = s
    assert len(every) == len(result.evaluated)
    for c, s in result.evaluated:  # the workers' runs are this process's runs
        assert same_run_key(s) == same_run_key(every[c])
    best = max(every.values(), key=lambda s: (s.slo_met, s.goodput_per_gpu, -slo.value(s.metrics, "tpot")))
    top = result.top[0]
    assert same_run_key(top.summary) == same_run_key(best) and top.score == best.goodput_per_gpu
    assert top.why.startswith("goodput") and "Beats #2" in top.why
    assert len(result.top) == 2 and "#1" in result.report() and "refused" in result.report()
    cheapest = auto_tune(QWEN, H100, 1, SMALL, slo, "cost", max_num_seqs=seqs, max_num_batched_tokens=(2048,),
                         workers=1, max_model_len=2048, gpu_price_per_hour=4.0)
    costs = [s.cost_per_million_tokens(4.0) for _, s in cheapest.evaluated if s.slo_met]
    assert cheapest.top[0].score == min(costs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(objective="speed"), "objective"), (dict(num_gpus=0), "num_gpus"), (dict(top=0), "top"),
    (dict(workers=0), "workers"), (dict(max_num_seqs=()), "max_num_seqs"), (dict(slo=0.5), "slo"),
    (dict(workload="chat"), "workload"), (dict(model="Qwen3-0.6B"), "model"), (dict(gpu_price_per_hour=0), "gpu_price"),
])
def test_auto_tune_refuses_bad_input(kwargs, field):
    args = dict(model=QWEN, hardware=H100, num_gpus=1, workload=SMALL, slo=PercentileSLO(tpot=0.05)) | kwargs
    with pytest.raises(ValueError, match=field):
        auto_tune(**args)


def test_bad_slo_and_preset_are_refused():
    with pytest.raises(ValueError, match="percentile"):
        PercentileSLO(tpot=0.05, percentile=0)
    with pytest.raises(ValueError, match="SLO.ttft"):
        PercentileSLO(ttft=-1)
    with pytest.raises(ValueError, match="preset='nope'"):
        tuning_workload("nope")
    with pytest.raises(ValueError, match="gpu_price_per_hour"):
        clockwork_run(PercentileSLO()).cost_per_million_tokens(-1)
