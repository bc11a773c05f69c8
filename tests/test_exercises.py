"""The exercises: learner copies are generated from the solved notebooks and up to date; every
check passes on the solution and fails on the untouched skeleton; the sampling check rejects
samplers that get the distribution wrong, and the block-manager check block managers that break a
rule, each with the first broken rule in words; the row-parallel check (exercise 08) names a missing
all-reduce, a bias added on every rank and a wrong input slice; the rejection-sampler check (exercise
07) verifiers that break the acceptance rule, the residual, the bonus token or the contract; the
SLO-search check (exercise 09) searches that miss the edge cases, return a rate that misses the SLO,
stop early, never stop, or probe too often; the radix-tree check (exercise 12) matches and inserts
that break a rule of the tree."""
from __future__ import annotations

import ast
import linecache
import os
import re
import warnings
from collections import deque
from pathlib import Path

import nbformat
import pytest
import torch

from minivllm import LLM
from minivllm.config.engine import EngineConfig
from minivllm.core.block_manager import BlockManager, BlockManagerBase, chain_hash
from minivllm.core.policy import ContinuousBatching, StaticBatching
from minivllm.core.radix_block_manager import RadixBlockManager, common_prefix_len
from minivllm.core.sequence import SequenceStatus
from minivllm.course import checks, exercises
from minivllm.course.checks import base as check_base
from minivllm.course.checks import block_manager as bm_checks
from minivllm.course.checks import radix_tree as radix_checks
from minivllm.course.checks import rejection_sampler as verify_checks
from minivllm.course.checks import sampling as sampling_checks
from minivllm.course.checks import scheduling_policy as policy_checks
from minivllm.course.checks import slo_search as slo_checks
from minivllm.engine.detokenizer import IncrementalDetokenizer

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
        filename = f"<{name} cell {i}>"
        # as IPython does, so that inspect.getsource finds a function defined in a cell
        linecache.cache[filename] = (len(cell.source), None, cell.source.splitlines(True), filename)
        code = compile(cell.source, filename, "exec")
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
# ---- what the tests of every check assert -------------------------------------------------------------
def assert_passes(result: checks.CheckResult, name: str, capsys) -> None:
    """``result`` passed, and the check printed ``PASS  name`` last."""
    assert result, str(result)
    assert capsys.readouterr().out.splitlines()[-1] == f"PASS  {name}"


def assert_fails_with(result: checks.CheckResult, words: str | re.Pattern, name: str, capsys) -> None:
    """``result`` failed at a case whose words begin with ``words`` (or match the pattern: where the step,
    block or count depends on the course model's tokens, which a retrain changes), and the check printed
    ``FAIL  name: ...`` last."""
    assert not result
    if isinstance(words, re.Pattern):
        assert words.match(result.failure), result.failure
    else:
        assert result.failure.startswith(words), result.failure
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"FAIL  {name}: ")


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
    assert_passes(result, "check_sampling", capsys)


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
        sampling_checks._stage_distribution(make_sampler(**{flaw: True}), draws=4000)


def test_reference_distribution_matches_the_definitions():
    """The check's expected probabilities, read from the engine's filters, equal a by-hand reading
    of the exercise's text for every setting, and no setting sits on a top-p boundary."""
    for i, p in enumerate(sampling_checks.SAMPLING_SETTINGS):
        row = sampling_checks.setting_logits(i).double()
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


def test_the_check_plugs_the_sampler_in_as_an_engine_argument():
    def broken(logits, params, generator):
        raise RuntimeError("boom")

    with pytest.raises(checks.CheckFailed, match="inside the engine .*raised RuntimeError: boom"):
        sampling_checks._stage_engine(broken)
    assert sampling_checks._stage_engine(make_sampler()).startswith("plugged into the engine")


def test_exercise_notebooks_exist_in_pairs():
    learners = sorted(p.name for p in EXERCISES.glob("*.ipynb"))
    assert learners == [p.name for p in SOLUTIONS]
    assert os.path.isdir(EXERCISES / "solutions")


# ---- the block-manager check tells right from wrong -----------------------------------------------
# Each flawed manager is the engine's own with one rule of exercise 02 broken.
class FreeIgnoresSharing(BlockManager):
    """free() returns every block to the free queue, though other requests still hold the shared ones."""

    def free(self, seq):
        for b in reversed(seq.block_table):
            if self.blocks[b].ref_count:
                self.blocks[b].ref_count = 0
                self.push_free_block(b)
        seq.block_table.clear()
        seq.num_computed_tokens = 0


class FreeQueuesHeldBlocks(BlockManager):
    """free() drops the reference but queues the block even when others still hold it."""

    def free(self, seq):
        for b in reversed(seq.block_table):
            self.blocks[b].ref_count -= 1
            self.push_free_block(b)
        seq.block_table.clear()
        seq.num_computed_tokens = 0


class FreeKeepsComputedTokens(BlockManager):
    def free(self, seq):
        n = seq.num_computed_tokens
        super().free(seq)
        seq.num_computed_tokens = n


class AllocateSetsOneReference(BlockManager):
    """A cache hit sets ref_count = 1 instead of adding a reference."""

    def allocate(self, seq, cached_blocks):
        for b in cached_blocks:
            if self.blocks[b].ref_count == 0:
                self.revive_block(b)
            self.blocks[b].ref_count = 1
            seq.block_table.append(b)
        self.events.cache_hits.extend(cached_blocks)
        seq.num_computed_tokens = len(cached_blocks) * self.block_size


class AllocateLeavesHitsOnTheFreeQueue(BlockManager):
    """A hit on a freed cached block does not take it off the free queue, so it can be handed out
    again while it is in use."""

    def allocate(self, seq, cached_blocks):
        for b in cached_blocks:
            self.blocks[b].ref_count += 1
            seq.block_table.append(b)
        self.events.cache_hits.extend(cached_blocks)
        seq.num_computed_tokens = len(cached_blocks) * self.block_size


