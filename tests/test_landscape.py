"""Chapter 12's engine table: every engine has every capability, every cell a source (an http(s) URL or
a path that exists in this repository) and an ISO date, the filters and scenarios agree with the cells,
and a malformed file is refused with a ValueError naming the field."""
from __future__ import annotations

import copy
import datetime
import tomllib
from pathlib import Path

import pytest

from minivllm.course.landscape import DATA_PATH, is_repository_path, is_url, load_landscape, parse_landscape

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ["vLLM", "SGLang", "TensorRT-LLM", "TGI (Text Generation Inference)", "LMDeploy", "llama.cpp", "minivllm"]
CAPABILITIES = ["kv_memory", "prefix_caching", "scheduling", "speculative_decoding", "quantization",
                "structured_output", "multi_lora", "pd_disaggregation", "parallelism", "hardware", "api",
                "project_status"]


@pytest.fixture(scope="module")
def table():
    return load_landscape()


@pytest.fixture
def raw():
    with open(DATA_PATH, "rb") as f:
        return tomllib.load(f)


def test_every_engine_has_every_capability(table):
    assert [e.name for e in table.engines] == ENGINES
    assert [c.key for c in table.capabilities] == CAPABILITIES
    assert set(table.cells) == {(c, e.key) for c in CAPABILITIES for e in table.engines}


def test_every_cell_has_a_source_that_resolves_and_a_date(table):
    for (cap, engine), cell in table.cells.items():
        assert cell.text.strip(), (cap, engine)
        assert isinstance(cell.checked, datetime.date) and not isinstance(cell.checked, datetime.datetime)
        assert datetime.date(2026, 1, 1) <= cell.checked <= datetime.date(2026, 12, 5), (cap, engine)
        for source in cell.sources:
            if is_url(source):
                assert source.startswith(("https://", "http://")), source
            else:
                assert is_repository_path(source), source
                assert (ROOT / source).exists(), f"cells.{cap}.{engine}: {source} is not in the repository"
        if engine != "minivllm":  # other projects are cited by their own pages, never by our tree
            assert all(is_url(s) for s in cell.sources), (cap, engine)


def test_speed_claims_are_marked_self_reported(table):
    """The cells that quote a project's numbers about itself say so; the others carry no numbers of
    that kind."""
    marked = set(table.self_reported_cells())
    assert {("prefix_caching", "tgi"), ("speculative_decoding", "sglang"), ("scheduling", "lmdeploy"),
            ("project_status", "minivllm")} <= marked
    for key, cell in table.cells.items():
        if key not in marked:
            assert not any(w in cell.text for w in ("faster", "speed-up", "tokens/s", "throughput of")), key


def test_minivllm_column_describes_the_tree(table):
    assert table.cell("quantization", "minivllm").tags == ()
    assert table.cell("multi_lora", "minivllm").tags == ()
    prefix = table.cell("prefix_caching", "minivllm")
    if (ROOT / "minivllm/core/radix_block_manager.py").exists():
        assert "minivllm/core/radix_block_manager.py" in prefix.sources and "token_granularity" in prefix.tags
    else:
        assert "radix" not in prefix.text.lower() and "block_granularity" in prefix.tags
    assert table.cell("project_status", "tgi").tags == ("maintenance",)


def test_filters(table):
    names = lambda needs: [e.key for e in table.engines_meeting(needs)]  # noqa: E731
    assert len(table.engines_meeting([])) == 7
    assert names(["runs_on_cpu"]) == ["vllm", "sglang", "llama_cpp", "minivllm"]
    assert names(["pd_disaggregation"]) == ["vllm", "sglang", "tensorrt_llm", "lmdeploy", "minivllm"]
    assert "minivllm" not in names(["multi_lora"]) and "llama_cpp" in names(["multi_lora"])
    assert "llama_cpp" not in names(["multi_lora_batched"])
    assert names(["runs_on_cpu", "pd_disaggregation", "phones"]) == []
    assert [n.label for n in table.missing_needs("llama_cpp", ["runs_on_cpu", "pd_disaggregation"])] == \
        ["P/D disaggregation"]
    assert [c.key for c in table.rows_for(["phones", "multi_lora", "runs_on_cpu"])] == ["multi_lora", "hardware"]
    with pytest.raises(ValueError, match="need='gpu' is unknown"):
        table.engines_meeting(["gpu"])
    with pytest.raises(ValueError, match="engine='ollama' is unknown"):
        table.cell("api", "ollama")


def test_every_need_is_met_by_some_engine(table):
    for need in table.needs:
        assert table.engines_meeting([need.key]), need.key


