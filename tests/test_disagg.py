"""Disaggregated prefill/decode (minivllm.disagg): a prefill and a decode instance, each an LLMEngine in
its own process, joined over gloo, give the single engine's greedy outputs (Qwen3, Qwen2, Llama tiny
checkpoints and the course model; prompts that cut blocks; prefix-cache hits on either side; a decode
instance too small for every request at once); each transfer moves the formula's bytes; bad pairs are
refused before any process starts; a killed instance fails fast."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from minivllm import LLM, SamplingParams
from minivllm.core.block_manager import BlockManager
from minivllm.core.scheduler import Scheduler
from minivllm.core.sequence import Sequence
from minivllm.disagg import DisaggregatedLLM, InstanceError, kv_bytes_per_token
from minivllm.disagg.scheduler_side import DecodeAdmission, kv_load
from minivllm.disagg.worker_side import KVReceiver

BLOCK_SIZE = 4
PROMPT_LENS = [3, 17, 40, 9, 8]  # all but 8 end inside a block
MAX_TOKENS = [6, 4, 8, 5, 1]  # the last ends on the prefill instance, with its first token
HANG_GUARD_S = 30  # not a performance bound: a front end waiting on a dead instance never returns
KV = dict(block_size=BLOCK_SIZE, kv_cache_memory=1 << 20)


def batch(vocab: int, lens=PROMPT_LENS, max_tokens=MAX_TOKENS, salt: int = 0):
    prompts = [{"prompt_token_ids": [(7 * i + 3 * n + salt) % (vocab - 1) + 1 for i in range(n)]} for n in lens]
    return prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]


def shared_prefix_batch(first_batch_prompts):
    """Prompts that start with the first batch's 40-token prompt (cached on both sides by now)."""
    head = first_batch_prompts[2]["prompt_token_ids"]
    prompts = [{"prompt_token_ids": head[:37] + [5, 6, 7]}, {"prompt_token_ids": head + [9, 10, 11]}]
    return prompts, [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)] * 2


def single_engine(folder: str, prompts, params, **args):
    with LLM(folder, **{**KV, **args}) as llm:
        return llm.generate(prompts, params, use_tqdm=False)