class AllocateRecordsNoHits(BlockManager):
    def allocate(self, seq, cached_blocks):
        super().allocate(seq, cached_blocks)
        self.events.cache_hits.clear()


class IgnoresTheCache(BlockManager):
    def find_cached_prefix(self, seq):
        return []


class UnchainedHashes(BlockManager):
    """Hashes each block on its own tokens, so equal blocks after different prefixes would match."""

    def find_cached_prefix(self, seq):
        return []

    def append_slots(self, seq, num_new_tokens):
        end = seq.num_computed_tokens + num_new_tokens
        while len(seq.block_table) < self.blocks_needed(end):
            b = self.pop_free_block()
            self.blocks[b].ref_count = 1
            seq.block_table.append(b)
        bs = self.block_size
        for i in range(seq.num_computed_tokens // bs, end // bs):
            block = self.blocks[seq.block_table[i]]
            block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            block.block_hash = chain_hash(None, block.token_ids)


class NeverHashes(BlockManager):
    def _register_full_blocks(self, seq, num_tokens):
        pass


class LookupRaises(BlockManager):
    def find_cached_prefix(self, seq):
        return [self.cached[chain_hash(None, tuple(seq.token_ids[:self.block_size]))]]


class LeavesOutFree(BlockManagerBase):
    find_cached_prefix = BlockManager.find_cached_prefix
    allocate = BlockManager.allocate
    append_slots = BlockManager.append_slots


def test_block_manager_check_passes_the_engines_own(capsys):
    result = checks.check_block_manager(BlockManager)
    assert_passes(result, "check_block_manager", capsys)


@pytest.mark.parametrize("flawed,words", [
    (FreeIgnoresSharing, "after step 9: block 0 has ref_count 0 but 5 block tables hold it (requests r0, r1, r2, r3, r4)"),
    (FreeQueuesHeldBlocks, re.compile(r"step \d+: free\(\) raised ValueError: block_id=\d+ has ref_count [2-9]: "
                                      "only a block no request holds")),
    (FreeKeepsComputedTokens, re.compile(r"after step \d+: request r\d+ was preempted, but its num_computed_tokens "
                                         r"is [1-9]\d*: free\(\) must reset it to 0")),
    (AllocateSetsOneReference, "after step 0: block 0 has ref_count 1 but 6 block tables hold it"),
    (AllocateLeavesHitsOnTheFreeQueue, "after step 16: request r4 lists a block twice"),
    (AllocateRecordsNoHits, re.compile(r"step 0: the trace records 0 prefix-cache block hits with your block manager, "
                                       r"[1-9]\d* with the stock one")),
    (IgnoresTheCache, re.compile(r"step 0: the scheduler ran request r1 on tokens 0-(\d+) with your block manager, "
                                 r"on tokens 16-\1 with the stock one")),
    (UnchainedHashes, "after step 0: request r0's logical block 1 (block 1) has hash"),
    (NeverHashes, "after step 0: request r0's logical block 0 (block 0) is full but has no hash"),
    (LookupRaises, "step 0: find_cached_prefix() raised KeyError"),
    (LeavesOutFree, "the engine could not build your block manager: TypeError"),
    (dict, "block_manager_class=<class 'dict'> must be a subclass of minivllm.core.block_manager.BlockManagerBase"),
])
def test_block_manager_check_rejects_a_flawed_manager(flawed, words, capsys):
    result = checks.check_block_manager(flawed)
    assert_fails_with(result, words, "check_block_manager", capsys)


def test_block_manager_check_reports_a_token_mismatch():
    stock = checks.stock_block_manager_run()
    tokens = {rid: list(t) for rid, t in stock.output_tokens.items()}
    tokens["r7"][5] += 1
    runs = {"mine": checks.BlockManagerRun(stock.trace, tokens, stock.prompts)}
    with pytest.raises(checks.CheckFailed, match=r"request r7 \(prompt ending 'class Config:'\): output token 5 is"):
        bm_checks._stage_block_manager_tokens(runs)


def test_block_manager_workload_reaches_every_path():
    """Read from the stock run's trace: hits in the step that writes the blocks, preemption, hits on
    freed blocks that were still cached (revived), and evictions."""
    trace = checks.stock_block_manager_run().trace
    assert len(trace[0].blocks_cache_hit) >= 4 and not trace[0].blocks_freed
    assert sum(len(r.preempted) for r in trace) >= 2
    free, revived = set(range(bm_checks.BM_ENGINE_SETTINGS["num_kv_blocks"])), 0
    for r in trace:
        revived += len((set(r.blocks_cache_hit) & free) - set(r.blocks_allocated))
        free = (free - set(r.blocks_allocated) - set(r.blocks_cache_hit)) | set(r.blocks_freed)
    assert revived >= 1
    assert any(r.blocks_evicted for r in trace)


def test_block_manager_reference_tokens_match_a_plain_engine():
    """The stock run's tokens (cache too small, preemption, prefix hits) equal those of an engine
    with room to spare and no prefix caching, so the check's reference is no artefact of them."""
    stock = checks.stock_block_manager_run()
    with check_base.check_model_folder() as folder:
        llm = LLM(folder, max_model_len=128, enable_prefix_caching=False, seed=0)
    prompts = [bm_checks.BM_SYSTEM_PROMPT + p for p in stock.prompts.values()]
    outs = llm.generate(prompts, bm_checks.BM_PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == list(stock.output_tokens.values())
    assert not any(r.preempted for r in llm.llm_engine.trace)


@pytest.mark.parametrize("value", [dict, "BlockManager", BlockManager(4, 4)])
def test_engine_refuses_a_block_manager_class_that_is_not_one(value):
    with pytest.raises(ValueError, match=r"block_manager_class=.* must be a subclass of .*BlockManagerBase"):
        EngineConfig(model="unused", block_manager_class=value)


# ---- the scheduling-policy check tells right from wrong --------------------------------------------
# Each flawed policy is the engine's own with one rule of exercise 04 broken.
class AdmitsWithTheFullBudget(ContinuousBatching):
    """Admits with the whole budget, forgetting what the running requests took."""

    def schedule_waiting(self, scheduler, out, budget, *, chunked):
        super().schedule_waiting(scheduler, out, scheduler.max_num_batched_tokens, chunked=chunked)


class NeverPreempts(ContinuousBatching):
    """Skips a running request the cache has no room for, instead of preempting."""

    def schedule_running(self, scheduler, out, budget):
        for seq in list(scheduler.running):
            n = min(scheduler.num_tokens_to_run(seq), budget)
            if n and scheduler.block_manager.can_append(seq, n):
                scheduler.schedule_chunk(seq, n, out)
                budget -= n
        return budget


class IgnoresMaxNumSeqs(ContinuousBatching):
    def schedule_waiting(self, scheduler, out, budget, *, chunked):
        bm = scheduler.block_manager
        while scheduler.waiting and budget > 0:
            seq = scheduler.waiting[0]
            cached = bm.find_cached_prefix(seq)
            n = min(seq.num_tokens - len(cached) * bm.block_size, budget)
            if not bm.can_allocate(seq, n, cached):
                break
            scheduler.admit(seq, cached, n, out)
            budget -= n


class PreemptsTheOldest(ContinuousBatching):
    """Preempts the oldest running request, which has already run in this step."""

    def schedule_running(self, scheduler, out, budget):
        for seq in list(scheduler.running):
            if budget == 0 or seq.status is not SequenceStatus.RUNNING:
                continue
            n = min(scheduler.num_tokens_to_run(seq), budget)
            while seq.status is SequenceStatus.RUNNING and not scheduler.block_manager.can_append(seq, n):
                scheduler.preempt(scheduler.running[0], out)
            if seq.status is SequenceStatus.RUNNING:
                scheduler.schedule_chunk(seq, n, out)
                budget -= n
        return budget


class RaisesOnAdmission(ContinuousBatching):
    def schedule_waiting(self, scheduler, out, budget, *, chunked):
        if scheduler.waiting:
            scheduler.admit(scheduler.waiting[0], [], 0, out)


def test_policy_check_passes_the_engines_own(capsys):
    result = checks.check_scheduling_policy(ContinuousBatching())
    assert_passes(result, "check_scheduling_policy", capsys)


@pytest.mark.parametrize("flawed,words", [
    (AdmitsWithTheFullBudget(), "in the engine, step 1: your policy scheduled 33 tokens (r0: 1, r1: 8, r2: 24), "
                                "more than the budget max_num_batched_tokens=24"),
    (NeverPreempts(), "in the engine, step 9: your policy scheduled nothing while 4 requests run and 4 wait "
                      "(0 free KV blocks): the engine cannot go on"),
    (IgnoresMaxNumSeqs(), "in the engine, step 22: 5 requests are running after your policy's step, more than max_num_seqs=4"),
    (PreemptsTheOldest(), "in the engine, step 15: your policy raised ValueError: seq='r1' already runs in this step"),
    (RaisesOnAdmission(), "in the engine, step 0: your policy raised ValueError: num_new_tokens=0 must be in [1, 23]"),
    (StaticBatching(), "in the simulator: your policy's output throughput is 419 tokens/s, no better than static "
                       "batching's 419"),
    (ContinuousBatching, "policy=<class 'minivllm.core.policy.ContinuousBatching'> must be an instance of a "
                         "SchedulingPolicy subclass (pass an instance: ContinuousBatching())"),
])
def test_policy_check_rejects_a_flawed_policy(flawed, words, capsys):
    result = checks.check_scheduling_policy(flawed)
    assert_fails_with(result, words, "check_scheduling_policy", capsys)


def test_policy_reference_tokens_match_a_plain_engine():
    """The stock run's tokens (chunked prompts, preemption, a cap of 4 running) equal those of an
    engine with room to spare that runs every request in one batch, so the check's reference is no
    artefact of the schedule; and the workload reaches the cap with requests waiting."""
    stock = policy_checks.stock_policy_engine_run()
    assert any(r.num_running == policy_checks.SP_ENGINE_SETTINGS["max_num_seqs"] and r.num_waiting for r in stock.trace)
    with check_base.check_model_folder() as folder:
        llm = LLM(folder, max_model_len=128, seed=0)
    prompts = [p for wave in policy_checks.SP_ARRIVALS.values() for p in wave]
    outs = llm.generate(prompts, policy_checks.SP_PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == list(stock.output_tokens.values())
    assert not any(r.preempted for r in llm.llm_engine.trace)


@pytest.mark.parametrize("value", [ContinuousBatching, "lifo", None])
def test_engine_refuses_a_batching_policy_that_is_not_one(value):
    with pytest.raises(ValueError, match=r"batching_policy=.* must be one of \('continuous', 'static'\) or a "):
        EngineConfig.from_args("unused", batching_policy=value)


# ---- the rejection-sampler check tells right from wrong (exercise 07) ------------------------------
def make_verifier(argmax_agreement=False, resample_from_p=False, no_bonus=False, accept_with_p=False,
                  off_by_one=False, no_stop=False, no_generator=False, never_accept=False):
    """A verifier written apart from the engine's (one uniform per draft, drawn as it goes), with
    switches that each make one classic mistake."""
    def verify(draft_tokens, draft_probs, target_probs, generator=None):
        n, vocab = len(draft_tokens), target_probs.shape[1]
        gen = None if no_generator else generator
        p_all = target_probs.double()
        q_all = (draft_probs.double() if draft_probs is not None
                 else torch.nn.functional.one_hot(torch.tensor(draft_tokens, dtype=torch.long), vocab).double())
        out = []
        for i, x in enumerate(draft_tokens):
            p, q = p_all[i + 1 if off_by_one else i], q_all[i]
            u = float(torch.rand((), generator=gen, dtype=torch.float64))
            if argmax_agreement:  # "the draft and the target agree": keep the sampled draft
                keep = int(q.argmax()) == int(p.argmax())
            else:
                keep = not never_accept and (u < p[x] if accept_with_p else u * q[x] < p[x])
            if keep:
                out.append(x)
                continue
            residual = p if resample_from_p or argmax_agreement else (p - q).clamp(min=0)
            out.append(int(torch.multinomial(residual if residual.sum() > 0 else p, 1, generator=gen)))
            if not no_stop:
                return out
        if not no_bonus:
            out.append(int(torch.multinomial(p_all[n], 1, generator=gen)))
        return out

    return verify


def failure_pvalue(failure: str) -> float:
    """The chi-square p-value a statistical failure reports."""
    import re

    m = re.search(r"chi-square p (?:= (\S+),|< 1e-300)", failure)
    assert m, failure
    return float(m.group(1)) if m.group(1) else 0.0


def test_rejection_check_passes_the_engines_own_and_a_second_implementation(capsys):
    from minivllm.spec_decode.rejection_sampler import rejection_sample

    for verify in (rejection_sample, make_verifier()):
        result = checks.check_rejection_sampler(verify)
        assert_passes(result, "check_rejection_sampler", capsys)


DISTRIBUTION = ("draft_probs=q (a draft model), q = [[0.25, 0.2, 0.2, 0.15, 0.1, 0.1], [0.3, 0.05, 0.05, 0.4, 0.1, "
                "0.1]]: over 4,000 verifications of 2 drafts, ")
GREEDY_ALL_KEPT = ("greedy target (one-hot rows on [2, 3, 0, 5]), drafts [2, 3, 0], draft_probs one-hot on the drafts "
                   "(a greedy draft model): expected [2, 3, 0, 5], got ")


@pytest.mark.parametrize("flaw,words", [
    # right on greedy targets, so only the statistics catch them
    ("argmax_agreement", DISTRIBUTION + "the first emitted token does not follow the target's p"),
    ("accept_with_p", DISTRIBUTION + "the first emitted token does not follow the target's p"),
    ("resample_from_p", DISTRIBUTION + "the first emitted token does not follow the target's p"),
    # wrong on greedy targets already
    ("no_bonus", GREEDY_ALL_KEPT + "[2, 3, 0]: a draft equal to the target's argmax is kept"),
    ("off_by_one", GREEDY_ALL_KEPT + "[3]: a draft equal to the target's argmax is kept"),
    ("never_accept", GREEDY_ALL_KEPT + "[2]: a draft equal to the target's argmax is kept"),
    ("no_stop", "greedy target (one-hot rows on [2, 3, 0, 5]), drafts [2, 4, 0], draft_probs one-hot on the drafts (a "
                "greedy draft model): verify() returned [2, 3, 0, 5], whose token 1 is not draft 1 (4)"),
    # which case shows it first depends on torch's global random state
    ("no_generator", "two runs with generators seeded alike returned"),
])
def test_rejection_check_rejects_a_flawed_verifier(flaw, words, capsys):
    result = checks.check_rejection_sampler(make_verifier(**{flaw: True}))
    assert not result
    assert result.failure.startswith(words) or (flaw == "no_generator" and words in result.failure), result.failure
    if result.failure.startswith(DISTRIBUTION):
        assert failure_pvalue(result.failure) < 1e-6
    assert capsys.readouterr().out.splitlines()[-1].startswith("FAIL  check_rejection_sampler: ")


def test_rejection_check_names_a_token_outside_the_residual():
    words = (r"Also: drafts \[\d, \d\] on the stage's fixed p and q, draft_probs=q \(a draft model\): after "
             r"rejecting draft \d \(\d\), verify\(\) emitted token \d, where p = .* the residual max\(0, p - q\) "
             "gives it probability 0")
    with pytest.raises(checks.CheckFailed, match=words):
        verify_checks._stage_verify_distribution(make_verifier(resample_from_p=True))


@pytest.mark.parametrize("flaw", ["no_bonus", "off_by_one", "never_accept"])
def test_the_statistical_stage_alone_rejects_the_greedy_mistakes(flaw):
    """Not only the greedy cases: the chi-square stage on its own catches these too."""
    with pytest.raises(checks.CheckFailed, match="does not follow the target's p") as e:
        verify_checks._stage_verify_distribution(make_verifier(**{flaw: True}))
    assert failure_pvalue(str(e.value)) < 1e-6


@pytest.mark.parametrize("returned,words", [
    (lambda d, q, p, g: torch.tensor(d + [0]), "verify() returned Tensor; return a list of Python ints"),
    (lambda d, q, p, g: [torch.tensor(0)], "verify() returned a list holding Tensor; return a list of Python ints"),
    (lambda d, q, p, g: [], "verify() returned [], 0 tokens for 3 drafts"),
    (lambda d, q, p, g: d + [6], "verify() returned [2, 3, 0, 6]: token 6 is outside the vocabulary [0, 6)"),
    (lambda d, q, p, g: {}[0], "verify() raised KeyError: 0"),
])
def test_rejection_check_reports_bad_return_values(returned, words):
    result = checks.check_rejection_sampler(returned, verbose=False)
    assert not result and words in result.failure, result.failure


def test_rejection_check_reports_engine_failures(monkeypatch):
    def broken(draft_tokens, draft_probs, target_probs, generator=None):
        raise RuntimeError("boom")

    # the engine samples every token through verify(), the one after the prompt too (nothing drafted)

    engine = r"^inside the engine \(draft_model, k=3\)"
    with pytest.raises(checks.CheckFailed, match=engine + r": drafts \[\], draft_probs=None \(a one-hot "
                                                          r"proposer\): verify\(\) raised RuntimeError: boom"):
        verify_checks._stage_verify_engine(broken)
    # a verifier that never accepts rejects a draft with p = q = 1 (greedy): a token the residual excludes
    words = r": drafts \[\d+(, \d+)*\], draft_probs=q \(a draft model\): after rejecting draft 0 \((\d+)\), verify\(\) "
    with pytest.raises(checks.CheckFailed, match=engine + words + r"emitted token \2, where p = 1 and q = 1"):
        verify_checks._stage_verify_engine(make_verifier(never_accept=True))
    monkeypatch.setattr(verify_checks, "_outside_support", lambda *args: None)  # then the acceptance count catches it
    with pytest.raises(checks.CheckFailed, match=engine + r", greedy: your verify accepted none of the \d+ drafts"):
        verify_checks._stage_verify_engine(make_verifier(never_accept=True))
    result = checks.check_rejection_sampler("verify", verbose=False)
    assert result.failure.startswith("verify='verify' must be a function"), result.failure


# ---- the row-parallel check tells right from wrong (exercise 08) ------------------------------------
# Module-level functions: the check sends the forward's source to its two processes.
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minivllm.distributed.parallel_state import tensor_parallel_group  # noqa: E402


def contiguous_shard(x, rank, world_size):
    k = x.shape[-1] // world_size
    return x[..., rank * k:(rank + 1) * k]


def strided_shard(x, rank, world_size):
    """Every world_size-th feature: the right size, but not the columns the rank's weight holds."""
    return x[..., rank::world_size]


def forward_without_all_reduce(self, x):
    return F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)


def forward_with_bias_on_every_rank(self, x):
    y = F.linear(x, self.weight, self.bias)
    dist.all_reduce(y, group=tensor_parallel_group())
    return y


def forward_reducing_on_rank_0_only(self, x):
    y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
    if self.tp_rank == 0:
        dist.all_reduce(y, group=tensor_parallel_group())
    return y


def forward_using_a_notebook_name(self, x):
    return helper(x)  # noqa: F821


@pytest.mark.parametrize("forward,shard,words", [
    (forward_without_all_reduce, contiguous_shard,
     "missing all-reduce: 1 token, 8 -> 4 features, no bias: rank 0 never called dist.all_reduce"),
    (forward_with_bias_on_every_rank, contiguous_shard,
     "bias added on every rank: 5 tokens, 16 -> 12 features, with bias: the output holds the bias 2 times"),
    (forward_without_all_reduce, strided_shard,
     "wrong shard slicing: 1 token, 8 -> 4 features, no bias: input_shard(x, rank=0, world_size=2) is not "
     "input features 0-3"),
    (forward_reducing_on_rank_0_only, contiguous_shard,
     "1 token, 8 -> 4 features, no bias: rank 0 was still waiting in a collective when rank 1 had finished"),
    (forward_using_a_notebook_name, contiguous_shard,
     "1 token, 8 -> 4 features, no bias: rank 0: your forward raised NameError: name 'helper' is not defined "
     "(the check runs your function from its source alone"),
])
def test_row_parallel_check_rejects_a_flawed_layer(forward, shard, words, capsys):
    result = checks.check_row_parallel_linear(forward, shard)
    assert_fails_with(result, words, "check_row_parallel_linear", capsys)


# Each flawed detokenizer breaks one rule of exercise 11.
class DecodesEachTokenAlone(IncrementalDetokenizer):
    def add(self, token_id):
        self.token_ids.append(token_id)
        new = self._decode([token_id])
        self.text += new
        return new


class NeverWaits(IncrementalDetokenizer):
    def add(self, token_id):  # no check for an unfinished character
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset:])
        new = full[len(prefix):]
        self.text += new
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new


