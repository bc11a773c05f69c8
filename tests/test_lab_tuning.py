"""Chapter 09's Tuning Lab, driven without a browser: every control changes the state and the view,
every refused setting shows a message and puts its control back."""
from __future__ import annotations

import math

import pytest

from minivllm.lab.tuning import TuningLab, TuningSettings, simulate

SMALL = TuningSettings(num_requests=60)


@pytest.fixture(scope="module")
def lab():
    return TuningLab(SMALL)


def test_lab_shows_metrics_cost_verdict_and_figure(lab):
    assert lab.error_message == ""
    view = lab.view.value
    for text in ("60 requests", "Goodput", "Memory-bound steps", "Cost per million output tokens", "Preemptions",
                 "Median TPOT", "P99 ITL", "minivllm-verdict"):
        assert text in view
    assert bytes(lab.image.value[:4]) == b"\x89PNG"
    assert [lab.tabs.get_title(i) for i in range(4)] == ["Deployment", "Engine", "Speculative decoding",
                                                         "Workload, SLO, price"]
    assert all(w.style.description_width == "initial" for w in lab.knobs.values())  # labels are not cut off


# (control, value) in an order where each is accepted; each changes the settings and the view
CHANGES = [("max_num_batched_tokens", 8192), ("max_model_len", 8192), ("enable_chunked_prefill", False),
           ("enable_prefix_caching", False), ("cuda_graphs", False), ("max_num_seqs", 32),
           ("gpu_memory_utilization", 0.8), ("kv_cache_dtype", "fp8"), ("dtype", "fp8"), ("hardware", "H200"),
           ("model", "Qwen3-8B"), ("tp", 2), ("pp", 2), ("dp", 2), ("spec_method", "ngram"),
           ("num_speculative_tokens", 4), ("acceptance_rate", 0.5), ("preset", "code"), ("request_rate", 16.0),
           ("ttft_slo_ms", 1000.0), ("tpot_slo_ms", 20.0), ("slo_percentile", 90.0), ("gpu_price_per_hour", 4.0)]


def test_every_control_changes_the_state_and_the_view(lab):
    assert {name for name, _ in CHANGES} == set(lab.knobs)
    for name, value in CHANGES:
        before = lab.view.value
        lab.knobs[name].value = value
        assert lab.error_message == "", name
        assert getattr(lab.state.settings, name) == value, name
        assert lab.view.value != before, name
    s = lab.state.settings
    assert lab.state.run.summary.num_gpus == 8 and "8 x H200" in lab.view.value
    assert "speculative ngram k=4" in lab.view.value and "$4 per GPU-hour" in lab.view.value
    assert lab.state.run.result.config.speculative.acceptance_rate == 0.5
    assert s.slo.tpot == 0.02 and "p90" in lab.view.value


def test_judging_knobs_reuse_the_simulation():
    lab = TuningLab(SMALL)
    result = lab.state.run.result
    lab.price.value = 1.0
    lab.tpot.value = 10.0
    assert lab.state.run.result is result and lab.state.run.settings.tpot_slo_ms == 10.0


def test_a_preset_brings_its_rate_and_the_offline_batch_has_none():
    lab = TuningLab(SMALL)
    lab.preset.value = "rag"
    assert lab.state.settings.rate == 6.0 and lab.rate.value == 6.0
    lab.preset.value = "batch"
    assert math.isinf(lab.state.settings.rate) and lab.rate.disabled and "all at time 0" in lab.view.value
    lab.rate.value = 8.0
    assert "no request rate" in lab.error_message and lab.rate.value == 256.0
    lab.preset.value = "chat"
    assert lab.error_message == "" and lab.state.settings.rate == 35.0 and not lab.rate.disabled


@pytest.mark.parametrize("setup, name, value, message", [
    ({}, "model", "Llama-3.1-70B", "not fit"),  # 141 GB of weights on one 80 GB GPU
    ({}, "tp", 3, "tp=3 must divide"),  # Llama-3.1-8B has 32 heads
    ({"hardware": "L4"}, "max_model_len", 65536, "larger than the KV cache"),
    ({"hardware": "L4"}, "gpu_memory_utilization", 0.6, "not fit"),
    ({}, "enable_chunked_prefill", False, "max_num_batched_tokens=2048 is smaller"),
    ({}, "max_model_len", 1024, "max_model_len=1024"),  # some chat requests are longer
    ({}, "kv_cache_dtype", "fp16", None),  # accepted: the control works after the refusals above
])
def test_refused_settings_show_a_message_and_put_the_control_back(setup, name, value, message):
    lab = TuningLab(SMALL)
    if setup:
        lab.set(**setup)
    before, old = lab.state.run, lab.knobs[name].value
    lab.knobs[name].value = value
    if message is None:
        assert lab.error_message == "" and getattr(lab.state.settings, name) == value
        return
    assert message in lab.error_message, lab.error_message
    assert lab.state.run is before and lab.knobs[name].value == old
    assert f"is back at {old!r}" in lab.error_message
    lab.price.value = 3.0  # another control still works and clears the message
    assert lab.error_message == "" and lab.state.settings.gpu_price_per_hour == 3.0


def test_the_verdict_names_the_binding_constraint():
    assert simulate(SMALL).verdict.constraint == "memory bandwidth"
    cramped = simulate(TuningSettings(num_requests=60, hardware="L4", max_model_len=8192, gpu_memory_utilization=0.8,
                                      request_rate=30.0))
    assert cramped.summary.metrics.num_preemptions > 0 and cramped.verdict.constraint == "KV capacity"
    capped = simulate(TuningSettings(num_requests=200, max_num_seqs=4, request_rate=30.0))
    assert capped.verdict.constraint == "queueing" and "max_num_seqs=4" in capped.verdict.sentence
    strict = simulate(TuningSettings(num_requests=60, tpot_slo_ms=1.0))
    assert strict.verdict.constraint == "SLO" and "TPOT" in strict.verdict.sentence


def test_frontier_figure_compares_configurations(lab):
    lab = TuningLab(SMALL)
    fig = lab.frontier_figure({"TP=2": {"tp": 2}}, rates=[10.0, 40.0], num_requests=30, workers=1)
    tpot_ax, ttft_ax = fig.axes
    assert len(tpot_ax.get_lines()) == 3  # two configurations and the SLO target
    assert "TPOT" in tpot_ax.get_xlabel() and "TTFT" in ttft_ax.get_xlabel()
