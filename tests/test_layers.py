"""Layers run one way (DESIGN.md §1): the import-linter contracts in pyproject.toml hold, no module
imports itself back through others at run time, and the core, the simulator and the simulator's labs
work with torch and transformers unimportable."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "3 kept, 0 broken" in run.stdout


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's algorithm over the modules: every group of two or more that import each other in a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                other = stack.pop()
                group.append(other)
                if other == module:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return circles


def test_no_import_circles():
    # imports under `if TYPE_CHECKING:` only name types for the reader; they never run
    graph = grimp.build_graph("minivllm", exclude_type_checking_imports=True)
    assert strongly_connected(graph) == []


def test_the_circle_finder_finds_a_circle():
    graph = grimp.ImportGraph()
    for module in ("a", "b", "c"):
        graph.add_module(module)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="a")
    graph.add_import(importer="b", imported="c")
    assert strongly_connected(graph) == [["a", "b"]]


def test_kernels_import_nothing_of_minivllm_but_themselves():
    """kernels/ is a namespace package the contracts' graph cannot see, so it is checked here."""
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.split(".")[0] == "minivllm":
                    assert name.startswith("minivllm.kernels"), f"{path.name} imports {name}"


TORCH_FREE = textwrap.dedent("""
    import json
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} is refused in this test")

    sys.meta_path.insert(0, Refuse())

    import minivllm
    from minivllm import SamplingParams
    from minivllm.core.perfetto import to_chrome_trace
    from minivllm.sim import SimConfig, Simulator, compute_metrics, get_hardware, get_model, preset
    from minivllm.lab.batching import BatchingSettings, simulate as simulate_batching
    from minivllm.lab.chunking import ChunkingSettings, simulate as simulate_chunking
    from minivllm.lab.experiment import SimExperiment
    from minivllm.lab.kv_memory import KVMemoryPlan
    from minivllm.lab.parallel import plan_for
    from minivllm.lab.roofline import PagedAttentionCost
    from minivllm.sim import HARDWARE, MODELS

    sim = Simulator(SimConfig(get_model("Llama-3.1-8B"), get_hardware("H100-SXM")))
    result = sim.run(preset("balanced", 200, request_rate=10).generate())
    assert len(result.requests) == 200 and all(r.finish_reason for r in result.requests)
    assert compute_metrics(result.trace, result.arrival_times).num_requests == 200
    perfetto = json.loads(json.dumps(to_chrome_trace(result.trace, arrival_times=result.arrival_times)))
    assert sum(e["ph"] == "X" and e["pid"] == 1 for e in perfetto["traceEvents"]) == len(result.trace)

    batching = SimExperiment(simulate_batching, BatchingSettings())
    batching.update(policy="static")
    chunking = SimExperiment(simulate_chunking, ChunkingSettings())
    KVMemoryPlan(MODELS["Llama-3.1-8B"], HARDWARE["H100-SXM"], "bf16", 8192, 16)
    plan_for(model="Llama-3.1-70B", gpu="H100-SXM", context_len=8192, tp=4, pp=1, dp=1, ep=1, cp=1)
    PagedAttentionCost(32, 8, 128, 16, 64, 4096)
    SamplingParams(max_tokens=4)
    assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
    print("ok")
""")


def test_core_simulator_and_its_labs_run_without_torch():
    run = subprocess.run([sys.executable, "-c", TORCH_FREE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.strip() == "ok"