class NeverMovesTheWindow(IncrementalDetokenizer):
    def add(self, token_id):
        self.token_ids.append(token_id)
        full = self._decode(self.token_ids[self.prefix_offset:])
        if full.endswith("\ufffd"):
            return ""
        self.text += full
        return full


class ForgetsTheText(IncrementalDetokenizer):
    def add(self, token_id):
        text = self.text
        new = super().add(token_id)
        self.text = text
        return new


@pytest.mark.parametrize("flawed,words", [
    (DecodesEachTokenAlone, "after token 2 of 'naïve café, déjà vu', add returned '\ufffd': U+FFFD is half a character"),
    (NeverWaits, "after token 2 of 'naïve café, déjà vu', add returned '\ufffd'"),
    (NeverMovesTheWindow, "after token 1 of 'naïve café, déjà vu' the text is 'nna', but decoding the first 2"),
    (ForgetsTheText, "after token 0 of 'naïve café, déjà vu' the text is ''"),
    (str, "<class 'str'> is not a subclass of IncrementalDetokenizer"),
])
def test_detokenizer_check_rejects_a_flawed_detokenizer(flawed, words, capsys):
    result = checks.check_detokenizer(flawed)
    assert_fails_with(result, words, "the incremental detokenizer", capsys)


def test_the_engine_refuses_a_detokenizer_class_that_is_not_one(tmp_path):
    from minivllm.models.tiny import save_tiny_checkpoint

    with pytest.raises(ValueError, match="detokenizer_class=<class 'dict'> must be a subclass"):
        LLM(save_tiny_checkpoint(str(tmp_path)), detokenizer_class=dict)


