"""The radix-tree prefix cache (`minivllm.core.radix_block_manager`) against independent references:
hand-worked lookups, copies and evictions on drawn trees; the real engine's greedy tokens equal to
the hash cache's and to no caching's (prompts that part mid-block, a multi-turn follow-up,
preemption, speculative decoding, worker processes) while it serves more tokens from the cache; the
model runner's K/V copy against a copy made by hand; the Cinema's replay against the live cache; the
benchmark's counts against counts worked by hand; bad settings refused by name. The hypothesis
property tests of both caches are in tests/test_scheduling_properties.py."""
from __future__ import annotations

import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.config.cache import CacheConfig
from minivllm.core.block_manager import BlockManager, KVCopy
from minivllm.core.radix_block_manager import RadixBlockManager
from minivllm.core.sequence import Sequence

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def admit(bm, request_id: str, tokens: list[int]) -> Sequence:
    """What the scheduler does for a waiting request: look up, allocate, compute the rest."""
    seq = Sequence(request_id, tokens, SamplingParams())
    bm.allocate(seq, bm.find_cached_prefix(seq))
    compute(bm, seq)
    return seq


def compute(bm, seq: Sequence) -> None:
    """Slots for the rest of ``seq``'s tokens, computed in this step (as `Scheduler.update` counts)."""
    bm.append_slots(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens


def finish_step(bm, seqs: list[Sequence]) -> list[KVCopy]:
    """The end of a step: the scheduler takes the copies (which closes the step), the model runs."""
    copies = bm.take_kv_copies()
    bm.check_invariants(seqs)
    return copies


def children(bm: RadixBlockManager, block_id: int) -> list[int]:
    node = bm.root if block_id == -1 else bm.nodes[block_id]
    return sorted(c.block_id for group in node.children.values() for c in group)


# ---- hand-worked lookups ---------------------------------------------------------------------------
def test_match_at_token_granularity_copies_the_partly_matched_block():
    """Blocks of 4. After request a (10 tokens) the tree is

        root ── 0 [1 2 3 4] ── 1 [5 6 7 8] ── 2 [9 10]

    b = [1 2 3 4 | 5 6 99 98] parts from a inside block 1: it shares block 0 and gets a fresh block
    (3, the next free) with a copy of block 1's first 2 slots; the hash cache would serve 4 tokens.

        root ── 0 [1 2 3 4] ─┬─ 1 [5 6 7 8] ── 2 [9 10]
                             └─ 3 [5 6 99 98]           (siblings that share a leading run)

    c = a's 10 tokens and one more hits 10: blocks 0 and 1 shared, block 2's 2 slots copied."""
    bm = RadixBlockManager(8, 4)
    a = admit(bm, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert a.block_table == [0, 1, 2] and finish_step(bm, [a]) == []
    assert children(bm, -1) == [0] and children(bm, 0) == [1] and children(bm, 1) == [2] and children(bm, 2) == []

    b = Sequence("b", [1, 2, 3, 4, 5, 6, 99, 98], SamplingParams())
    cached = bm.find_cached_prefix(b)
    assert cached == [0, 1] and bm.cached_prefix_tokens(b, cached) == 6
    assert bm.can_allocate(b, 2, cached)
    bm.allocate(b, cached)
    assert b.block_table == [0, 3] and b.num_computed_tokens == 6
    assert bm.blocks[0].ref_count == 2 and bm.blocks[1].ref_count == 1 and bm.blocks[3].ref_count == 1
    compute(bm, b)
    assert finish_step(bm, [a, b]) == [KVCopy(src_block=1, dst_block=3, num_tokens=2)]
    assert children(bm, 0) == [1, 3] and bm.blocks[3].token_ids == (5, 6, 99, 98)
    assert bm.drain_events().cache_hits == [0]  # block 0 is shared; block 1 is only read

    c = Sequence("c", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], SamplingParams())
    cached = bm.find_cached_prefix(c)
    assert cached == [0, 1, 2] and bm.cached_prefix_tokens(c, cached) == 10
    bm.allocate(c, cached)
    compute(bm, c)
    assert c.block_table == [0, 1, 4]
    assert finish_step(bm, [a, b, c]) == [KVCopy(2, 4, 2)]

    hash_bm = BlockManager(8, 4)  # the reference: whole blocks only
    admit(hash_bm, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert hash_bm.find_cached_prefix(Sequence("b", [1, 2, 3, 4, 5, 6, 99, 98], SamplingParams())) == [0]


def test_a_copy_reads_only_what_an_earlier_step_computed_and_never_the_last_token():
    """a registers [1 2 3 4 | 5 6] in the step being scheduled: b, scheduled in that same step, may
    share the full block 0 (attention reads it after the step writes it) but may not copy block 1
    (the copy runs before the step's forward pass). Next step it may. A request equal to a's prefix
    [1 2 3 4 5 6] hits 5 tokens, not 6: its last token must run to give the next token's logits."""
    bm = RadixBlockManager(8, 4)
    a = admit(bm, "a", [1, 2, 3, 4, 5, 6])
    b = Sequence("b", [1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams())
    assert bm.cached_prefix_tokens(b, bm.find_cached_prefix(b)) == 4
    finish_step(bm, [a])
    assert bm.cached_prefix_tokens(b, bm.find_cached_prefix(b)) == 6
    same = Sequence("same", [1, 2, 3, 4, 5, 6], SamplingParams())
    assert bm.cached_prefix_tokens(same, bm.find_cached_prefix(same)) == 5
    one = Sequence("one", [1], SamplingParams())
    assert bm.find_cached_prefix(one) == []
    logprobs = Sequence("lp", [1, 2, 3, 4, 5, 6, 7], SamplingParams(prompt_logprobs=1))
    assert bm.find_cached_prefix(logprobs) == []  # it computes its whole prompt (vLLM's rule)


def test_a_preempted_request_gets_its_half_filled_tail_back():
    """Blocks of 4: a computed its 6 tokens, then was preempted (freed). Re-admitted, it hits all but
    its last token: block 0 shared, and the first slot of its half-filled tail, block 1, copied. The
    hash cache would serve 4 tokens."""
    bm = RadixBlockManager(4, 4)
    a = admit(bm, "a", [1, 2, 3, 4, 5, 6])
    finish_step(bm, [a])
    bm.free(a)
    finish_step(bm, [])
    cached = bm.find_cached_prefix(a)
    assert cached == [0, 1] and bm.cached_prefix_tokens(a, cached) == 5
    bm.allocate(a, cached)
    compute(bm, a)
    # the free queue was 2, 3 (never used), then a's blocks tail first: 1, 0; block 0 was revived
    assert a.block_table == [0, 2] and finish_step(bm, [a]) == [KVCopy(1, 2, 1)]


# ---- eviction ---------------------------------------------------------------------------------------
def test_eviction_is_leaf_first_and_least_recently_used():
    """Blocks of 2, 6 blocks. a = [1 2 3 4 5], b = [1 2 3 9 9] (b copies block 1's first slot):

        root ── 0 [1 2] ─┬─ 1 [3 4] ── 2 [5]
                         └─ 3 [3 9] ── 4 [9]

    a ends (2, 1 freed; 0 still b's), b ends (4, 3, 0): the free queue is 5 (never used), 2, 1, 4, 3,
    0. c = [1 2 3 4 6] then reuses the path 0 -> 1, and takes 5 for its last token, so block 5 joins
    the tree as 1's second child; c ends (5, 1, 0). Taking every block now evicts the least recently
    used leaves first: 2, then b's branch 4, 3, then c's 5, 1, and the root's child 0 last."""
    bm = RadixBlockManager(6, 2)
    a = admit(bm, "a", [1, 2, 3, 4, 5])
    finish_step(bm, [a])
    b = admit(bm, "b", [1, 2, 3, 9, 9])
    assert b.block_table == [0, 3, 4] and finish_step(bm, [a, b]) == [KVCopy(1, 3, 1)]
    bm.free(a)
    bm.free(b)
    finish_step(bm, [])
    assert list(bm.free_queue) == [5, 2, 1, 4, 3, 0]
    c = admit(bm, "c", [1, 2, 3, 4, 6])
    assert c.block_table == [0, 1, 5]
    finish_step(bm, [c])
    assert children(bm, 1) == [2, 5]
    bm.free(c)
    finish_step(bm, [])
    bm.drain_events()
    assert bm.pop_free_blocks(6) == [2, 4, 3, 5, 1, 0]
    assert bm.drain_events().evicted == [2, 4, 3, 5, 1, 0]
    assert not bm.nodes and children(bm, -1) == [] and bm.num_cached_free_blocks == 0


def test_evicting_the_source_of_a_copy_in_the_same_step_is_safe():
    """One free block left, and it is the very block to copy from: the copy goes into it (a copy onto
    itself), and the tree holds the new request's tokens there instead."""
    bm = RadixBlockManager(2, 4)
    a = admit(bm, "a", [1, 2, 3, 4, 5, 6])
    finish_step(bm, [a])
    bm.free(a)
    b = admit(bm, "b", [1, 2, 3, 4, 5, 7])  # shares block 0, copies block 1's [5]: block 1 is the only free one
    assert b.block_table == [0, 1] and finish_step(bm, [b]) == [KVCopy(1, 1, 1)]
    assert bm.blocks[1].token_ids == (5, 7)


# ---- the real engine -------------------------------------------------------------------------------
BASE = [(11 * i + 5) % 380 + 1 for i in range(64)]


def parted_prompts() -> list[list[int]]:
    """Prompts that share a prefix of BASE cut mid-block (blocks of 4), then go their own way."""
    return [BASE[:cut] + [(cut * 7 + j) % 380 + 1 for j in range(tail)]
            for cut, tail in ((13, 5), (13, 9), (22, 3), (30, 6), (7, 10), (41, 2), (30, 11))]


def run_waves(llm: LLM, waves: list[list[list[int]]], max_tokens: int) -> tuple[list[list[int]], int, int]:
    """Each wave's prompts generated together after the previous wave finished (greedy), stepping
    the engine by hand and checking the block manager after every step. The next wave's prompts
    may extend the previous outputs: a wave is a function of them. Returns the outputs, the prompt
    tokens served from the cache, and the K/V copies made."""
    engine, made = llm.llm_engine, []
    copy_kv = engine.executor.copy_kv
    engine.executor.copy_kv = lambda copies: (made.extend(copies), copy_kv(copies))
    outputs, cached = [], 0
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for w, wave in enumerate(waves):
        prompts = wave(outputs) if callable(wave) else wave
        for i, prompt in enumerate(prompts):
            engine.add_request(f"w{w}-{i}", {"prompt_token_ids": prompt}, params)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                done[out.request_id] = out
            engine.block_manager.check_invariants(list(engine.requests.values()))
        outputs += [done[f"w{w}-{i}"].outputs[0].token_ids for i in range(len(prompts))]
        cached += sum(done[f"w{w}-{i}"].metrics.num_cached_tokens for i in range(len(prompts)))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return outputs, cached, len(made)


def follow_up(outputs: list[list[int]]) -> list[list[int]]:
    """A second turn: each first-wave prompt, its answer, and a new user message of 3 tokens."""
    return [p + o + [7, 8, 9] for p, o in zip(parted_prompts(), outputs)]


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint("qwen3")


@pytest.mark.parametrize("settings", [
    dict(max_num_seqs=2),  # later prompts are admitted after earlier ones computed the shared prefix
    dict(max_num_seqs=8, num_kv_blocks=20, max_num_batched_tokens=16),  # tight: preemption
    dict(max_num_seqs=2, speculative_config=NGRAM),
], ids=["roomy", "preempting", "ngram"])
def test_greedy_tokens_equal_hash_and_no_caching(folder, settings):
    """The same waves (prompts parting mid-block, then their follow-ups) through the engine with no
    prefix cache, the hash cache and the radix cache: the same greedy tokens; the radix cache serves
    more tokens from the cache than the hash cache, and copies blocks to do it."""
    waves = [parted_prompts(), follow_up]
    runs = {}
    for name, cache in (("none", dict(enable_prefix_caching=False)), ("hash", {}), ("radix", dict(prefix_caching="radix"))):
        llm = LLM(folder, max_model_len=128, block_size=4, **cache, **settings)
        runs[name] = run_waves(llm, waves, max_tokens=6)
        if "num_kv_blocks" in settings:
            assert any(r.preempted for r in llm.llm_engine.trace), "the tight cache should preempt"
    assert runs["radix"][0] == runs["hash"][0] == runs["none"][0]
    assert runs["none"][1:] == (0, 0) and runs["hash"][2] == 0
    assert runs["radix"][1] > runs["hash"][1] and runs["radix"][2] > 0


def test_the_cinema_replays_what_the_radix_cache_held(checkpoint):
    """The Cinema (chapters 02, 03) drives the radix cache unchanged: every frame replayed from the
    trace is the live block manager's state after that step (the same reference as for the hash
    cache, `tests/test_lab_cinema.py`), through copies, preemption and eviction."""
    from minivllm.lab.cinema import replay
    from tests.test_lab_cinema import run_with_live_state

    llm = LLM(checkpoint("qwen3"), max_model_len=64, block_size=4, num_kv_blocks=14, max_num_batched_tokens=16,
              max_num_seqs=4, prefix_caching="radix")
    copies = []
    copy_kv = llm.llm_engine.executor.copy_kv
    llm.llm_engine.executor.copy_kv = lambda c: (copies.extend(c), copy_kv(c))
    prefix = [5, 6, 7, 8, 9, 10]  # ends mid-block
    trace, live = run_with_live_state(llm, [prefix + [20 + i] * (3 + 2 * i) for i in range(5)], max_tokens=10)
    more, live2 = run_with_live_state(llm, [prefix + [99] * 5, prefix + [20] * 4], max_tokens=2)
    frames = replay(trace)
    assert len(frames) == len(live + live2)
    for frame, state in zip(frames, live + live2):
        snap = frame.record.blocks
        assert dict(zip(snap.request_ids, zip(snap.block_tables, snap.num_tokens))) == state["tables"]
        assert frame.free_queue == state["free_queue"] and frame.cached_free == state["cached_free"]
        assert len(frame.cached_free) == frame.record.num_cached_free_blocks
    assert any(f.record.preempted for f in frames) and any(f.record.blocks_evicted for f in frames) and copies


def test_worker_processes_make_the_copies(folder):
    """Tensor parallel (two worker processes over gloo): the copies travel with the step and each rank
    makes them in its own KV heads; the tokens are the single process's with the hash cache."""
    waves = [parted_prompts(), follow_up]
    want = run_waves(LLM(folder, max_model_len=128, block_size=4, max_num_seqs=2), waves, max_tokens=6)
    with LLM(folder, max_model_len=128, block_size=4, max_num_seqs=2, prefix_caching="radix",
             tensor_parallel_size=2) as llm:
        got = run_waves(llm, waves, max_tokens=6)
    assert got[0] == want[0] and got[1] > want[1] and got[2] > 0


def test_llm_takes_prefix_caching_and_refuses_bad_values(folder):
    llm = LLM(folder, max_model_len=64, block_size=4, prefix_caching="radix")
    assert isinstance(llm.llm_engine.block_manager, RadixBlockManager)
    assert type(LLM(folder, max_model_len=64).llm_engine.block_manager) is BlockManager
    with pytest.raises(ValueError, match=r"prefix_caching='trie' must be one of \('hash', 'radix'\)"):
        LLM(folder, prefix_caching="trie")
    for bad in ("Radix", None, 1):
        with pytest.raises(ValueError, match=rf"prefix_caching={bad!r}"):
            CacheConfig(prefix_caching=bad)
    with pytest.raises(ValueError, match="num_blocks=0"):
        CacheConfig(prefix_caching="radix").make_block_manager(0)
    with pytest.raises(ValueError, match="block_size=0"):
        RadixBlockManager(4, 0)


def test_copy_kv_copies_every_layer_reading_before_writing(folder):
    """copy_kv against a copy made by hand on a clone: a chain in one call (block 1 -> 2 while block
    3 -> 1) must read block 1 before it is overwritten."""
    runner = LLM(folder, max_model_len=64, block_size=4, num_kv_blocks=4).llm_engine.executor
    runner.kv_cache.copy_(torch.randn_like(runner.kv_cache))
    before = runner.kv_cache.clone()
    runner.copy_kv([KVCopy(1, 2, 3), KVCopy(3, 1, 2)])
    want = before.clone()
    want[:, :, 8:11] = before[:, :, 4:7]
    want[:, :, 4:6] = before[:, :, 12:14]
    assert torch.equal(runner.kv_cache, want)
    assert torch.equal(runner.attention_layers[1].k_cache, want[0, 1])  # the layers' views see it


# ---- the benchmark's numbers (chapter 12 calls `compare`) -----------------------------------------
def test_benchmark_counts_what_the_partly_matched_block_saves():
    """unaligned_prefix at small size, in the simulator's core: a 45-token document (2 blocks of 16
    and 13 tokens more) then a question, 3 waves of 6 requests. In wave 0 all 6 are admitted in one
    step: both caches share the document's 2 full blocks, the radix cache cannot copy the 13 tokens
    being computed in that step. From wave 1 on every request finds the whole document computed: the
    radix cache serves 45 tokens, the hash cache 32, so 2 x 6 x 13 = 156 prefill tokens fewer."""
    from minivllm.benchmarks.prefix_cache import compare

    c = compare("unaligned_prefix", driver="sim", size="small")
    assert c.prefill_saved == 2 * 6 * 13 and c.radix.kv_copies == 2 * 6 and c.hash.kv_copies == 0
    assert c.radix.cached_tokens - c.hash.cached_tokens == 156
    assert "unaligned_prefix (small, sim)" in c.table()


@pytest.mark.parametrize("workload", ["multi_turn", "few_shot", "branching"])
def test_benchmark_accounting_holds_on_every_workload(workload):
    """No preemption at the simulator's size: every prompt token is either served from the cache or
    prefilled (the trace's prefill chunks), and the radix cache never serves fewer."""
    from minivllm.benchmarks.prefix_cache import compare

    c = compare(workload, driver="sim", size="small")
    for run in (c.hash, c.radix):
        assert run.prefill_tokens == run.prompt_tokens - run.cached_tokens
        assert run.steps > 0 and run.bookkeeping_s > 0
    assert c.radix.prompt_tokens == c.hash.prompt_tokens and c.prefill_saved > 0 and c.radix.kv_copies > 0


def test_benchmark_refuses_bad_choices():
    from minivllm.benchmarks.prefix_cache import compare
    from minivllm.benchmarks.prefix_workloads import make_workload

    with pytest.raises(ValueError, match="workload='chat'"):
        compare("chat")
    with pytest.raises(ValueError, match="driver='gpu'"):
        compare("multi_turn", driver="gpu")
    with pytest.raises(ValueError, match="size='huge'"):
        make_workload("multi_turn", size="huge")
    with pytest.raises(ValueError, match="vocab_size=1"):
        make_workload("multi_turn", vocab_size=1)
