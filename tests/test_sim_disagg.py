"""Prefill/decode disaggregation in the simulator: hand-worked cases with an instant link and one GPU
per pool, the KV transfer time by its formula for Llama-3.1-8B, decode admission held back by the
decode pool's free KV, the comparisons and every refused configuration."""
from __future__ import annotations

import math
from itertools import accumulate

import pytest

from minivllm.sim import (CostModel, Hardware, Request, SimConfig, compute_metrics, get_hardware, get_model,
                          request_timelines)
from minivllm.sim.disagg import DisaggConfig, DisaggSimulator, PoolConfig
from minivllm.sim.disagg_eval import (PercentileSLO, best_split, colocated_config, colocated_vs_disaggregated,
                                      pd_verdict, splits)
from minivllm.sim.kv_transfer import INSTANT, KVLink, kv_link
from minivllm.sim.planner import ParallelLayout
from minivllm.sim.presets import tuning_workload

LLAMA, H100 = get_model("Llama-3.1-8B"), get_hardware("H100-SXM")
COST = CostModel(LLAMA, H100)
KV_BYTES = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads of 128, bf16: 131,072 bytes a token


def config(link=INSTANT, prefill=None, decode=None, **kw) -> DisaggConfig:
    return DisaggConfig(LLAMA, H100, prefill or PoolConfig(max_model_len=8192),
                        decode or PoolConfig(max_model_len=8192), link=link, **kw)


def request(rid: str, prompt_len: int, output_len: int, arrival: float = 0.0, first_token: int = 1) -> Request:
    return Request(rid, arrival, list(range(first_token, first_token + prompt_len)), output_len)


def prefill_time(p: int) -> float:
    """One request's whole prompt in one step: p tokens, p x (p + 1) / 2 attention pairs."""
    return COST.step_time(1, p, 1, p, p * (p + 1) / 2)


def decode_time(context: int) -> float:
    """A one-request decode step whose new token ends at ``context`` (its pairs: the context)."""
    return COST.step_time(1, 1, 1, context, context)


# ---- hand-worked: instant link, one GPU per pool ---------------------------------------------------
def test_one_request_ttft_is_its_prefill_step_and_each_decode_step_a_one_request_decode():
    p, n = 1000, 5
    result = DisaggSimulator(config()).run([request("a", p, n)])
    (t,) = request_timelines(result.trace, result.arrival_times)
    want = list(accumulate([prefill_time(p)] + [decode_time(p + k) for k in range(1, n)]))
    assert t.ttft == pytest.approx(prefill_time(p), rel=1e-12)
    assert t.token_times == pytest.approx(want, rel=1e-12)
    assert t.num_prompt_tokens == p and t.num_output_tokens == n and t.num_preemptions == 0
    (x,) = result.transfers
    assert x.num_tokens == p and x.num_bytes == p * KV_BYTES
    assert x.prefill_end == x.admitted == x.start == x.end == x.ready == pytest.approx(prefill_time(p))
    # the prefill side ran one step, the decode side n - 1, each alone on its instance
    assert len(result.prefill_trace) == 1 and len(result.decode_trace) == n - 1
    assert [c.start for r in result.decode_trace for c in r.chunks] == list(range(p, p + n - 1))
    assert result.requests[0].num_output_tokens == n


def test_vllms_first_token_comes_from_the_decode_side_after_recomputing_the_last_prompt_token():
    p, n = 1000, 4
    result = DisaggSimulator(config(first_token="decode")).run([request("a", p, n)])
    (t,) = request_timelines(result.trace, result.arrival_times)
    want = list(accumulate([prefill_time(p)] + [decode_time(p + k) for k in range(0, n)]))
    assert t.token_times == pytest.approx(want[1:], rel=1e-12)  # the prefill's token is dropped
    assert t.ttft == pytest.approx(prefill_time(p) + decode_time(p), rel=1e-12)
    assert result.transfers[0].num_tokens == p - 1 and len(result.decode_trace) == n
    assert result.decode_trace[0].chunks[0].start == p - 1


def test_a_one_token_request_ends_on_the_prefill_side():
    result = DisaggSimulator(config()).run([request("a", 300, 1)])
    assert not result.transfers and not result.decode_trace
    (t,) = request_timelines(result.trace, result.arrival_times)
    assert t.finished == pytest.approx(prefill_time(300)) and t.num_output_tokens == 1