# ---- the SLO-search check tells right from wrong (exercise 09) --------------------------------------
def make_rate_search(linear=False, return_bad=False, skip_high=False, skip_low=False, coarse=False,
                     floor_division=False, zero_for_none=False, return_midpoint=False):
    """Bisection on the rate, with switches that each make one classic mistake."""
    def search(meets_slo, low, high, tol):
        if linear:  # vLLM's auto_tune.sh walks the rate one step at a time
            rate, best = low, None
            while rate <= high and meets_slo(rate):
                best, rate = rate, rate + tol
            return best
        if not skip_low and not meets_slo(low):
            return 0 if zero_for_none else None
        if not skip_high and meets_slo(high):
            return high
        good, bad = low, high
        while bad - good > (2 * tol if coarse else tol):
            mid = (good + bad) // 2 if floor_division else (good + bad) / 2
            if meets_slo(mid):
                good = mid
            else:
                bad = mid
        if return_midpoint:
            return (good + bad) / 2
        return bad if return_bad else good

    return search


SLO_CASE = "meets_slo(rate) = rate <= {}, bracket (1, 100), tol 0.5: "


@pytest.mark.parametrize("flaw,words", [
    ("linear", SLO_CASE.format(37.3) + "the answer is right, but your search used 74 calls of meets_slo: the check "
               "allows 11"),
    ("return_bad", SLO_CASE.format(37.3) + "you returned 37.3516, a rate that misses the SLO"),
    ("skip_high", SLO_CASE.format(100) + "you returned 99.6133, but even the highest rate, 100, meets the SLO: "
                  "return high"),
    ("skip_low", SLO_CASE.format(0.5) + "you returned 1, but even the lowest rate, 1, misses the SLO: return None"),
    ("coarse", SLO_CASE.format(37.3) + "you returned 36.5781, more than tol = 0.5 below the threshold, 37.3"),
    ("floor_division", SLO_CASE.format(37.3) + "your search called meets_slo 1000 times without returning"),
    ("zero_for_none", SLO_CASE.format(0.5) + "you returned 0, but even the lowest rate, 1, misses the SLO: return "
                      "None (your search used 1 call of meets_slo)"),
    ("return_midpoint", "meets_slo(rate) = rate <= 2.345, bracket (0.25, 3), tol 0.01: you returned 2.34741, a rate "
                        "that misses the SLO"),
])
def test_09_slo_search_check_rejects_a_flawed_search(flaw, words, capsys):
    result = checks.check_slo_search(make_rate_search(**{flaw: True}))
    assert_fails_with(result, words, "the SLO-aware rate search", capsys)


