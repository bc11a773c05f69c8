"""Every bad input is refused with an error naming the field and value, before any work starts, and
the same engine keeps serving afterwards."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from minivllm import LLM, SamplingParams

GOOD = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("qwen3"), max_model_len=128, block_size=16, num_kv_blocks=6)


def still_serves(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and not engine.requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}, "the engine"], GOOD, use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in out] == ["length", "length"]


@pytest.mark.parametrize("prompts,params,match", [
    ([{"prompt_token_ids": list(range(1, 130))}], GOOD, r"129 tokens is longer than max_model_len=128"),
    ([{"prompt_token_ids": []}], GOOD, r"prompt=.* is empty"),
    ([""], GOOD, r"prompt='' is empty"),
    ([{"prompt_token_ids": [1, 10_000]}], GOOD, r"prompt_token_ids contain \[10000\]"),
    ([{"prompt_token_ids": [1, -1]}], GOOD, r"prompt_token_ids contain \[-1\]"),
    ([{"prompt_token_ids": "abc"}], GOOD, r"prompt_token_ids='abc'"),
    ([42], GOOD, r"prompt=42 must be"),
    ([], GOOD, r"prompts=\[\]"),
    (["a", "b"], [GOOD], r"sampling_params has 2 entries for 3 prompts"),
    (["a"], [GOOD, GOOD], r"sampling_params has 3 entries for 2 prompts"),
    (["a"], ["greedy"], r"sampling_params='greedy' must be a SamplingParams"),
    # 50 prompt tokens + 60 new tokens need 7 blocks of 16; the cache has 6
    ([{"prompt_token_ids": [5] * 50}], SamplingParams(max_tokens=60), r"needs 7 KV blocks, but the cache has only 6"),
    ([{"prompt_token_ids": [5]}], SamplingParams(stop_token_ids=[999_999]), r"stop_token_ids=\[999999\]"),
])
def test_bad_requests_raise_before_any_work(llm, prompts, params, match):
    """A good prompt goes first in the batch: it must not run either."""
    steps = len(llm.llm_engine.trace)
    good_first = [{"prompt_token_ids": [7, 8]}] + list(prompts)
    good_params = [GOOD] + params if isinstance(params, list) else params
    with pytest.raises(ValueError, match=match):
        llm.generate(good_first if prompts else prompts, good_params if prompts else params, use_tqdm=False)
    assert len(llm.llm_engine.trace) == steps, "no step may run for a batch with a bad request"
    still_serves(llm)


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0), ("top_k", -2), ("min_p", 1.2),
    ("max_tokens", 0), ("max_tokens", 2.5), ("stop", [""]), ("stop_token_ids", [-3]), ("seed", "x")])
def test_sampling_params_out_of_range(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}={value!r}".replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=0), r"block_size=0"), (dict(max_num_seqs=-1), r"max_num_seqs=-1"),
    (dict(max_num_batched_tokens=0), r"max_num_batched_tokens=0"), (dict(num_kv_blocks=0), r"num_kv_blocks=0"),
    (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization=1.5"), (dict(dtype="int8"), r"dtype='int8'"),
    (dict(device="tpu"), r"device='tpu'"), (dict(batching_policy="lifo"), r"batching_policy='lifo'"),
    (dict(max_model_len=10**6), r"max_model_len=1000000 exceeds the model's max_position_embeddings=1024"),
    (dict(enable_chunked_prefill=False, max_num_batched_tokens=64),
     r"max_num_batched_tokens=64 is smaller than max_model_len=1024"),
    (dict(kv_cache_memory=10), r"kv_cache_memory=10 leaves 10 bytes"),
    (dict(blocksize=4), r"unknown engine argument\(s\) blocksize; LLM accepts dtype, "),
    (dict(attention_backend="cuda"), r"attention_backend='cuda'"),
    (dict(enable_prefix_caching="yes"), r"enable_prefix_caching='yes' must be a bool"),
    (dict(sampler="greedy"), r"sampler='greedy' must be a function"),
    (dict(rejection_sampler=lambda *a: [0]), r"rejection_sampler is used only with speculative_config"),
    (dict(row_parallel_linear_class=int), r"row_parallel_linear_class=<class 'int'> must be a subclass"),
    (dict(row_parallel_linear_class=torch.nn.Linear), r"must be a subclass of minivllm.layers.linear.RowParallelLinear"),
])
def test_bad_engine_settings(checkpoint, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(checkpoint("qwen3"), **kwargs)


def test_missing_folder_and_unsupported_architecture(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LLM(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLM(str(tmp_path))
    folder = tmp_path / "gpt2ish"
    shutil.copytree(checkpoint("qwen3"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"architectures=\['GPT2LMHeadModel'\] is not supported"):
        LLM(str(folder))


def test_engine_add_request_refuses_a_duplicate_id(llm):
    engine = llm.llm_engine
    engine.add_request("dup", {"prompt_token_ids": [1, 2]}, GOOD)
    with pytest.raises(ValueError, match=r"request_id='dup' is already in use"):
        engine.add_request("dup", {"prompt_token_ids": [3]}, GOOD)
    done = []
    while engine.has_unfinished_requests():
        done += engine.step()
    assert [o.request_id for o in done] == ["dup"]
    still_serves(llm)
