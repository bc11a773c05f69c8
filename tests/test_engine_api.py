"""The vLLM-shaped engine API: step-level control, aborts, stop conditions, metrics, the trace,
and the static batching baseline."""
from __future__ import annotations

import logging

import pytest

from minivllm import LLM, LLMEngine, SamplingParams
from minivllm.core.scheduler import Scheduler

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": list(range(1 + i, 1 + i + n))} for i, n in enumerate([3, 20, 45, 7, 90, 1])]


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("qwen3"), max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64)


def test_cache_size_is_logged(checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="minivllm"):
        LLM(checkpoint("qwen3"), max_model_len=128, block_size=16, num_kv_blocks=40)
    assert "KV cache: 40 blocks of 16 tokens = 640 tokens; maximum concurrency at max_model_len=128: 5.00x" in caplog.text


def test_step_by_step_with_an_abort(llm):
    reference = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    engine: LLMEngine = llm.llm_engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, GREEDY)
    finished = {}
    for _ in range(3):
        finished.update({o.request_id: o for o in engine.step()})
    aborted = engine.abort_request("r2")
    assert aborted[0].outputs[0].finish_reason == "abort"
    assert aborted[0].outputs[0].token_ids == reference[2].outputs[0].token_ids[:len(aborted[0].outputs[0].token_ids)]
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step()})
    assert sorted(finished) == sorted(f"r{i}" for i in range(6) if i != 2)
    for i in finished:
        assert finished[i].outputs[0].token_ids == reference[int(i[1:])].outputs[0].token_ids
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert engine.abort_request("no-such-request") == []


def test_stop_strings_and_stop_token_ids(llm):
    base = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    tokens, text = base.outputs[0].token_ids, base.outputs[0].text
    stop_token = tokens[5]
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_token],
                                                   ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_token
    assert out.token_ids == tokens[:tokens.index(stop_token) + 1]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, stop=[stop, "\x00never"],
                                                   ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)], "the text ends right before the stop string"
    assert out.token_ids == tokens[:len(out.token_ids)] and len(out.token_ids) < 20


def test_max_model_len_ends_a_request(llm):
    """Prompt plus output never exceed max_model_len tokens (as in vLLM)."""
    out = llm.generate({"prompt_token_ids": [3] * 250}, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                       use_tqdm=False)
    comp = out[0].outputs[0]
    assert comp.finish_reason == "length" and len(comp.token_ids) == 256 - 250


def test_metrics_and_trace_agree_with_the_outputs(llm):
    steps_before = len(llm.llm_engine.trace)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=True)
    trace = llm.llm_engine.trace[steps_before:]
    for o in outputs:
        m = o.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
        sampled = [c.sampled_token for r in trace for c in r.chunks
                   if c.request_id == o.request_id and c.sampled_token is not None]
        assert sampled == o.outputs[0].token_ids
        assert [f for r in trace for f in r.finished if f[0] == o.request_id] == [(o.request_id, "length")]
    assert all(r.num_batched_tokens <= 64 and r.num_running <= 4 for r in trace)
    allocated = sum(len(r.blocks_allocated) for r in trace) + sum(len(r.blocks_cache_hit) for r in trace)
    assert allocated >= sum(len(r.blocks_freed) for r in trace) > 0
    assert trace[-1].num_free_blocks == llm.llm_engine.block_manager.num_blocks


def test_a_failure_mid_generate_loses_no_request(llm, monkeypatch):
    """If a step raises (here, a simulated interrupt), generate aborts what it had added and the
    engine keeps serving."""
    engine = llm.llm_engine
    real_step, calls = engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert not engine.has_unfinished_requests() and not engine.requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert len(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == len(PROMPTS)


def test_static_batching_admits_only_between_batches(checkpoint, llm):
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    static = LLM(checkpoint("qwen3"), max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64,
                 batching_policy="static")
    assert isinstance(static.llm_engine.scheduler, Scheduler)
    outputs = static.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    active, decoding = set(), False
    for record in static.llm_engine.trace:
        for chunk in record.chunks:  # admission is decided before the step samples anything
            if chunk.request_id not in active:
                assert not decoding, f"step {record.step}: {chunk.request_id} joined a batch already decoding"
                active.add(chunk.request_id)
        decoding |= any(chunk.sampled_token is not None for chunk in record.chunks)
        active -= {rid for rid, _ in record.finished}
        decoding &= bool(active)
    batches = [r.step for r in static.llm_engine.trace if r.finished and r.num_running == 0]
    assert len(batches) >= 2, "six requests with max_num_seqs=4 need at least two batches"


# ---- the door for a learner's piece: engine arguments ---------------------------------------------
def test_a_plugged_sampler_and_row_parallel_layer_run_inside_the_engine(checkpoint, llm):
    from minivllm.layers.linear import RowParallelLinear

    sampled_rows, layer_calls = [], []

    def greedy(logits, params, generators, default_generator):
        sampled_rows.append(len(params))
        return logits.argmax(-1).tolist()

    class CountingRowParallelLinear(RowParallelLinear):
        def forward(self, x):
            layer_calls.append(x.shape[-1])
            return super().forward(x)

    stock = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    with LLM(checkpoint("qwen3"), max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, sampler=greedy,
             row_parallel_linear_class=CountingRowParallelLinear) as plugged:
        mine = [o.outputs[0].token_ids for o in plugged.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert mine == stock
    assert sum(sampled_rows) == len(PROMPTS) * GREEDY.max_tokens
    assert layer_calls and set(layer_calls) == {64, 128}  # o_proj (4 heads of 16) and down_proj (MLP 128)


def test_a_piece_defined_in_a_notebook_is_refused_before_workers_start(checkpoint):
    in_main = eval("lambda logits, params, generators, default_generator: []", {"__name__": "__main__"})
    assert in_main.__module__ == "__main__"  # as a function defined in a notebook cell is
    with pytest.raises(ValueError, match=r"sampler=.* cannot be sent to the worker processes .*defined in __main__"):
        LLM(checkpoint("qwen3"), tensor_parallel_size=2, sampler=in_main)