@pytest.mark.parametrize("returned,words", [
    (lambda meets_slo, low, high, tol: "7", "max_sustainable_rate returned '7': return a rate (a number) or None"),
    (lambda meets_slo, low, high, tol: meets_slo(0) and None, "your search called meets_slo(0), outside the bracket"),
    (lambda meets_slo, low, high, tol: {}[0], "max_sustainable_rate raised KeyError(0)"),
])
def test_09_slo_search_check_reports_bad_searches(returned, words):
    result = checks.check_slo_search(returned, verbose=False)
    assert not result and words in result.failure, result.failure
    assert not checks.check_slo_search(42, verbose=False).passed


def test_09_slo_search_reference_is_the_last_rate_before_the_first_miss():
    """A simulated p99 may dip back under its target above the limit: the sweep ignores that."""
    met = {1: True, 2: True, 3: False, 4: True, 5: True}
    assert slo_checks.reference_rate(list(met), met.__getitem__) == 2
    assert slo_checks.reference_rate([1, 2], lambda rate: False) is None
    assert slo_checks.reference_rate([1, 2], lambda rate: True) == 2
    assert [slo_checks.max_calls(*b) for b in ((4, 132, 4), (0.5, 8.5, 0.5), (1, 2, 4))] == [8, 7, 3]
    for case in slo_checks.SIM_CASES + slo_checks.EDGE_CASES:
        grid = case.grid()
        assert grid[0] == case.low and grid[-1] == case.high and len(grid) <= 33