def assert_same(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.prompt_token_ids == b.prompt_token_ids
        ca, cb = a.outputs[0], b.outputs[0]
        assert (ca.token_ids, ca.text, ca.finish_reason) == (cb.token_ids, cb.text, cb.finish_reason)


def assert_transfers_match_formula(llm: DisaggregatedLLM, outputs, mc) -> None:
    """One transfer per request that went on to decode; bytes = positions sent x 2 x layers x KV heads x
    head size x 4 (float32); the positions sent are those the decode side's prefix cache lacked."""
    per_token = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * 4
    assert llm.kv_bytes_per_token == per_token == kv_bytes_per_token(
        mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, 4)
    by_id = {t.request_id: t for t in outputs.transfers}
    assert len(by_id) == len(outputs.transfers)
    went_on = {o.request_id for o in outputs if len(o.outputs[0].token_ids) > 1}
    assert set(by_id) == went_on
    for out in outputs:
        t = by_id.get(out.request_id)
        if t is None:
            continue
        n = len(out.prompt_token_ids)
        assert (t.num_prompt_tokens, t.num_tokens) == (n, n - t.first_position)
        assert t.num_bytes == t.num_tokens * per_token
        assert t.num_blocks == -(-n // BLOCK_SIZE) - t.first_position // BLOCK_SIZE
        assert t.num_layers == mc.num_hidden_layers and t.seconds >= 0


@pytest.fixture(scope="module")
def model_config(checkpoint):
    from minivllm.config.model import ModelConfig
    return lambda arch: ModelConfig.from_folder(checkpoint(arch))


# the three architectures, each with the prefix cache on both sides, or off on one of them
PAIRS = {"qwen3": {}, "qwen2": {"decode": {"enable_prefix_caching": False}},
         "llama": {"prefill": {"enable_prefix_caching": False}}}


@pytest.mark.parametrize("arch", list(PAIRS))
def test_greedy_output_equals_the_single_engine(arch, checkpoint, model_config):
    folder, mc = checkpoint(arch), model_config(arch)
    prompts, params = batch(mc.vocab_size)
    more, more_params = shared_prefix_batch(prompts)
    want = single_engine(folder, prompts, params)
    want_more = single_engine(folder, more, more_params)
    with DisaggregatedLLM(folder, **KV, **PAIRS[arch]) as llm:
        got = llm.generate(prompts, params, use_tqdm=False)
        got_more = llm.generate(more, more_params, use_tqdm=False)
        prefill_alive = llm.processes["prefill"].is_alive()
    assert prefill_alive and not llm.processes["prefill"].is_alive(), "closing ends both processes"
    assert_same(got, want)
    assert_same(got_more, want_more)
    for outputs in (got, got_more):
        assert_transfers_match_formula(llm, outputs, mc)
    assert llm.transfers == got.transfers + got_more.transfers
    assert all(t.first_position == 0 for t in got.transfers), "nothing cached on the decode side yet"
    # the second batch shares 36 and 40 tokens with a prompt of the first
    prefill_hits = [o.metrics.num_cached_tokens for o in got_more]
    decode_hits = [t.first_position for t in got_more.transfers]
    prefill_caches = PAIRS[arch].get("prefill") is None
    decode_caches = PAIRS[arch].get("decode") is None
    assert prefill_hits == ([36, 40] if prefill_caches else [0, 0])
    assert decode_hits == ([36, 40] if decode_caches else [0, 0])
    # the traces: the prefill instance samples only first tokens; the decode instance runs no prompt
    assert not any(c.is_prefill for r in llm.decode_trace for c in r.chunks)
    assert sum(c.sampled_token is not None for r in llm.prefill_trace for c in r.chunks) == len(got) + len(got_more)


def test_course_model_greedy_equals_the_single_engine_and_its_transfers():
    from minivllm.config.model import ModelConfig
    from minivllm.course import model_path

    folder = model_path("target")
    prompts = ["def fib(n):", "The engine schedules every request in small steps while the cache keeps",
               "import torch\n\nclass Attention(", "def fib(n):\n    if n < 2:"]
    params = SamplingParams(temperature=0, max_tokens=12)
    want = single_engine(folder, prompts, params, block_size=16)
    with DisaggregatedLLM(folder, block_size=16, kv_cache_memory=16 << 20) as llm:
        got = llm.generate(prompts, params, use_tqdm=False)
    assert_same(got, want)
    mc = ModelConfig.from_folder(folder)
    assert llm.kv_bytes_per_token == 2 * 6 * 2 * 64 * 4 == 6144
    for out, t in zip([o for o in got if len(o.outputs[0].token_ids) > 1], got.transfers):
        assert t.num_bytes == (len(out.prompt_token_ids) - t.first_position) * 6144
    assert mc.num_hidden_layers == 6


@pytest.fixture(scope="module")
def small_decode(checkpoint):
    """A decode instance with room for about one request at a time (12 blocks of 4 tokens); closed by the
    last test that uses it (a killed peer)."""
    llm = DisaggregatedLLM(checkpoint("qwen3"), **KV, decode={"num_kv_blocks": 14})
    yield llm
    llm.close()


def test_a_full_decode_instance_makes_requests_wait_and_loses_none(checkpoint, model_config, small_decode):
    mc = model_config("qwen3")
    prompts, params = batch(mc.vocab_size, lens=[30, 33, 25, 28], max_tokens=[8, 6, 8, 7], salt=1)
    want = single_engine(checkpoint("qwen3"), prompts, params)
    got = small_decode.generate(prompts, params, use_tqdm=False)
    assert_same(got, want)
    assert_transfers_match_formula(small_decode, got, mc)
    assert small_decode.num_blocks["decode"] == 14
    # never more than one request held blocks on the decode side: the others waited for theirs
    assert max(r.num_running for r in small_decode.decode_trace) == 1
    starts = sorted(t.start_time for t in got.transfers)
    finishes = sorted(r.end_time for r in small_decode.decode_trace if r.finished)
    assert all(a < b for a, b in zip(finishes, starts[1:])), "each transfer waited for a request to finish"


def test_requests_either_instance_refuses_raise_before_any_work(small_decode, model_config):
    vocab = model_config("qwen3").vocab_size
    steps = len(small_decode.prefill_trace), len(small_decode.decode_trace)
    with pytest.raises(ValueError, match=r"needs 15 KV blocks, but the cache has only 14"):
        small_decode.generate([{"prompt_token_ids": [1] * 50}, {"prompt_token_ids": [1] * 4}],
                              SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    with pytest.raises(ValueError, match=r"outside the vocabulary"):
        small_decode.generate({"prompt_token_ids": [vocab]}, use_tqdm=False)
    with pytest.raises(ValueError, match="n=2 is not supported"):
        small_decode.generate("hello", SamplingParams(n=2), use_tqdm=False)
    assert (len(small_decode.prefill_trace), len(small_decode.decode_trace)) == steps


def test_a_killed_decode_instance_fails_fast_with_a_clear_error(small_decode):
    prompts = [{"prompt_token_ids": [3] * 20}] * 2
    decode, prefill = small_decode.processes["decode"], small_decode.processes["prefill"]
    os.kill(decode.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(InstanceError, match=r"the decode instance \(pid \d+\) died \(exit code -9\)"):
        small_decode.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert time.monotonic() - start < HANG_GUARD_S
    assert not prefill.is_alive(), "the surviving instance is shut down too"
    with pytest.raises(InstanceError, match="shut down"):
        small_decode.generate(prompts, use_tqdm=False)


def test_a_killed_prefill_instance_fails_fast(checkpoint):
    """Killed between two calls: the next call names it (not its peer, whose K/V link it broke) and
    shuts the decode instance down."""
    with DisaggregatedLLM(checkpoint("qwen3"), **KV) as llm:
        prefill = llm.processes["prefill"]
        llm.generate("warm up", SamplingParams(max_tokens=2), use_tqdm=False)
        os.kill(prefill.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(InstanceError, match=r"the prefill instance \(pid \d+\) died \(exit code -9\)"):
            llm.generate(["a b c"] * 3, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        assert time.monotonic() - start < HANG_GUARD_S
        assert not llm.processes["decode"].is_alive()


def test_bad_pairs_are_refused_before_any_process_starts(checkpoint, monkeypatch):
    def no_spawn(self):
        raise AssertionError("a process was started")

    monkeypatch.setattr(mp.get_context("spawn").Process, "start", no_spawn)
    folder = checkpoint("qwen3")
    refused = [
        (dict(decode={"model": checkpoint("llama")}), "model differs: prefill model=.*, decode model="),
        (dict(decode={"block_size": 8}), "block_size differs: prefill block_size=4, decode block_size=8"),
        (dict(prefill={"dtype": "bfloat16"}), "dtype differs: prefill dtype=torch.bfloat16, decode dtype=torch.float32"),
        (dict(decode={"max_model_len": 64}), "max_model_len differs: prefill max_model_len=1024, decode max_model_len=64"),
        (dict(prefill={"tensor_parallel_size": 2}), "prefill tensor_parallel_size=2"),
        (dict(decode={"data_parallel_size": 2}), "decode data_parallel_size=2"),
        (dict(decode={"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}),
         "decode speculative_config="),
        (dict(kv_transfer_backend="nccl"), "kv_transfer_backend='nccl' needs the two instances on two different GPUs"),
        (dict(kv_transfer_backend="mpi"), "kv_transfer_backend='mpi' must be one of"),
        (dict(timeout_s=0), "timeout_s=0 must be a number > 0"),
        (dict(decode=["block_size", 8]), r"decode=\['block_size', 8\] must be a dict"),
        (dict(decode={"block_sise": 8}), "block_sise"),
        (dict(kv_receiver_class=int), "kv_receiver_class=<class 'int'> must be a subclass of .*KVReceiver"),
        (dict(kv_receiver_class=type("Local", (KVReceiver,), {"__qualname__": "f.<locals>.Local"})),
         "defined in .* inside a function: the decode process imports it by module and name"),
    ]
    for args, message in refused:
        with pytest.raises(ValueError, match=message):
            DisaggregatedLLM(folder, **{**KV, **args})


def test_decode_admission_waits_in_order_for_blocks():
    """The scheduler side alone: arrivals are admitted first come first served while their prompt and
    next token fit; local prefix-cache hits are not asked for."""
    bm = BlockManager(6, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    admission = DecodeAdmission(sched)
    params = SamplingParams(temperature=0, max_tokens=4)

    def arrival(rid, prompt, first):
        seq = Sequence(rid, prompt, params)
        seq.token_ids.append(first)
        return seq

    def start(seq, cached):
        sched.receive_transferred(seq, cached, seq.num_prompt_tokens)
        sched.start_transferred(seq)

    a, b, c = arrival("0", list(range(1, 11)), 50), arrival("1", list(range(20, 30)), 51), arrival("2", [7], 52)
    for seq in (a, b, c):
        admission.add(seq)
    loads = admission.admit(start)  # a and b: 10 tokens + 1 -> 3 blocks each, all there is
    assert [(ld.request_id, ld.first_position, len(ld.slots)) for ld in loads] == [("0", 0, 10), ("1", 0, 10)]
    assert [s.request_id for s in admission.pending] == ["2"], "c waits: no block left"
    assert a.num_computed_tokens == 10 and a in sched.running
    sched.finish(a, "stop")  # its blocks go back, cached: a later arrival with its prefix hits them
    sched.finish(b, "stop")
    d = arrival("3", list(range(1, 9)) + [70], 53)
    admission.add(d)
    loads = admission.admit(start)
    assert [(ld.request_id, ld.first_position, len(ld.slots)) for ld in loads] == [("2", 0, 1), ("3", 8, 1)]
    bm.check_invariants(sched.running)


class OneByteMoreReceiver(KVReceiver):
    """The stock receive side, with a miscount that shows in the records: proof the decode process ran it."""

    def plan_load(self, request_id, num_prompt_tokens, num_cached_tokens, block_table, block_size):
        return super().plan_load(request_id, num_prompt_tokens, num_cached_tokens, block_table, block_size)

    def load_layers(self, load) -> int:
        return super().load_layers(load) + 1


def test_a_receiver_subclass_runs_in_the_decode_process(checkpoint, model_config):
    """Exercise 10's door: ``kv_receiver_class`` replaces the decode side's plan and per-layer receive."""
    folder, mc = checkpoint("qwen3"), model_config("qwen3")
    prompts, params = batch(mc.vocab_size)
    want = single_engine(folder, prompts, params)
    with DisaggregatedLLM(folder, **KV, kv_receiver_class=OneByteMoreReceiver) as llm:
        got = llm.generate(prompts, params, use_tqdm=False)
        per_token = llm.kv_bytes_per_token
    assert_same(got, want)
    assert got.transfers and all(t.num_bytes == t.num_tokens * per_token + 1 for t in got.transfers)


def test_kv_load_asks_only_for_what_the_local_cache_lacks():
    load = kv_load("7", 19, 8, [5, 2, 9], 8)  # 19 tokens in blocks 5, 2, 9; block 5 was a cache hit
    assert (load.first_position, load.block_ids) == (8, (2, 9))
    assert load.slots == [16 + i for i in range(8)] + [72, 73, 74]
