"""The exercises: learner copies are generated from the solved notebooks and up to date; every
check passes on the solution and fails on the untouched skeleton; and the sampling check rejects
samplers that get the distribution wrong."""
from __future__ import annotations

import ast
import os
import warnings
from pathlib import Path

import nbformat
import pytest
import torch

from minivllm import SamplingParams
from minivllm.course import checks, exercises

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = ROOT / "exercises"
SOLUTIONS = sorted((EXERCISES / "solutions").glob("*.ipynb"))


# ---- the generator --------------------------------------------------------------------------------
def test_strip_solution_keeps_the_marker_indentation():
    src = ("def f(x):\n"
           "    \"\"\"doc\"\"\"\n"
           "    ### BEGIN SOLUTION\n"
           "    y = x + 1\n"
           "    return y\n"
           "    ### END SOLUTION\n"
           "\n"
           "### BEGIN SOLUTION\n"
           "z = 3\n"
           "### END SOLUTION\n"
           "print(f)")
    assert exercises.strip_solution(src) == (
        "def f(x):\n    \"\"\"doc\"\"\"\n    # YOUR CODE HERE\n    raise NotImplementedError\n\n"
        "# YOUR CODE HERE\nraise NotImplementedError\nprint(f)")


@pytest.mark.parametrize("src", ["### BEGIN SOLUTION\nx = 1",
                                 "x = 1\n### END SOLUTION",
                                 "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n### END SOLUTION"])
def test_strip_solution_rejects_unbalanced_markers(src):
    with pytest.raises(ValueError):
        exercises.strip_solution(src)


def test_learner_notebook_clears_every_output_and_the_markers():
    sol = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION",
                                  execution_count=1, outputs=[]),
        nbformat.v4.new_code_cell("print(f())", execution_count=2, outputs=[
            nbformat.v4.new_output("stream", name="stdout", text="1\n")]),
        nbformat.v4.new_markdown_cell("Why?\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION")])
    sol.cells[1].metadata["execution"] = {"iopub.status.busy": "2025-01-01T00:00:00Z"}
    sol.metadata["widgets"] = {"state": {}}
    nb = exercises.learner_notebook(sol)
    assert [c.source for c in nb.cells] == [
        "def f():\n    # YOUR CODE HERE\n    raise NotImplementedError", "print(f())", "Why?\nYOUR ANSWER HERE"]
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    assert "widgets" not in nb.metadata and "execution" not in nb.cells[1].metadata
    assert sol.cells[1].outputs, "the solution itself is left alone"
    with pytest.raises(ValueError, match="no ### BEGIN SOLUTION"):
        exercises.learner_notebook(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]))


def test_check_mode_reports_stale_and_orphaned_copies(tmp_path, capsys):
    (tmp_path / "solutions").mkdir()
    sol = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")])
    nbformat.write(sol, tmp_path / "solutions" / "01_x.ipynb")
    assert exercises.main(["--dir", str(tmp_path), "--check"]) == 1  # missing
    assert exercises.main(["--dir", str(tmp_path)]) == 0
    assert exercises.main(["--dir", str(tmp_path), "--check"]) == 0
    sol.cells[0].source += "\ny = 2"
    nbformat.write(sol, tmp_path / "solutions" / "01_x.ipynb")
    assert exercises.main(["--dir", str(tmp_path), "--check"]) == 1  # stale
    exercises.main(["--dir", str(tmp_path)])
    (tmp_path / "02_orphan.ipynb").write_text("{}")
    assert exercises.main(["--dir", str(tmp_path), "--check"]) == 1
    assert "02_orphan.ipynb has no solutions/02_orphan.ipynb" in capsys.readouterr().err


def test_there_are_exercises():
    assert SOLUTIONS, "exercises/solutions/ holds no notebook"


def test_learner_copies_are_up_to_date():
    found = exercises.problems(str(EXERCISES))
    assert not found, "\n".join(found + ["run `python -m minivllm.course.exercises` from the repository root"])