def test_09_slo_search_simulator_failures_show_the_p99s():
    """On the simulator (where no rate of the bracket meets the SLO), a search that never probes low
    is told so, with the p99 latencies at its rate."""
    case = slo_checks.EDGE_CASES[1]
    with pytest.raises(checks.CheckFailed) as e:
        slo_checks._check_sim_case(make_rate_search(skip_low=True), case)
    words = (r"^rag \(200 requests, Llama-3.1-8B on one H100-SXM, max_num_batched_tokens=8192, max_num_seqs=64\), "
             r"p99 TTFT <= 500 ms and TPOT <= 25 ms, bracket \(5, 8.5\) req/s, tol 0.5: you returned 5, but even the "
             r"lowest rate, 5, misses the SLO: return None \(your search used \d+ calls of meets_slo\); at 5 req/s "
             r"p99 TTFT [\d,]+ ms, TPOT [\d.]+ ms \(misses\)$")
    assert re.match(words, str(e.value)), str(e.value)


# ---- the radix-tree check (exercise 12) tells right from wrong ----------------------------------------
# Each flawed tree is the engine's own RadixBlockManager with one rule of exercise 12 broken.
class BreadthFirstMatch(RadixBlockManager):
    """A second correct match: breadth first (a queue, not a stack); ties may go to other blocks."""

    def find_cached_prefix(self, seq):
        if not self.enable_prefix_caching or not seq.reads_prefix_cache:
            return []
        best, best_len, queue = self.root, 0, deque([(self.root, 0)])
        while queue:
            node, depth = queue.popleft()
            want = self._wanted(seq, depth)
            for child in node.children.get(want[0], ()) if want else ():
                n = self.served_tokens(child, want)
                if n == self.block_size:
                    queue.append((child, depth + n))
                if depth + n > best_len:
                    best, best_len = child, depth + n
        path = []
        while best is not self.root:
            path.append(best.block_id)
            best = best.parent
        return path[::-1]


class WholeBlocksOnly(RadixBlockManager):
    """Matches whole blocks only, as the hash cache does: never a partly matched block."""

    def find_cached_prefix(self, seq):
        path = super().find_cached_prefix(seq)
        return path[:-1] if path and self.cached_prefix_tokens(seq, path) % self.block_size else path


class CopiesUnreadyTokens(RadixBlockManager):
    """Lets a copy read tokens the step being scheduled writes (num_ready ignored)."""

    def served_tokens(self, node, want):
        have = self.blocks[node.block_id].token_ids
        return self.block_size if len(want) == self.block_size and have == want else common_prefix_len(have, want)


class FirstChildOnly(RadixBlockManager):
    """Follows only the first child filed under the next token."""

    def find_cached_prefix(self, seq):
        if not self.enable_prefix_caching or not seq.reads_prefix_cache:
            return []
        node, depth, path = self.root, 0, []
        while True:
            want = self._wanted(seq, depth)
            kids = node.children.get(want[0], ()) if want else ()
            if not kids:
                return path
            n = self.served_tokens(kids[0], want)
            if n:
                path.append(kids[0].block_id)
            if n < self.block_size:
                return path
            node, depth = kids[0], depth + n


