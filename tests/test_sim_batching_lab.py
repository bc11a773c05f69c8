"""Chapter 04's Batching Lab, driven without a browser."""
from __future__ import annotations

import pytest

from minivllm.lab.batching import BatchingLab, BatchingSettings, reshape, simulate
from minivllm.sim import Lengths

SMALL = BatchingSettings(num_requests=30, request_rate=4.0, max_num_seqs=8)


@pytest.fixture(scope="module")
def lab():
    return BatchingLab(SMALL)


def test_lab_shows_the_settings_metrics_and_figure(lab):
    assert lab.error_message == ""
    assert "30 requests" in lab.view.value and "Successful requests" in lab.view.value
    assert bytes(lab.image.value[:4]) == b"\x89PNG"


def test_controls_rerun_the_simulation(lab):
    lab.policy.value = "static"
    assert lab.state.settings.policy == "static" and "<b>static</b>" in lab.view.value
    static = lab.state.run
    lab.policy.value = "continuous"
    cont = lab.state.run
    # the same requests, so the same tokens; the static batch never holds more than one wave
    assert static.metrics.total_output_tokens == cont.metrics.total_output_tokens
    assert max(r.num_running for r in static.result.trace) <= SMALL.max_num_seqs
    lab.preset.value = "decode-heavy"
    assert lab.state.run.metrics.total_output_tokens != cont.metrics.total_output_tokens
    lab.max_num_seqs.value = 2
    assert max(r.num_running for r in lab.state.run.result.trace) == 2


def test_impossible_settings_show_an_error_and_keep_the_last_state(lab):
    before = lab.state.run
    lab.model.value = "Llama-3.1-70B"  # 141 GB of weights on an 80 GB GPU
    assert "does not fit" in lab.error_message and lab.state.run is before
    assert lab.model.value == "Llama-3.1-8B" and "model is back at 'Llama-3.1-8B'" in lab.error_message
    lab.max_num_seqs.value = 8  # another control still works, and clears the message
    assert lab.error_message == "" and lab.state.run.settings.max_num_seqs == 8


def test_reshape_keeps_the_mean():
    ln = Lengths("lognormal", 200, 0.5, 1000)
    assert reshape(ln, "uniform") == Lengths("uniform", 200, 100.0, 1000)
    assert reshape(ln, "fixed").spread == 0


def test_the_lab_run_is_the_simulator_run():
    run = simulate(SMALL)
    assert run.metrics.num_requests == 30
    assert [t.request_id for t in run.timelines] == [f"r{i}" for i in range(30)]
