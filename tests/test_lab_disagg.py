"""Chapter 10's DisaggLab, driven without a browser: every control changes the state and the view,
every refused setting shows a message and puts its control back."""
from __future__ import annotations

import pytest

from minivllm.lab import DisaggLab, DisaggSettings
from minivllm.lab.disagg import simulate

SMALL = DisaggSettings(num_requests=60)


@pytest.fixture(scope="module")
def lab():
    return DisaggLab(SMALL)


def test_lab_shows_both_deployments_the_handoff_the_verdict_and_the_figure(lab):
    assert lab.error_message == ""
    view = lab.view.value
    for text in ("60 requests", "4 x H100-SXM", "colocated as DP=4", "prefill pool of 2 instances", "KV handoff",
                 "of the end-to-end latency", "minivllm-verdict", "p90 TTFT", "p99 ITL", "Median TPOT"):
        assert text in view, text
    assert bytes(lab.image.value[:4]) == b"\x89PNG"
    assert all(w.style.description_width == "initial" for w in lab.knobs.values())


# (control, value) in an order where each is accepted; each changes the settings and the view
CHANGES = [("link", "ethernet"), ("layer_pipelined", True), ("first_token", "decode"),
           ("max_num_batched_tokens", 4096), ("preset", "chat"), ("request_rate", 40.0), ("prefill_instances", 1),
           ("decode_instances", 3), ("decode_tp", 2), ("prefill_tp", 2), ("hardware", "H200"), ("model", "Qwen3-8B"),
           ("ttft_slo_ms", 500.0), ("tpot_slo_ms", 20.0), ("slo_percentile", 99.0)]


def test_every_control_changes_the_state_and_the_view(lab):
    assert {name for name, _ in CHANGES} == set(lab.knobs)
    for name, value in CHANGES:
        before = lab.view.value
        lab.knobs[name].value = value
        assert lab.error_message == "", (name, lab.error_message)
        assert getattr(lab.state.settings, name) == value, name
        assert lab.view.value != before, name
    run = lab.state.run
    assert run.disagg_result.config.num_gpus == 8 and "8 x H200" in lab.view.value
    assert run.colocated_result.config.layout.num_gpus == 8  # DP=4 replicas of the decode pool's TP=2
    assert "layer-pipelined" in lab.view.value and "first token from the decode" in lab.view.value
    assert "Ethernet 100 Gb/s" in lab.view.value and "p99 TTFT" in lab.view.value


def test_the_slo_only_rereads_the_runs():
    lab = DisaggLab(SMALL)
    result = lab.state.run.disagg_result
    lab.tpot.value = 10.0
    lab.percentile.value = 50.0
    assert lab.state.run.disagg_result is result and lab.state.run.settings.tpot_slo_ms == 10.0


@pytest.mark.parametrize("setup, name, value, message", [
    ({}, "model", "Llama-3.1-70B", "prefill pool: Llama-3.1-70B"),  # 141 GB of weights on one 80 GB GPU
    ({}, "prefill_tp", 3, "prefill pool: ParallelLayout.tp=3 must divide"),
    ({}, "decode_tp", 3, "decode pool: ParallelLayout.tp=3 must divide"),
    ({"link": "nvlink"}, "prefill_instances", 7, "link='nvlink' joins the GPUs of one node"),
    ({"link": "nvlink", "prefill_instances": 4}, "decode_instances", 5, "link='nvlink' joins the GPUs of one node"),
    ({"prefill_instances": 3, "decode_instances": 3}, "link", "nvlink", None),  # 6 GPUs fit a node: accepted
])
def test_refused_settings_show_a_message_and_put_the_control_back(setup, name, value, message):
    lab = DisaggLab(SMALL)
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
    lab.ttft.value = 800.0  # another control still works and clears the message
    assert lab.error_message == "" and lab.state.settings.ttft_slo_ms == 800.0


def test_an_offline_batch_is_refused_from_code():
    lab = DisaggLab(SMALL)
    assert not lab.set(preset="batch")
    assert "offline batch has no latency targets" in lab.error_message
    assert lab.state.settings.preset == "rag" and lab.knobs["preset"].value == "rag"


def test_the_verdict_says_when_pd_helps_and_when_it_only_costs():
    helps = simulate(DisaggSettings(num_requests=150))  # 6k-token prompts: colocated decodes wait on chunks
    assert helps.verdict.helps is True and "P/D helps" in helps.verdict.sentence
    lopsided = simulate(DisaggSettings(num_requests=150, prefill_instances=3, decode_instances=1))
    assert lopsided.verdict.helps is False and "decode pool (1 GPU) is too small" in lopsided.verdict.sentence
    slow = simulate(DisaggSettings(num_requests=150, link="ethernet-25g"))  # 8.7 GB/s of KV per decode GPU
    assert slow.verdict.helps is False and "queue without end" in slow.verdict.sentence


def test_rate_sweep_and_split_figures():
    lab = DisaggLab(SMALL)
    fig = lab.rate_sweep_figure(rates=[8.0, 22.0], num_requests=40, workers=1)
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 2 and "rate" in ax.get_xlabel()
    fig = lab.split_figure(rates=[22.0], num_requests=40, workers=1)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1P:3D", "2P:2D", "3P:1D", "colocated"]