class ServesTheLastToken(RadixBlockManager):
    def _wanted(self, seq, depth):
        return tuple(seq.token_ids[depth:min(depth + self.block_size, seq.num_tokens)])


class HangsEveryNodeFromTheRoot(RadixBlockManager):
    def add_node(self, block_id, parent_id, first_token):
        super().add_node(block_id, None, first_token)


class FilesUnderTheWrongToken(RadixBlockManager):
    def add_node(self, block_id, parent_id, first_token):
        super().add_node(block_id, parent_id, first_token + 1)


class RegistersTokensTwice(RadixBlockManager):
    """Does not skip the tokens a block already holds (speculative decoding registers twice)."""

    def insert(self, seq, start, stop):
        bs, table = self.block_size, seq.block_table
        for i in range(start // bs, -(-stop // bs)):
            lo, hi = max(start, i * bs), min(stop, (i + 1) * bs)
            if not self.blocks[table[i]].token_ids:
                self.add_node(table[i], table[i - 1] if i else None, seq.token_ids[lo])
            self.extend_node(table, i, tuple(seq.token_ids[lo:hi]))


def test_radix_tree_check_passes_the_engines_own_and_a_breadth_first_match(capsys):
    for cls in (RadixBlockManager, BreadthFirstMatch):
        result = checks.check_radix_tree(cls)
        assert_passes(result, "check_radix_tree", capsys)


def test_radix_tree_workloads_reach_every_path():
    refs = [radix_checks.reference_run(s) for s in radix_checks.RT_SEEDS]
    for attr in ("num_hits", "num_copies", "num_evictions", "num_preemptions"):
        assert sum(getattr(r, attr) for r in refs) > 5, attr
    assert all(r.output_tokens.keys() == {a.request_id for a in r.arrivals} for r in refs)


@pytest.mark.parametrize("flawed,words", [
    (WholeBlocksOnly, "workload 0, step 3: the scheduler ran request s0-5 on tokens 0-6 with your tree, on tokens 1-6 "
                      "with the reference: the prefix cache served it 0 tokens with your tree, 1 with the reference"),
    (CopiesUnreadyTokens, "workload 0, step 1: the scheduler ran request s0-1 on tokens 18-22 with your tree, on tokens "
                          "16-20 with the reference: the prefix cache served it 18 tokens"),
    (FirstChildOnly, "workload 0, step 2: the scheduler ran request s0-2 on tokens 18-21 with your tree, on tokens 20-21"),
    (ServesTheLastToken, "workload 1, step 2: the engine raised ValueError: num_new_tokens=0 must be in [1, 0] for "
                         "request 's1-2': your match served every token of a request, but its last token must run"),
    (HangsEveryNodeFromTheRoot, "workload 0, after step 1: the invariant check failed: request s0-0's logical block 1 "
                                "(block 1) hangs under another block than the one before it"),
    (FilesUnderTheWrongToken, "workload 0, after step 1: the invariant check failed: block 0 is unreachable"),
    (RegistersTokensTwice, re.compile(r"workload \d+, after step \d+: the invariant check failed: request s\d+-\d+'s "
                                      r"logical block \d+ \(block \d+\) records tokens \[[\d, ]+\], but the request's computed "
                                      r"tokens there are \[[\d, ]+\]")),
    (BlockManager, "BlockManager does not subclass RadixBlockManager"),
])
def test_radix_tree_check_rejects_a_flawed_tree(flawed, words, capsys):
    result = checks.check_radix_tree(flawed)
    assert_fails_with(result, words, "check_radix_tree", capsys)


def test_radix_tree_check_names_the_learners_method():
    class Raises(RadixBlockManager):
        def add_node(self, block_id, parent_id, first_token):
            raise KeyError(block_id)

    result = checks.check_radix_tree(Raises, verbose=False)
    assert result.failure == "workload 0, step 1: add_node() raised KeyError: 0", result.failure


# ---- the KV receiver check tells right from wrong (exercise 10) -------------------------------------
# Module-level functions: the check rebuilds the receiver from their source, as the decode process does.
from minivllm.disagg.scheduler_side import KVLoad, slots_of  # noqa: E402


def plan_right(self, request_id, num_prompt_tokens, num_cached_tokens, block_table, block_size):
    first, end = num_cached_tokens, num_prompt_tokens
    slots = [block_table[p // block_size] * block_size + p % block_size for p in range(first, end)]
    return KVLoad(request_id, end, first, slots, tuple(block_table[first // block_size:-(-end // block_size)]))


def plan_asking_for_cached_positions(self, request_id, num_prompt_tokens, num_cached_tokens, block_table, block_size):
    end = num_prompt_tokens
    slots = [block_table[p // block_size] * block_size + p % block_size for p in range(end)]
    return KVLoad(request_id, end, 0, slots, tuple(block_table[:-(-end // block_size)]))


def plan_with_positions_as_slots(self, request_id, num_prompt_tokens, num_cached_tokens, block_table, block_size):
    first, end = num_cached_tokens, num_prompt_tokens
    return KVLoad(request_id, end, first, list(range(first, end)),
                  tuple(block_table[first // block_size:-(-end // block_size)]))


def plan_with_contiguous_blocks(self, request_id, num_prompt_tokens, num_cached_tokens, block_table, block_size):
    first, end = num_cached_tokens, num_prompt_tokens
    start = block_table[first // block_size] * block_size + first % block_size
    return KVLoad(request_id, end, first, list(range(start, start + end - first)),
                  tuple(block_table[first // block_size:-(-end // block_size)]))


def plan_with_every_block(self, request_id, num_prompt_tokens, num_cached_tokens, block_table, block_size):
    first, end = num_cached_tokens, num_prompt_tokens
    slots = [block_table[p // block_size] * block_size + p % block_size for p in range(first, end)]
    return KVLoad(request_id, end, first, slots, tuple(block_table[first // block_size:]))


def plan_using_a_notebook_name(self, request_id, num_prompt_tokens, num_cached_tokens, block_table, block_size):
    first, end = num_cached_tokens, num_prompt_tokens
    return KVLoad(request_id, end, first, slots_of(block_table, first, end, block_size),
                  tuple(block_table[first // block_size:-(-end // block_size)]))


def load_right(self, load):
    _, num_layers, _, heads, dim = self.kv_cache.shape
    buf = torch.empty(2, len(load.slots), heads, dim, dtype=self.kv_cache.dtype, device=self.link_device)
    index = torch.tensor(load.slots, dtype=torch.long, device=self.kv_cache.device)
    for layer in range(num_layers):
        self.recv_layer(buf)
        self.kv_cache[:, layer, index] = buf.to(self.kv_cache.device)
    return num_layers * buf.numel() * buf.element_size()


def load_k_only(self, load):
    _, num_layers, _, heads, dim = self.kv_cache.shape
    buf = torch.empty(len(load.slots), heads, dim, dtype=self.kv_cache.dtype)
    for layer in range(num_layers):
        self.recv_layer(buf)
        self.kv_cache[0, layer, torch.tensor(load.slots)] = buf
    return num_layers * buf.numel() * buf.element_size()


def load_into_a_copy(self, load):
    _, num_layers, _, heads, dim = self.kv_cache.shape
    buf = torch.empty(2, len(load.slots), heads, dim, dtype=self.kv_cache.dtype)
    index = torch.tensor(load.slots)
    for layer in range(num_layers):
        self.recv_layer(buf)
        self.kv_cache[:, layer, index].copy_(buf)
    return num_layers * buf.numel() * buf.element_size()


def load_into_layer_0(self, load):
    _, num_layers, _, heads, dim = self.kv_cache.shape
    buf = torch.empty(2, len(load.slots), heads, dim, dtype=self.kv_cache.dtype)
    index = torch.tensor(load.slots)
    for layer in range(num_layers):
        self.recv_layer(buf)
        self.kv_cache[:, 0, index] = buf
    return num_layers * buf.numel() * buf.element_size()


def load_k_and_v_swapped(self, load):
    _, num_layers, _, heads, dim = self.kv_cache.shape
    buf = torch.empty(2, len(load.slots), heads, dim, dtype=self.kv_cache.dtype)
    index = torch.tensor(load.slots)
    for layer in range(num_layers):
        self.recv_layer(buf)
        self.kv_cache[:, layer, index] = buf.flip(0)
    return num_layers * buf.numel() * buf.element_size()


def load_counting_one_layer(self, load):
    _, num_layers, _, heads, dim = self.kv_cache.shape
    buf = torch.empty(2, len(load.slots), heads, dim, dtype=self.kv_cache.dtype)
    index = torch.tensor(load.slots)
    for layer in range(num_layers):
        self.recv_layer(buf)
        self.kv_cache[:, layer, index] = buf
    return buf.numel() * buf.element_size()


@pytest.mark.parametrize("plan,load,words", [
    (plan_asking_for_cached_positions, load_right,
     "prefix-cache hits asked for again: a 19-token prompt in blocks [5, 2, 9] of 8, the first 8 tokens cached on "
     "the decode side: plan_load('3', 19, 8, [5, 2, 9], 8) asks for positions from 0"),
    (plan_with_positions_as_slots, load_right,
     "positions used as slots: a 19-token prompt in blocks [5, 2, 9] of 8, nothing cached: plan_load('3', 19, 0, "
     "[5, 2, 9], 8) gives position p slot p"),
    (plan_with_contiguous_blocks, load_right,
     "contiguous blocks assumed: a 19-token prompt in blocks [5, 2, 9] of 8, nothing cached: plan_load('3', 19, 0, "
     "[5, 2, 9], 8) counts on from slot 40, but the next block is 2, not 6"),
    (plan_with_every_block, load_right,
     "a 16-token prompt filling blocks [3, 1] of 8, a third block [4] allocated for the next token: plan_load('3', "
     "16, 0, [3, 1, 4], 8) has block_ids (3, 1, 4): block 4 was allocated for the next token"),
    (plan_using_a_notebook_name, load_right,
     "a 19-token prompt in blocks [5, 2, 9] of 8, nothing cached: plan_load raised NameError: name 'slots_of' is "
     "not defined (the check runs your functions from their source"),
    (plan_right, load_k_only,
     "a 10-token prompt in blocks [7, 2, 10], nothing cached: recv_layer got a buffer of shape [10, 2, 4]; the "
     "prefill instance sends one tensor of shape [2, 10, 2, 4] per layer. K and V of a layer travel together"),
    (plan_right, load_into_a_copy,
     "a 10-token prompt in blocks [7, 2, 10], nothing cached: the cache is unchanged after load_layers"),
    (plan_right, load_into_layer_0,
     "a 10-token prompt in blocks [7, 2, 10], nothing cached: every layer's K/V landed in layer 0"),
    (plan_right, load_k_and_v_swapped, "a 10-token prompt in blocks [7, 2, 10], nothing cached: K and V swapped"),
    (plan_right, load_counting_one_layer,
     "a 10-token prompt in blocks [7, 2, 10], nothing cached: load_layers returned 640; it received 3 layers x 2 "
     "(K, V) x 10 positions x 2 KV heads x 4 x 4 bytes = 1920 bytes"),
])
def test_10_kv_receiver_check_rejects_a_flawed_receiver(plan, load, words, capsys):
    result = checks.check_kv_receiver(plan, load)
    assert_fails_with(result, words, "check_kv_receiver", capsys)


def test_10_kv_receiver_check_refuses_what_is_not_a_function():
    result = checks.check_kv_receiver(lambda self, *a: None, load_right, verbose=False)
    assert not result and "plan_load=" in result.failure and "must be a function defined with `def`" in result.failure