# ---- the KV transfer by its formula -------------------------------------------------------------------
@pytest.mark.parametrize("link, bandwidth, latency", [("nvlink", 450e9, 10e-6), ("infiniband", 50e9, 25e-6),
                                                      ("ethernet", 12.5e9, 50e-6), ("ethernet-25g", 3.125e9, 50e-6)])
def test_transfer_is_bytes_over_bandwidth_plus_latency_for_llama_8b(link, bandwidth, latency):
    sim = DisaggSimulator(config(link))
    assert sim.kv_bytes_per_token == KV_BYTES and sim.link.bandwidth == bandwidth
    want = 1000 * KV_BYTES / bandwidth + latency
    assert sim.transfer_seconds(1000) == pytest.approx(want, rel=1e-12)
    result = sim.run([request("a", 1000, 3)])
    (x,) = result.transfers
    assert x.transfer_time == pytest.approx(want, rel=1e-12) and x.admission_wait == 0
    (t,) = request_timelines(result.trace, result.arrival_times)
    assert t.token_times[1] == pytest.approx(prefill_time(1000) + want + decode_time(1001), rel=1e-12)


def test_each_gpu_sends_its_share_and_the_busiest_gpu_sets_the_time():
    one = DisaggSimulator(config("infiniband")).transfer_seconds(1000)
    tp2 = DisaggSimulator(config("infiniband", PoolConfig(tp=2, max_model_len=8192),
                                 PoolConfig(tp=2, max_model_len=8192))).transfer_seconds(1000)
    mixed = DisaggSimulator(config("infiniband", PoolConfig(tp=2, max_model_len=8192))).transfer_seconds(1000)
    assert tp2 - 25e-6 == pytest.approx((one - 25e-6) / 2) and mixed == pytest.approx(one)  # 1 decode GPU takes it all


def test_layer_pipelined_transfer_leaves_only_the_last_layers_share_unless_the_link_is_slower():
    p = 1000
    (x,) = DisaggSimulator(config("ethernet", layer_pipelined=True)).run([request("a", p, 2)]).transfers
    wire = p * KV_BYTES / 12.5e9  # 10.5 ms, less than the 17 ms prefill
    assert wire < prefill_time(p)
    assert x.ready == pytest.approx(prefill_time(p) + wire / 32 + 50e-6, rel=1e-12)
    slow = KVLink("slow", 1e9, 0.0)  # 131 ms of wire: the link, not the prefill, binds
    (x,) = DisaggSimulator(config(slow, layer_pipelined=True)).run([request("a", p, 2)]).transfers
    assert x.start == 0.0 and x.ready == pytest.approx(p * KV_BYTES / 1e9, rel=1e-12)


def test_a_busy_link_sends_one_transfer_after_another():
    result = DisaggSimulator(config("ethernet")).run([request("a", 500, 2), request("b", 500, 2, first_token=9000)])
    a, b = result.transfers
    assert a.prefill_end == b.prefill_end  # one prefill step ran both prompts
    assert b.start == a.end and b.ready - a.ready == pytest.approx(500 * KV_BYTES / 12.5e9)


def test_the_decode_prefix_cache_shrinks_the_transfer():
    shared = list(range(1, 65))  # four blocks of 16
    reqs = [Request("a", 0.0, shared + list(range(100, 140)), 3), Request("b", 1.0, shared + list(range(200, 240)), 3)]
    decode = PoolConfig(block_size=16, max_model_len=8192)
    a, b = DisaggSimulator(config(decode=decode)).run(reqs).transfers
    assert a.num_tokens == 104 and b.num_tokens == 104 - 64


# ---- decode admission limited by the decode pool's free KV ------------------------------------------------
@pytest.mark.parametrize("decode", [PoolConfig(num_kv_blocks=12, block_size=16, max_model_len=8192),
                                    PoolConfig(max_num_seqs=1, max_model_len=8192)])
