"""Chapter 12's landscape lab driven without a browser: needs filter the engines, a scenario sets its
needs and shows its deciding rows, every shown cell links its sources, and a set of needs no engine
meets is refused with the closest engines named while the control goes back to the needs in effect."""
from __future__ import annotations

import html

import pytest

from minivllm.course.landscape import load_landscape
from minivllm.lab import LandscapeLab
from minivllm.lab.landscape import LandscapeState, source_link


@pytest.fixture(scope="module")
def table():
    return load_landscape()


def engine_headers(lab) -> list[str]:
    head = lab.view.value.split("</tr>", 1)[0]
    return [html.unescape(h.split("</th>")[0]) for h in head.split("<th>")[2:]]


def test_needs_filter_the_engines_and_their_rows(table):
    lab = LandscapeLab()
    assert len(lab.state.engines) == 7 and "Tick a need" in lab.view.value
    lab.needs.value = ("multi_lora", "runs_on_cpu")
    assert lab.state.needs == ("multi_lora", "runs_on_cpu")
    assert [e.key for e in lab.state.engines] == ["vllm", "sglang", "llama_cpp"]
    assert engine_headers(lab) == ["vLLM", "SGLang", "llama.cpp"]
    assert "<b>3 of 7 engines</b>" in lab.view.value
    assert [c.key for c in lab.state.shown_rows] == ["multi_lora", "hardware"]
    assert ">Multi-LoRA</th>" in lab.view.value and ">Hardware</th>" in lab.view.value
    assert ">API</th>" not in lab.view.value
    lab.rows.value = "all"
    assert len(lab.state.shown_rows) == len(table.capabilities) and ">API</th>" in lab.view.value
    assert not lab.error.value


def test_every_shown_cell_carries_its_sources_date_and_claim_mark(table):
    lab = LandscapeLab(rows="all")
    page = lab.view.value
    for (cap, engine), cell in table.cells.items():
        assert html.escape(cell.text) in page, (cap, engine)
        for source in cell.sources:
            assert source_link(source) in page
    assert page.count("checked 2026-12-05") == len(table.cells)
    assert page.count("self-reported</span>") == len(table.self_reported_cells())
    assert '<a href="https://docs.vllm.ai/en/latest/design/prefix_caching/" target="_blank">' in page
    assert '<a href="../minivllm/core/block_manager.py" target="_blank">minivllm/core/block_manager.py</a>' in page


def test_a_scenario_sets_its_needs_and_shows_why(table):
    lab = LandscapeLab()
    assert lab.choose(scenario="many_loras")
    sc = table.scenario("many_loras")
    assert lab.needs.value == sc.needs == lab.state.needs
    assert tuple(e.key for e in lab.state.engines) == sc.answer
    assert html.escape(sc.reasoning) in lab.view.value
    assert {c.key for c in lab.state.shown_rows} == {"multi_lora", "project_status"}
    lab.needs.value = ("multi_lora",)  # the needs leave the scenario: it is no longer in effect
    assert lab.scenario.value == "" == lab.state.scenario
    assert html.escape(sc.reasoning) not in lab.view.value
    assert [e.key for e in lab.state.engines] == ["vllm", "sglang", "tensorrt_llm", "tgi", "lmdeploy", "llama_cpp"]


def test_needs_no_engine_meets_are_refused_and_the_control_goes_back():
    lab = LandscapeLab(needs=("pd_disaggregation",))
    before = lab.view.value
    lab.needs.value = ("pd_disaggregation", "phones")
    message = lab.error_message
    assert message.startswith("No engine in the table has all of: P/D disaggregation, runs on phones (Android).")
    assert "llama.cpp lacks P/D disaggregation" in message
    assert "needs is back at ('pd_disaggregation',), the value in effect" in message
    assert lab.needs.value == ("pd_disaggregation",) == lab.state.needs
    assert lab.view.value == before
    lab.rows.value = "all"  # one refused control never blocks the others
    assert not lab.error.value and ">API</th>" in lab.view.value
    assert not lab.choose(needs=("phones", "multi_lora_batched"))
    assert lab.state.needs == ("pd_disaggregation",) and "lacks" in lab.error_message
    assert lab.choose(needs=("phones",)) and [e.key for e in lab.state.engines] == ["llama_cpp"]


def test_the_state_refuses_bad_settings_by_name(table):
    state = LandscapeState(table)
    with pytest.raises(ValueError, match="need='gpu' is unknown"):
        state.set_needs(["gpu"])
    with pytest.raises(ValueError, match="scenario='cloud' is unknown"):
        state.set_scenario("cloud")
    with pytest.raises(ValueError, match="rows='some' is not one of: needs, all"):
        state.set_rows("some")
    assert state.needs == () and state.rows == "needs"
    state.set_needs(["runs_on_cpu", "runs_on_cpu"])
    assert state.needs == ("runs_on_cpu",)


def test_the_hash_vs_radix_part_runs_both_caches_on_the_chosen_workload():
    lab = LandscapeLab()
    assert lab.tabs.get_title(0) == "which engine for which job" and lab.tabs.get_title(1) == "hash vs radix"
    lab.workload.value, lab.driver.value, lab.size.value = "unaligned_prefix", "sim", "small"
    lab.compare_button.click()
    result = lab.comparison
    assert (result.workload, result.driver, result.size) == ("unaligned_prefix", "sim", "small")
    # a prefix shared up to the middle of a block: only the radix cache reuses the part-block
    assert result.radix.prefill_tokens < result.hash.prefill_tokens
    assert "hash" in lab.benchmark_view.value and "radix" in lab.benchmark_view.value
    assert f"{result.prefill_saved} tokens saved" in lab.benchmark_view.value
