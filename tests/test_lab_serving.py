"""Chapter 11's Serving Lab, driven without a browser against a real in-process server: refused
settings go back to the value in effect and say why; a short run completes with the counts the
settings imply (checked against the server's own /metrics and engine); stop sends nothing more,
cancels what is in flight, and the server frees every block."""
from __future__ import annotations

import time

import pytest

from minivllm import course
from minivllm.lab.base import LabError
from minivllm.entrypoints.openai.local import InProcessServer
from minivllm.lab.serving import ServingBench, ServingLab, ServingSettings, parse_metrics

MAX_MODEL_LEN = 256
GUARD_S = 120  # not a performance bound: a run that never ends must not hang the suite


@pytest.fixture(scope="module")
def server():
    with InProcessServer.launch(course.model_path("target"), "course", max_model_len=MAX_MODEL_LEN) as srv:
        yield srv


@pytest.fixture
def lab(server):
    lab = ServingLab(server.url, settings=ServingSettings(num_prompts=6, request_rate=50.0, output_len=8,
                                                          input_len=16), poll_interval=0.05)
    yield lab
    lab.close()


def drained(server) -> bool:
    """The engine holds no request and every KV block is back in the pool (aborts arrive between steps)."""
    engine = server.llm.engine
    deadline = time.monotonic() + GUARD_S
    while (engine.requests or engine.block_manager.num_used_blocks) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not engine.requests and engine.block_manager.num_used_blocks == 0


def test_the_lab_reads_the_server_and_shows_the_settings_in_effect(lab):
    assert lab.state.model == "course" and lab.state.max_model_len == MAX_MODEL_LEN
    assert lab.state.status == "idle" and lab.error_message == ""
    assert "<b>6 requests</b>" in lab.view.value and "<b>50 req/s</b>" in lab.view.value
    assert "max concurrency <b>none</b>" in lab.view.value
    assert not lab.start_button.disabled and lab.stop_button.disabled


@pytest.mark.parametrize("control,value,message", [
    ("request_rate", 0.0, "must be above 0"),
    ("request_rate", -3.0, "must be above 0"),
    ("request_rate", 5000.0, "at most 1000"),
    ("num_prompts", 0, "num_prompts=0 must be between 1 and 200"),
    ("num_prompts", 10_000, "num_prompts=10000 must be between 1 and 200"),
    ("max_concurrency", -1, "0: no limit"),
    ("output_len", 0, "output_len=0"),
    ("output_len", 1000, "do not fit the server's max_model_len=256"),
])
def test_a_refused_setting_goes_back_and_says_why(lab, control, value, message):
    widget = getattr(lab, control)
    before, settings = widget.value, lab.state.settings
    view = lab.view.value
    widget.value = value
    assert message in lab.error_message
    assert f"is back at {before!r}, the value in effect" in lab.error_message
    assert widget.value == before and lab.state.settings == settings and lab.view.value == view
    lab.num_prompts.value = 5  # another control still works, and clears the message
    assert lab.error_message == "" and lab.state.settings.num_prompts == 5 and "<b>5 requests</b>" in lab.view.value


def test_stop_when_idle_is_refused(lab):
    lab.stop()
    assert lab.error_message == "no bench is running" and lab.state.status == "idle"


def test_a_short_run_completes_with_the_right_counts(lab, server):
    lab.max_concurrency.value = 2
    metrics = lab.run(timeout=GUARD_S)
    st = lab.state
    assert st.status == "done" and lab.error_message == ""
    assert (st.num_sent, st.num_finished, st.num_failed, st.num_cancelled, st.num_not_sent) == (6, 6, 0, 0, 0)
    # ignore_eos and fixed lengths: exactly the tokens asked for, in the bench's records and in the server's counters
    assert metrics.num_requests == 6 and metrics.num_failed == 0
    assert (metrics.total_input_tokens, metrics.total_output_tokens) == (6 * 16, 6 * 8)
    assert st.since_start("vllm:generation_tokens_total") == 6 * 8
    assert st.since_start("vllm:request_success_total") == 6
    assert st.since_start("vllm:time_to_first_token_seconds_count") == 6
    assert max(len(r.chunks) for r in server.llm.engine.trace[-30:]) <= 2, "max concurrency 2: at most 2 in a step"
    html = lab.view.value
    assert "status: <b>done</b>" in html and "finished 6, failed 0" in html and "Serving Benchmark Result" in html
    assert "Successful requests:                     6" in html and "Maximum request concurrency:" in html
    assert "max concurrency <b>2</b>" in html
    assert not lab.start_button.disabled and lab.stop_button.disabled
    assert drained(server)


def test_settings_are_refused_while_a_run_is_in_effect_and_stop_cancels_it(lab, server):
    lab.num_prompts.value = 60
    lab.request_rate.value = 20.0
    lab.output_len.value = 200
    lab.start()
    st = lab.state
    assert st.running and lab.start_button.disabled and not lab.stop_button.disabled
    deadline = time.monotonic() + GUARD_S
    while st.num_in_flight < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    lab.request_rate.value = 2.0  # the run in progress uses 20 req/s: refused
    assert "a bench is running" in lab.error_message and lab.request_rate.value == 20.0
    lab.start()
    assert "already running" in lab.error_message
    lab.stop()
    assert lab.error_message == ""
    assert st.wait(GUARD_S) and st.status == "stopped"
    lab.refresh()
    assert st.num_sent < 60 and st.num_not_sent == 60 - st.num_sent and st.num_cancelled >= 1
    assert st.num_sent == st.num_finished + st.num_failed + st.num_cancelled and st.num_failed == 0
    assert "status: <b>stopped</b>" in lab.view.value and f"never sent {st.num_not_sent}" in lab.view.value
    assert drained(server), "the cancelled streams were aborted and their blocks freed"
    assert st.live["vllm:num_requests_running"] == 0, "the last scrape waited for the server to abort them"
    lab.request_rate.value = 2.0  # after the run, settings change again
    assert lab.error_message == "" and lab.state.settings.request_rate == 2.0


def test_a_bench_refuses_settings_the_server_cannot_run(server):
    with pytest.raises(LabError, match="max_model_len=256"):
        ServingBench(server.url, settings=ServingSettings(input_len=200, output_len=100))


def test_parse_metrics_sums_label_sets_and_skips_buckets():
    text = ('# HELP vllm:request_success_total Samples finished.\n# TYPE vllm:request_success_total counter\n'
            'vllm:request_success_total{finished_reason="length",model_name="m"} 3.0\n'
            'vllm:request_success_total{finished_reason="stop",model_name="m"} 2.0\n'
            'vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 4.0\n'
            'vllm:time_to_first_token_seconds_sum{model_name="m"} 0.25\n'
            'vllm:kv_cache_usage_perc{model_name="m"} 0.5\n')
    assert parse_metrics(text) == {"vllm:request_success_total": 5.0, "vllm:time_to_first_token_seconds_sum": 0.25,
                                   "vllm:kv_cache_usage_perc": 0.5}


def test_without_a_server_the_lab_serves_the_course_model_and_close_stops_it():
    from minivllm.lab import ServingLab as Exported

    lab = Exported(settings=ServingSettings(num_prompts=2, request_rate=100.0, output_len=4, input_len=8))
    try:
        assert lab.server is not None and lab.state.max_model_len == 512 and lab.state.model == "course"
        lab.run(timeout=GUARD_S)
        assert lab.state.status == "done" and lab.state.metrics.total_output_tokens == 2 * 4
    finally:
        lab.close()
    assert not lab.server.thread.is_alive() and not lab.server.llm.is_running
