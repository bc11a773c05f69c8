"""The engine split over processes (gloo on the CPU): tensor, pipeline and data parallel give the same
greedy tokens as one process and as transformers; the step trace's collective counts equal the Megatron
formula; a dead worker fails fast; bad sizes are refused before any process starts."""
from __future__ import annotations

import gc
import math
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.config.engine import EngineConfig
from minivllm.distributed.layout import RankLayout
from minivllm.executor.multiproc import WorkerError
from minivllm.sim import Hardware, ModelSpec, ParallelLayout, plan_layout
from tests.reference import compare_greedy

PROMPT_LENS = [3, 17, 40, 9]
MAX_TOKENS = [6, 4, 8, 5]
HANG_GUARD_S = 60  # not a performance bound: a driver that waits on a dead worker never returns


def small_batch(vocab: int) -> tuple[list[list[int]], list[SamplingParams]]:
    prompts = [[(7 * i + 3 * n) % (vocab - 1) + 1 for i in range(n)] for n in PROMPT_LENS]
    return prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def worker_processes(llm: LLM) -> list:
    return llm.llm_engine.executor.processes


def assert_planner_agrees(engine, folder: str, tp: int, pp: int) -> None:
    """The planner's per-stage communication (calls and payload bytes of each collective) equals what
    every rank measured, step by step; the planner never sees the trace, only the step's sizes."""
    spec = ModelSpec.from_folder(folder)
    link = Hardware("link", 1e12, 1e12, {"fp32": 1e12}, interconnect_bandwidth=1e9)
    for record in engine.trace:
        if not record.chunks:
            continue
        sampled = sum(c.sampled_token is not None for c in record.chunks)
        plan = plan_layout(spec, link, ParallelLayout(tp=tp, pp=pp), dtype="fp32", context_len=16,
                           step_tokens=record.num_batched_tokens, sampled_tokens=sampled,
                           micro_batches=min(pp, len(record.chunks)))
        for rank in record.comm:
            measured = {c.op: (c.calls, c.bytes) for c in rank.collectives if c.op != "recv"}
            planned = {c.op: (c.calls_per_step, round(c.payload_bytes_per_step))
                       for c in plan.stage_communication[rank.pp_rank]}
            assert measured == planned, f"step {record.step}, rank {rank.rank}"


@pytest.fixture(scope="module")
def single(checkpoint):
    """The one-process engine's tokens on the small batch, and its KV block count."""
    folder = checkpoint("qwen3")
    with LLM(folder, kv_cache_memory=1 << 20) as llm:
        prompts, params = small_batch(llm.llm_engine.model_config.vocab_size)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return token_ids(outputs), llm.llm_engine.block_manager.num_blocks


@pytest.fixture(scope="module")
def tp_run(checkpoint):
    """A TP=2 run of the small batch with a small token budget, so that prefill chunks and decodes
    share steps; the LLM is closed before the tests look."""
    folder = checkpoint("qwen3")
    with LLM(folder, tensor_parallel_size=2, kv_cache_memory=1 << 20, max_num_batched_tokens=32) as llm:
        engine = llm.llm_engine
        prompts, params = small_batch(engine.model_config.vocab_size)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        processes = worker_processes(llm)
        assert len(processes) == 2 and all(p.is_alive() for p in processes)
    return outputs, engine, processes


def test_tensor_parallel_matches_single_process_and_transformers(checkpoint, reference, single, tp_run):
    folder = checkpoint("qwen3")
    outputs, engine, processes = tp_run
    prompts, _ = small_batch(engine.model_config.vocab_size)
    assert token_ids(outputs) == single[0]
    compare_greedy(outputs, prompts, MAX_TOKENS, reference(folder), max_ties=0)
    # each rank holds half the KV heads, so the same per-rank memory holds twice the blocks
    assert engine.block_manager.num_blocks == 2 * single[1]
    assert not any(p.is_alive() for p in processes), "closing the LLM ends its workers"


