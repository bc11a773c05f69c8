"""Greedy tokens of the engine equal transformers' on tiny Qwen3, Qwen2 and Llama checkpoints,
under every scheduling and caching mode that changes how the KV cache is filled."""
from __future__ import annotations

import random

import pytest
import torch

from minivllm import LLM, SamplingParams
from minivllm.core.scheduler import ScheduledChunk
from minivllm.core.sequence import Sequence
from tests.reference import compare_greedy

ARCHS = ["qwen3", "qwen2", "llama"]
PROMPT_LENS = [1, 2, 3, 7, 15, 16, 17, 31, 33, 64, 100, 128, 150, 200, 257, 300, 5, 48]


def mixed_prompts(vocab: int, seed: int = 0, long_outputs: bool = False) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, vocab) for _ in range(n)] for n in PROMPT_LENS]
    choices = [20, 40, 64] if long_outputs else [1, 2, 5, 9, 16, 24]
    max_tokens = [rng.choice(choices) for _ in prompts]
    return prompts, max_tokens


def shared_prefix_prompts(vocab: int, seed: int = 1) -> tuple[list[list[int]], list[int]]:
    """Prompts that share long prefixes: a 150-token system prompt, some whole duplicates, and a
    second family branching off a shorter shared stem mid-block."""
    rng = random.Random(seed)
    system = [rng.randrange(1, vocab) for _ in range(150)]
    stem = system[:37]
    prompts = [system + [rng.randrange(1, vocab) for _ in range(rng.randrange(1, 40))] for _ in range(8)]
    prompts += [list(prompts[0]), list(prompts[1]), list(system)]
    prompts += [stem + [rng.randrange(1, vocab) for _ in range(rng.randrange(1, 60))] for _ in range(5)]
    max_tokens = [rng.choice([3, 8, 20]) for _ in prompts]
    return prompts, max_tokens