# ---- every check passes on its solution and fails on the skeleton ------------------------------------
def run_code_cells(nb, name: str, tolerate_not_implemented: bool) -> list[checks.CheckResult]:
    """Execute the notebook's code cells in order in one namespace, in-process (as the notebook's
    kernel would, minus IPython display); return the check results recorded meanwhile."""
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    checks.HISTORY.clear()
    namespace = {"__name__": "__main__"}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        assert not any(line.lstrip().startswith(("%", "!")) for line in cell.source.splitlines()), \
            f"{name} cell {i}: exercise notebooks are plain Python (no magics), so tests can exec them"
        code = compile(cell.source, f"<{name} cell {i}>", "exec")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*non-interactive.*")  # plt.show() under Agg
            try:
                exec(code, namespace)
            except NotImplementedError:
                if not tolerate_not_implemented:
                    raise
    plt.close("all")
    return list(checks.HISTORY)


@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_checks_pass_on_the_solution(solution, monkeypatch, capsys):
    monkeypatch.chdir(solution.parent)  # where the notebook's kernel runs
    results = run_code_cells(nbformat.read(solution, as_version=4), solution.name, False)
    assert results, f"{solution.name} runs no check from minivllm.course.checks"
    assert all(results), "\n".join(str(r) for r in results)
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out


@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_checks_fail_on_the_skeleton(solution, monkeypatch, capsys):
    monkeypatch.chdir(EXERCISES)
    learner = exercises.learner_notebook(nbformat.read(solution, as_version=4))
    results = run_code_cells(learner, solution.name, True)
    assert results, f"the learner copy of {solution.name} runs no check"
    assert not any(results), "a check passed on the untouched skeleton"
    assert all("NotImplementedError" in r.failure for r in results)
    assert "\nFAIL  " in "\n" + capsys.readouterr().out


def test_solutions_mark_their_solution_code():
    for path in SOLUTIONS:
        nb = nbformat.read(path, as_version=4)
        marked = [c for c in nb.cells if exercises.has_solution(c.source)]
        assert marked, f"{path.name} has no ### BEGIN SOLUTION block"
        for c in marked:
            if c.cell_type == "code":
                ast.parse(exercises.strip_solution(c.source))  # the skeleton is valid Python


# ---- the sampling check tells right from wrong ---------------------------------------------------
def make_sampler(ignore_temperature=False, ignore_top_k=False, ignore_top_p=False,
                 top_p_before_temperature=False, top_p_before_top_k=False, first_row_params=False,
                 sorted_ids=False, always_greedy=False, no_generator=False):
    """A vectorised sampler (a second correct implementation, unlike the notebook's loop), with
    switches that each break one rule."""
    def nucleus_mask(z, top_p):
        probs, order = z.softmax(-1).sort(-1, descending=True)
        remove_sorted = probs.cumsum(-1) - probs >= top_p[:, None]
        return torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)

    def sample(logits, params, generator):
        if first_row_params:
            params = [params[0]] * len(params)
        n, vocab = logits.shape
        temp = torch.tensor([p.temperature for p in params])
        greedy = temp == 0
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params])
        top_p = torch.tensor([p.top_p for p in params])
        z = logits.float()
        if top_p_before_temperature and not ignore_top_p:
            z = z.masked_fill(nucleus_mask(z, top_p), float("-inf"))
        if not ignore_temperature:
            z = z / torch.where(greedy, 1.0, temp)[:, None]
        before_top_k = z
        if not ignore_top_k:
            kth = z.sort(-1, descending=True).values.gather(-1, (top_k - 1)[:, None])
            z = z.masked_fill(z < kth, float("-inf"))
        if not ignore_top_p and not top_p_before_temperature:
            z = z.masked_fill(nucleus_mask(before_top_k if top_p_before_top_k else z, top_p), float("-inf"))
        probs = z.softmax(-1)
        if sorted_ids:
            probs = probs.sort(-1, descending=True).values
        drawn = torch.multinomial(probs, 1, generator=None if no_generator else generator)[:, 0]
        return logits.argmax(-1) if always_greedy else torch.where(greedy, logits.argmax(-1), drawn)

    return sample