def test_decode_admission_waits_for_free_kv_blocks_or_a_seat(decode):
    """Each request needs 7 blocks for its 100-token prompt and grows to 10: with 12 blocks (or one
    seat) the second waits until the first has finished and freed them."""
    reqs = [request("a", 100, 50), request("b", 100, 50, first_token=5000)]
    result = DisaggSimulator(config(decode=decode)).run(reqs)
    a, b = result.transfers
    first = next(s for s in result.requests if s.request_id == "a")
    assert a.admission_wait == 0 and b.admission_wait > 0
    assert b.admitted == first.finished_time
    timelines = {t.request_id: t for t in request_timelines(result.trace, result.arrival_times)}
    assert timelines["b"].token_times[1] > timelines["a"].finished
    assert compute_metrics(result.trace, result.arrival_times).num_preemptions == 0


# ---- several instances, a real workload ------------------------------------------------------------------
def test_pools_of_several_instances_serve_a_workload_through_the_routers():
    reqs = tuning_workload("chat", 120, request_rate=40).generate()
    cfg = config("infiniband", PoolConfig(2, max_model_len=8192), PoolConfig(2, max_model_len=8192))
    result = DisaggSimulator(cfg).run(reqs)
    assert set(result.prefill_step_instances) == {0, 1} and set(result.decode_step_instances) == {0, 1}
    assert {x.decode_instance for x in result.transfers} == {0, 1}
    m = compute_metrics(result.trace, result.arrival_times)
    assert m.num_requests == 120 and m.total_output_tokens == sum(r.output_len for r in reqs)
    assert m.total_input_tokens == sum(len(r.prompt_token_ids) for r in reqs)
    assert all(x.ready >= x.end >= x.start and x.admitted >= x.prefill_end for x in result.transfers)


def test_colocated_against_disaggregated_and_the_verdicts():
    slo = PercentileSLO(ttft=1.0, tpot=0.012, percentile=90)
    factory = lambda rate: tuning_workload("rag", 80, rate)  # noqa: E731
    wide = config("infiniband", PoolConfig(max_model_len=16384), PoolConfig(max_model_len=16384))
    assert colocated_config(wide).layout == ParallelLayout(dp=2)
    (c,) = colocated_vs_disaggregated(wide, factory, [8.0], slo, workers=1)
    helps = pd_verdict(c.colocated, c.disaggregated)  # chunks of 6k-token prompts slow every colocated decode
    assert helps.helps is True and "TPOT misses" in helps.sentence
    slow = config(KVLink("slow", 0.5e9, 1e-3), PoolConfig(max_model_len=16384), PoolConfig(max_model_len=16384))
    (c,) = colocated_vs_disaggregated(slow, factory, [8.0], slo, workers=1)
    costs = pd_verdict(c.colocated, c.disaggregated)
    assert costs.helps is False and "the link costs" in costs.sentence and c.disaggregated.transfer_share > 0.5
    assert "queue without end" in costs.sentence


def test_best_split_ranks_every_split_and_the_colocated_deployment():
    result = best_split(LLAMA, H100, 3, lambda rate: tuning_workload("rag", 40, rate), [6.0],
                        PercentileSLO(ttft=1.0, tpot=0.012, percentile=90), workers=1, max_model_len=16384)
    assert {s.label for s in result.scores} == {"1P:2D", "2P:1D", "colocated"}
    assert result.scores == tuple(sorted(result.scores, key=lambda s: s.goodput_per_gpu, reverse=True))
    assert all(s.num_gpus == 3 and s.runs for s in result.scores) and "best goodput" in result.report()
    assert splits(8, 2, 1) == [(1, 6), (2, 4), (3, 2)]  # prefill instances of 2 GPUs, decode of 1