ENGINE_MODES = {
    "block16": dict(block_size=16),
    "block1": dict(block_size=1),
    "chunked-small-budget": dict(block_size=16, max_num_batched_tokens=48, max_num_seqs=6),
    "no-chunked-prefill": dict(block_size=16, enable_chunked_prefill=False, max_num_batched_tokens=512),
    # room for the longest request alone (300 + 64 tokens), not for the crowd: decodes must preempt
    "preemption": dict(block_size=8, num_kv_blocks=48, max_num_seqs=16),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", list(ENGINE_MODES))
def test_greedy_matches_transformers(arch, mode, checkpoint, reference):
    folder = checkpoint(arch)
    llm = LLM(folder, max_model_len=512, **ENGINE_MODES[mode])
    prompts, max_tokens = mixed_prompts(llm.llm_engine.model_config.vocab_size, long_outputs=mode == "preemption")
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    compare_greedy(outputs, prompts, max_tokens, reference(folder))
    trace = llm.llm_engine.trace
    if mode == "preemption":
        assert sum(len(r.preempted) for r in trace) > 0, "the small cache should have forced a preemption"
    if mode == "chunked-small-budget":
        assert max(r.num_batched_tokens for r in trace) <= 48
        assert any(r.num_prefill_tokens and r.num_decode_tokens for r in trace), "no mixed prefill+decode step"
    if mode == "no-chunked-prefill":
        assert not any(r.num_prefill_tokens and r.num_decode_tokens for r in trace)
    assert llm.llm_engine.block_manager.num_free_blocks == llm.llm_engine.block_manager.num_blocks


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("block_size", [4, 16])
def test_prefix_caching_matches_transformers(arch, block_size, checkpoint, reference):
    folder = checkpoint(arch)
    llm = LLM(folder, max_model_len=512, block_size=block_size, max_num_seqs=4, max_num_batched_tokens=96)
    prompts, max_tokens = shared_prefix_prompts(llm.llm_engine.model_config.vocab_size)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    compare_greedy(outputs, prompts, max_tokens, reference(folder))
    cached = [o.metrics.num_cached_tokens for o in outputs]
    assert cached[0] == 0, "the first request finds an empty cache"
    assert all(c % block_size == 0 for c in cached), "only full blocks are served from the cache"
    # the duplicate of prompt 0 arrives after prompt 0 is done: all but its last partial block hit
    dup = prompts[8]
    assert cached[8] == (len(dup) - 1) // block_size * block_size
    assert sum(cached) >= 5 * 150 // block_size * block_size
    # a second run of the same prompts is served mostly from the cache and still matches
    again = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    compare_greedy(again, prompts, max_tokens, reference(folder))
    assert all(o.metrics.num_cached_tokens == (len(p) - 1) // block_size * block_size
               for o, p in zip(again, prompts))


def _prefill_logits(llm: LLM, prompt: list[int], chunks: list[int]) -> torch.Tensor:
    """Logits at every prompt position, computed in the given chunk sizes through the paged cache."""
    engine = llm.llm_engine
    runner, bm = engine.executor, engine.block_manager
    seq = Sequence("logits-probe", prompt, SamplingParams())
    rows = []
    with torch.inference_mode():
        for n in chunks:
            bm.append_slots(seq, n)
            inp = runner.prepare_input([ScheduledChunk(seq, seq.num_computed_tokens, n)])
            hidden = runner.model(inp.input_ids, inp.positions, inp.attn_metadata)
            rows.append(runner.model.compute_logits(hidden).float())
            seq.num_computed_tokens += n
    bm.free(seq)
    return torch.cat(rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_transformers(arch, checkpoint, reference):
    """Tolerance: float32, max |difference| <= 1e-4 * (1 + max |logit|), whole prompt at once and in
    chunks that cut blocks (the later chunks read their prefix from the paged cache)."""
    folder = checkpoint(arch)
    llm = LLM(folder, max_model_len=512, block_size=16)
    prompt = random.Random(3).choices(range(1, llm.llm_engine.model_config.vocab_size), k=300)
    expected = reference(folder).prompt_logits(prompt)
    tol = 1e-4 * (1 + expected.abs().max())
    for chunks in ([300], [1, 99, 37, 163], [16, 16, 268]):
        got = _prefill_logits(llm, prompt, chunks)
        assert (got - expected).abs().max() <= tol, f"chunks {chunks}"


ROPE_SCALINGS = {
    "llama3": ("llama", dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64)),
    "linear": ("qwen2", dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    "yarn": ("qwen3", dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0,
                           original_max_position_embeddings=128)),
}


@pytest.mark.parametrize("scaling", list(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(scaling, checkpoint, reference):
    arch, rope = ROPE_SCALINGS[scaling]
    folder = checkpoint(arch, rope_parameters=rope)
    llm = LLM(folder, max_model_len=512)
    prompt = random.Random(4).choices(range(1, llm.llm_engine.model_config.vocab_size), k=400)
    expected = reference(folder).prompt_logits(prompt)
    got = _prefill_logits(llm, prompt, [400])
    assert (got - expected).abs().max() <= 1e-4 * (1 + expected.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(dtype, checkpoint, reference):
    """A checkpoint stored in bf16/fp16 loads; served in its own dtype, its logits stay close to
    transformers' float32 logits of the same weights (a loose bound: half precision rounding)."""
    folder = checkpoint("qwen3", dtype=dtype)
    prompt = random.Random(5).choices(range(1, 300), k=64)
    expected = reference(folder).prompt_logits(prompt)
    for served in ("float32", str(dtype).removeprefix("torch.")):
        llm = LLM(folder, dtype=served, max_model_len=256)
        assert llm.llm_engine.executor.dtype == (torch.float32 if served == "float32" else dtype)
        got = _prefill_logits(llm, prompt, [64])
        bound = 1e-4 if served == "float32" else 5e-2
        assert (got - expected).abs().max() <= bound * (1 + expected.abs().max()), served


def test_sharded_checkpoint(tmp_path, checkpoint, reference):
    """Weights split over several safetensors files load the same as one file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = checkpoint("llama")
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(tmp_path, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    prompts = [[5, 6, 7], [9] * 40]
    outputs = LLM(str(tmp_path), max_model_len=256).generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
        use_tqdm=False)
    compare_greedy(outputs, prompts, [10, 10], reference(folder))


def test_text_prompts_and_eos(checkpoint, reference):
    """String prompts are tokenized like transformers does; without ignore_eos a request stops at EOS
    with finish_reason "stop", and the EOS token stays in token_ids but not in the text."""
    folder = checkpoint("qwen3")
    llm = LLM(folder, max_model_len=256)
    tok = llm.get_tokenizer()
    eos = tok.eos_token_id
    texts = ["the engine schedules", "def class return", "block page table prefix"]
    outputs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    ref = reference(folder)
    for text, out in zip(texts, outputs):
        assert out.prompt == text and out.prompt_token_ids == tok.encode(text)
        expected, _ = ref.greedy(tok.encode(text), 40)
        if eos in expected:
            expected = expected[:expected.index(eos) + 1]
        comp = out.outputs[0]
        assert comp.token_ids == expected
        assert comp.finish_reason == ("stop" if expected[-1] == eos else "length")
        assert comp.text == tok.decode(expected, skip_special_tokens=True)