def test_scenarios_name_existing_rows_and_agree_with_the_table(table):
    keys = {c.key for c in table.capabilities}
    assert {s.key for s in table.scenarios} == {"laptop", "h100_chat", "long_context_rag", "many_loras", "on_device"}
    for s in table.scenarios:
        assert s.deciding and set(s.deciding) <= keys, s.key
        assert {table.need(n).capability for n in s.needs} <= keys
        assert s.reasoning.endswith(".") and len(s.reasoning.split(".")) <= 3, s.key  # a sentence or so
        assert s.answer and s.answer == tuple(e.key for e in table.engines_meeting(s.needs)), s.key


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["cells"]["api"].pop("tgi"), r"cells\.api\.tgi is missing"),
    (lambda d: d["cells"]["api"]["tgi"].update(source=""), r"cells\.api\.tgi\.source='' must be an http"),
    (lambda d: d["cells"]["api"]["tgi"].update(source="ftp://x.org/a"), r"cells\.api\.tgi\.source='ftp"),
    (lambda d: d["cells"]["api"]["tgi"].update(source="/etc/passwd"), r"cells\.api\.tgi\.source='/etc/passwd'"),
    (lambda d: d["cells"]["api"]["tgi"].update(source="../outside.py"), r"cells\.api\.tgi\.source='\.\./outside"),
    (lambda d: d["cells"]["api"]["tgi"].update(checked="5 Dec 2026"), r"checked='5 Dec 2026' must be an ISO"),
    (lambda d: d["cells"]["api"]["tgi"].update(checked=datetime.datetime(2026, 12, 5)), r"tgi\.checked=.*ISO"),
    (lambda d: d["cells"]["api"]["tgi"].pop("self_reported"), r"cells\.api\.tgi\.self_reported is missing"),
    (lambda d: d["cells"]["api"]["tgi"].update(self_reported="no"), r"self_reported='no' must be true or false"),
    (lambda d: d["cells"]["api"]["tgi"].update(text=" "), r"cells\.api\.tgi\.text=' ' must be a non-empty"),
    (lambda d: d["cells"]["api"]["tgi"].update(soruce="x"), r"cells\.api\.tgi\.soruce is not a cell field"),
    (lambda d: d["cells"]["api"]["tgi"].update(more_sources=["not a path"]), r"more_sources\[0\]='not a path'"),
    (lambda d: d["cells"]["api"].update(ollama=d["cells"]["api"]["tgi"]), r"cells\.api\.ollama is not an engine"),
    (lambda d: d["cells"].update(speed={}), r"cells\.speed is not a capability"),
    (lambda d: d["needs"][0].update(capability="gpu"), r"needs\[0\]\.capability='gpu' is not a capability"),
    (lambda d: d["needs"][0].update(tag="cpus"), r"needs\[0\]\.tag='cpus' is in no cell"),
    (lambda d: d["scenarios"][0].update(deciding=["speed"]), r"deciding\[0\]='speed' is not a capability"),
    (lambda d: d["scenarios"][0].update(deciding=[]), r"scenarios\[0\]\.deciding is empty"),
    (lambda d: d["scenarios"][0].update(needs=["gpu"]), r"scenarios\[0\]\.needs\[0\]='gpu' is not a need"),
    (lambda d: d["scenarios"][0].update(answer=["ollama"]), r"scenarios\[0\]\.answer\[0\]='ollama' is not an engine"),
    (lambda d: d["engines"].append(dict(d["engines"][0])), r"engines has the key 'vllm' twice"),
    (lambda d: d.pop("scenarios"), r"scenarios is missing"),
])
def test_a_malformed_table_is_refused_naming_the_field(raw, edit, message):
    data = copy.deepcopy(raw)
    edit(data)
    with pytest.raises(ValueError, match=message):
        parse_landscape(data)


def test_a_quoted_iso_date_is_accepted_and_bad_toml_is_refused(raw, tmp_path):
    data = copy.deepcopy(raw)
    data["cells"]["api"]["tgi"]["checked"] = "2026-12-05"
    assert parse_landscape(data).cell("api", "tgi").checked == datetime.date(2026, 12, 5)
    bad = tmp_path / "bad.toml"
    bad.write_text("[cells\n")
    with pytest.raises(ValueError, match="is not valid TOML"):
        load_landscape(str(bad))


def test_the_table_ships_as_package_data():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "landscape.toml" in package_data["minivllm.course"]
    assert Path(DATA_PATH) == ROOT / "minivllm" / "course" / "landscape.toml"