# ---- every refused configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("build, message", [
    (lambda: DisaggConfig("Llama-3.1-8B", H100), "must be a ModelSpec"),
    (lambda: DisaggConfig(LLAMA, "H100-SXM"), "must be a Hardware"),
    (lambda: DisaggConfig(LLAMA, H100, prefill={"instances": 1}), "prefill={'instances': 1} must be a PoolConfig"),
    (lambda: config(layer_pipelined=1), "layer_pipelined=1 must be a bool"),
    (lambda: config(first_token="proxy"), "first_token='proxy' must be one of"),
    (lambda: config("roce"), "link='roce' must be one of"),
    (lambda: config("nvlink", PoolConfig(4), PoolConfig(5)), "link='nvlink' joins the GPUs of one node"),
    (lambda: KVLink("x", 0.0), "KVLink.bandwidth=0.0 must be > 0"),
    (lambda: KVLink("x", 1e9, -1.0), "KVLink.latency=-1.0"),
    (lambda: kv_link("nvlink", Hardware("lone", 1e9, 1e9, {"bf16": 1e12})), "no interconnect"),
    (lambda: PoolConfig(0), "PoolConfig.instances=0 must be an int >= 1"),
    (lambda: PoolConfig(tp=0), "ParallelLayout.tp=0"),
    (lambda: PoolConfig(dtype="fp8"), "PoolConfig(dtype=...)"),
    (lambda: PoolConfig(speculative=None), "speculative decoding is not modelled"),
    (lambda: config(decode=PoolConfig(max_num_seqs=0)), "decode pool: max_num_seqs=0"),
    (lambda: config(prefill=PoolConfig(max_model_len=10 ** 7)), "prefill pool: max_model_len=10000000 exceeds"),
    (lambda: DisaggSimulator(DisaggConfig(get_model("Llama-3.1-70B"), H100)), "prefill pool: "),
    (lambda: DisaggSimulator(config(prefill=PoolConfig(tp=3))), "prefill pool: "),
    (lambda: DisaggSimulator(None), "config=None must be a DisaggConfig"),
    (lambda: DisaggSimulator(config(prefill=PoolConfig(max_model_len=512))).run([request("a", 600, 2)]),
     "prefill pool: request a: prompt of 600 tokens is longer than max_model_len=512"),
    (lambda: DisaggSimulator(config(decode=PoolConfig(num_kv_blocks=4, block_size=16))).run([request("a", 60, 10)]),
     "decode pool: request a: prompt of 60 tokens plus max_tokens=10 needs 5 KV blocks"),
    (lambda: DisaggSimulator(config()).run([request("a", 5, 2, 1.0), request("b", 5, 2, 0.0)]), "sorted by arrival"),
    (lambda: DisaggSimulator(config()).run([request("a", 5, 2), request("a", 5, 2)]), "must be unique"),
    (lambda: colocated_config(config(), tp=3), "tp=3 must be an int >= 1 dividing the 2 GPUs"),
    (lambda: colocated_vs_disaggregated(config(), lambda r: tuning_workload("chat", 5, r), [1.0], PercentileSLO(),
                                        colocated=SimConfig(LLAMA, H100, max_model_len=8192)), "the same GPU count"),
    (lambda: colocated_vs_disaggregated(config(), lambda r: tuning_workload("chat", 5, r), [math.inf],
                                        PercentileSLO()), "must be finite request rates"),
    (lambda: colocated_vs_disaggregated(config(), lambda r: tuning_workload("chat", 5, 2 * r), [1.0],
                                        PercentileSLO()), "must return a Workload at request_rate=1.0"),
    (lambda: splits(1), "num_gpus=1 must be an int >= 2"),
    (lambda: splits(3, 2, 2), "cannot be split"),
    (lambda: best_split(LLAMA, H100, 2, lambda r: tuning_workload("chat", 5, r), [1.0], None), "slo=None"),
])
def test_refused_configurations(build, message):
    with pytest.raises(ValueError) as e:
        build()
    assert message in str(e.value), str(e.value)


def test_a_decode_instance_whose_free_kv_is_held_by_transfers_preempts_and_waits_for_them():
    """10 blocks of 16: a (15 + 80 tokens, 6 blocks at its end) decodes while b's 79-token KV (5
    blocks) crawls over a 10 MB/s link; a runs out of blocks, is preempted (an empty step), the
    instance waits for b's KV, runs b, then recomputes a."""
    slow = KVLink("slow", 10e6, 0.0)
    decode = PoolConfig(num_kv_blocks=10, block_size=16, max_model_len=8192)
    reqs = [request("a", 15, 80), request("b", 79, 2, arrival=0.3, first_token=5000)]
    result = DisaggSimulator(config(slow, decode=decode)).run(reqs)
    timelines = {t.request_id: t for t in request_timelines(result.trace, result.arrival_times)}
    assert timelines["a"].num_preemptions == 1 and timelines["b"].num_preemptions == 0
    empty = [r for r in result.decode_trace if not r.chunks]
    assert len(empty) == 1 and empty[0].preempted == ("a",) and empty[0].duration == 0
    b = result.transfers[1]
    assert empty[0].end_time < b.ready <= timelines["b"].token_times[1] < timelines["a"].finished
    assert timelines["a"].num_output_tokens == 80