def test_check_passes_a_second_correct_implementation(capsys):
    result = checks.check_sampling(make_sampler())
    assert result, str(result)
    assert capsys.readouterr().out.splitlines()[-1] == "PASS  check_sampling"


@pytest.mark.parametrize("flaw,words", [
    ("ignore_temperature", "rows with temperature=0.5 "),
    ("ignore_top_k", "(temperature=0.9, top_k=1): expected token"),
    ("ignore_top_p", "(temperature=1.5, top_p=1e-06): expected token"),
    ("top_p_before_temperature", "rows with temperature=2, top_p=0.5 "),
    ("top_p_before_top_k", "(temperature=0.7, top_k=4, top_p=0.8): sampled token"),
    ("first_row_params", "row"),
    ("sorted_ids", "row"),
    ("always_greedy", "rows with temperature=1 "),
    ("no_generator", "two calls with generators seeded alike"),
])
def test_check_rejects_a_flawed_sampler(flaw, words, capsys):
    result = checks.check_sampling(make_sampler(**{flaw: True}))
    assert not result
    assert words in result.failure, result.failure
    assert capsys.readouterr().out.splitlines()[-1].startswith("FAIL  check_sampling: ")


@pytest.mark.parametrize("flaw", ["ignore_temperature", "ignore_top_p", "ignore_top_k"])
def test_the_statistical_stage_alone_rejects(flaw):
    """Not only the argmax rows: the chi-square stage on its own catches these too."""
    with pytest.raises(checks.CheckFailed):
        checks._stage_distribution(make_sampler(**{flaw: True}), draws=4000)


def test_reference_distribution_matches_the_definitions():
    """The check's expected probabilities, read from the engine's filters, equal a by-hand reading
    of the exercise's text for every setting, and no setting sits on a top-p boundary."""
    for i, p in enumerate(checks.SAMPLING_SETTINGS):
        row = checks.setting_logits(i).double()
        z = row / p.temperature
        order = z.argsort(descending=True)
        keep = order[:p.top_k] if p.top_k > 0 else order
        probs = z[keep].softmax(-1)
        mass_before = probs.cumsum(0) - probs
        assert (mass_before - p.top_p).abs().min() > 0.01 or p.top_p == 1
        keep = keep[mass_before < p.top_p]
        want = torch.zeros_like(row)
        want[keep] = z[keep].softmax(-1)
        torch.testing.assert_close(checks.reference_probs(row, p), want)


def test_check_reports_bad_return_values():
    def wrong_shape(logits, params, generator):
        return logits.argmax(-1, keepdim=True)

    def floats(logits, params, generator):
        return logits.argmax(-1).float()

    def crashes(logits, params, generator):
        return {}[0]

    for fn, words in [(wrong_shape, "sample() returned shape [24, 1] for 24 rows"),
                      (floats, "sample() returned torch.float32 values"),
                      (crashes, "sample() raised KeyError: 0")]:
        result = checks.check_sampling(fn, verbose=False)
        assert not result and result.failure.startswith(words), result.failure


def test_engine_sampler_is_restored_after_the_check():
    llm = checks.check_engine()
    before = llm.llm_engine.model_runner.sampler
    checks._stage_engine(make_sampler())

    def broken(logits, params, generator):
        raise RuntimeError("boom")

    with pytest.raises(checks.CheckFailed, match="inside the engine"):
        checks._stage_engine(broken)
    assert llm.llm_engine.model_runner.sampler is before
    out = llm.generate("def f", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_exercise_notebooks_exist_in_pairs():
    learners = sorted(p.name for p in EXERCISES.glob("*.ipynb"))
    assert learners == [p.name for p in SOLUTIONS]
    assert os.path.isdir(EXERCISES / "solutions")