def test_tensor_parallel_collectives_match_the_megatron_formula(tp_run):
    """Per step and rank: one all-reduce after each o_proj and down_proj (2 per layer) plus one for the
    vocabulary-parallel embedding, each of tokens x hidden x dtype bytes; one all-gather of the LM
    head's logits, each rank contributing sampled rows x ceil(vocab / tp) x dtype bytes."""
    _, engine, _ = tp_run
    mc, trace, tp = engine.model_config, engine.trace, 2
    dtype_bytes = 4  # float32 on the CPU
    shard = math.ceil(mc.vocab_size / tp)
    decode_steps = [r for r in trace if r.chunks and r.num_prefill_tokens == 0]
    assert decode_steps and len(decode_steps) < len(trace), "the batch should give decode-only and prefill steps"
    for record in trace:
        tokens = record.num_batched_tokens
        sampled = sum(c.sampled_token is not None for c in record.chunks)
        assert [c.rank for c in record.comm] == list(range(tp))
        for rank in record.comm:
            assert rank.calls("all_reduce") == 2 * mc.num_hidden_layers + 1
            assert rank.bytes("all_reduce") == (2 * mc.num_hidden_layers + 1) * tokens * mc.hidden_size * dtype_bytes
            assert rank.calls("all_gather") == (1 if sampled else 0)
            assert rank.bytes("all_gather") == sampled * shard * dtype_bytes
            assert {c.op for c in rank.collectives} <= {"all_reduce", "all_gather"}
    assert_planner_agrees(engine, engine.config.model, tp, 1)


@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "tp2xpp2"])
def test_pipeline_parallel_matches_single_process_and_passes_hidden_states(tp, checkpoint, reference, single):
    """Two stages of one layer each. Per step: the first stage sends (hidden, residual) of every token,
    2 x tokens x hidden x dtype bytes in all, in one or two micro-batches; the second receives them.
    With TP inside each stage, the all-reduces stay within the stage: 2 per layer it holds, plus the
    embedding's on the first stage, per micro-batch."""
    folder = checkpoint("qwen3")
    with LLM(folder, pipeline_parallel_size=2, tensor_parallel_size=tp, kv_cache_memory=1 << 20) as llm:
        engine = llm.llm_engine
        prompts, params = small_batch(engine.model_config.vocab_size)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert token_ids(outputs) == single[0]
    compare_greedy(outputs, prompts, MAX_TOKENS, reference(folder), max_ties=0)
    assert engine.block_manager.num_blocks == 2 * tp * single[1], "a stage caches only its layers (and heads)"
    mc, row_bytes = engine.model_config, engine.model_config.hidden_size * 4
    in_flight = []
    for record in engine.trace:
        tokens = record.num_batched_tokens
        first, last = record.comm[:tp], record.comm[tp:]
        micro_batches = first[0].calls("send") // 2
        in_flight.append(micro_batches)
        for rank in first:
            assert (rank.pp_rank, rank.calls("send"), rank.bytes("send")) == (0, 2 * micro_batches, 2 * tokens * row_bytes)
            assert rank.calls("recv") == rank.calls("all_gather") == 0
        for rank in last:
            assert (rank.pp_rank, rank.calls("recv"), rank.bytes("recv")) == (1, 2 * micro_batches, 2 * tokens * row_bytes)
            assert rank.calls("send") == 0
        if tp > 1:
            for rank in first:
                assert rank.calls("all_reduce") == micro_batches * 3
                assert rank.bytes("all_reduce") == 3 * tokens * row_bytes
            for rank in last:
                assert rank.calls("all_reduce") == micro_batches * 2
                assert rank.bytes("all_reduce") == 2 * tokens * row_bytes
                sampled = sum(c.sampled_token is not None for c in record.chunks)
                assert rank.bytes("all_gather") == sampled * math.ceil(mc.vocab_size / tp) * 4
    assert set(in_flight) == {1, 2}, "steps with several requests run as two micro-batches in flight"
    assert_planner_agrees(engine, folder, tp, 2)


def test_worker_processes_apply_the_request_api_as_one_process_does(checkpoint):
    """Pipeline stages in two processes, two micro-batches in flight: penalties, bans, a grammar mask,
    logprobs and prompt logprobs, and ``n`` samples travel to the sampling rank and back, and give what
    one process gives (tokens exactly, logprobs to float32 rounding)."""
    from minivllm import StructuredOutputsParams

    folder = checkpoint("qwen3")
    prompts = [{"prompt_token_ids": p} for p in small_batch(384)[0]]
    params = [SamplingParams(temperature=0, max_tokens=6, repetition_penalty=1.4, logprobs=2, prompt_logprobs=1),
              SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=5, frequency_penalty=0.5, logit_bias={5: 3.0}),
              SamplingParams(temperature=0, max_tokens=8, min_tokens=8, logprobs=0,
                             structured_outputs=StructuredOutputsParams(regex="(the|block)( (the|block)){0,5}")),
              SamplingParams(temperature=0, max_tokens=5, presence_penalty=1.0, prompt_logprobs=3)]
    runs = []
    for sizes in ({}, {"pipeline_parallel_size": 2}):
        with LLM(folder, kv_cache_memory=1 << 20, **sizes) as llm:
            runs.append(llm.generate(prompts, params, use_tqdm=False))
    one, split = runs
    for a, b in zip(one, split):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        for ca, cb in zip(a.outputs, b.outputs):
            assert (ca.logprobs is None) == (cb.logprobs is None)
            for ra, rb in zip(ca.logprobs or [], cb.logprobs or []):
                assert ra.keys() == rb.keys()
                assert all(abs(ra[t].logprob - rb[t].logprob) < 1e-4 and ra[t].rank == rb[t].rank for t in ra)
        assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
        if a.prompt_logprobs is not None:
            assert len(a.prompt_logprobs) == len(a.prompt_token_ids) and a.prompt_logprobs[0] is None
            for ra, rb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
                assert ra.keys() == rb.keys() and all(abs(ra[t].logprob - rb[t].logprob) < 1e-4 for t in ra)
    assert len(one[1].outputs) == 2 and one[1].outputs[0].token_ids != one[1].outputs[1].token_ids


def test_killed_worker_fails_fast_with_a_clear_error(checkpoint):
    folder = checkpoint("qwen3")
    llm = LLM(folder, tensor_parallel_size=2)
    prompts, params = small_batch(llm.llm_engine.model_config.vocab_size)
    requests = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(requests[:1], params[:1], use_tqdm=False)
    processes = worker_processes(llm)
    os.kill(processes[1].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker rank 1 \(pid \d+\) died \(exit code -9\)"):
        llm.generate(requests, params, use_tqdm=False)
    assert time.monotonic() - start < HANG_GUARD_S
    assert not any(p.is_alive() for p in processes), "the surviving worker is shut down too"
    with pytest.raises(WorkerError, match="shut down"):
        llm.generate(requests[:1], params[:1], use_tqdm=False)


def test_data_parallel_replicas_route_and_keep_prompt_order(checkpoint, single):
    folder = checkpoint("qwen3")
    llm = LLM(folder, data_parallel_size=2, kv_cache_memory=1 << 20)
    prompts, params = small_batch(llm.llm_engine.model_config.vocab_size)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert token_ids(outputs) == single[0]
    # least outstanding tokens (prompt + max_tokens: 9, 21, 48, 14): 1st to replica 0, 2nd to the
    # idle replica 1, 3rd to replica 0 (9 < 21), 4th to replica 1 (21 < 9 + 48)
    served = [{c.request_id for r in replica.trace for c in r.chunks} for replica in llm.llm_engine.replicas]
    ids = [o.request_id for o in outputs]
    assert served == [{ids[0], ids[2]}, {ids[1], ids[3]}]
    processes = [p for replica in llm.llm_engine.replicas for p in replica.executor.processes]
    assert len(processes) == 2 and all(p.is_alive() for p in processes)
    del llm, outputs
    gc.collect()
    assert not any(p.is_alive() for p in processes), "garbage-collecting the LLM ends its workers"


def test_bad_sizes_raise_before_any_process_starts(checkpoint, monkeypatch):
    def no_spawn(self):
        raise AssertionError("a worker process was started")

    monkeypatch.setattr(mp.get_context("spawn").Process, "start", no_spawn)
    folder = checkpoint("qwen3")  # 4 query heads, 2 KV heads, 2 layers
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide num_attention_heads=4"):
        LLM(folder, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 does not divide num_key_value_heads=2"):
        LLM(folder, tensor_parallel_size=4)
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 is more stages than num_hidden_layers=2"):
        LLM(folder, pipeline_parallel_size=3)
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        with pytest.raises(ValueError, match=f"{name}=0"):
            LLM(folder, **{name: 0})
    with pytest.raises(ValueError, match="distributed_backend='mpi'"):
        LLM(folder, tensor_parallel_size=2, distributed_backend="mpi")
    with pytest.raises(ValueError, match="distributed_backend='nccl' needs CUDA"):
        LLM(folder, tensor_parallel_size=2, device="cpu", distributed_backend="nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="4 ranks, but only 2 CUDA devices are visible"):
        EngineConfig.from_args(folder, device="cuda", tensor_parallel_size=2, data_parallel_size=2)


@pytest.mark.parametrize("num_layers,pp", [(2, 2), (3, 2), (7, 3), (5, 4), (28, 4), (30, 8)])
def test_pipeline_stages_cover_the_layers_contiguously(num_layers, pp):
    stages = [list(RankLayout(0, 1, p, pp).stage_layers(num_layers)) for p in range(pp)]
    assert sum(stages, []) == list(range(num_layers))
    sizes = [len(s) for s in stages]
    assert max(sizes) - min(sizes) <= 1
    assert sizes[-1] == num_layers // pp, "the last stage (which also computes logits) never gets an extra layer"
