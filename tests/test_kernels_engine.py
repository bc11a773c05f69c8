"""The engine on the Triton attention backend (CPU, Triton interpreter) against the torch backend:
same greedy tokens through chunked prefill, mixed prefill + decode steps and a prefix-cache hit."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit runs: the kernels then run on numpy

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from minivllm import LLMEngine, SamplingParams  # noqa: E402
from minivllm.config.engine import EngineConfig  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
SHARED = list(range(5, 35))  # 30 tokens: three full blocks of 8 are cached by the first request


def run(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, tuple[list[int], int]]:
    """Generate for the prompts in order, one after the other joins: (tokens, prompt tokens served
    from the prefix cache) per request."""
    results = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, GREEDY)
        engine.step()  # each request starts while the earlier ones are still running
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id] = (out.outputs[0].token_ids, out.metrics.num_cached_tokens)
    return results


def test_triton_backend_matches_torch_backend(checkpoint):
    folder = checkpoint("qwen3")
    prompts = [SHARED + [40, 41, 42], [7, 8, 9], SHARED + [50] * 17, [3] * 21]
    results = {}
    for backend in ("torch", "triton"):
        # chunks of at most 12 tokens cut the 8-token blocks; decodes share steps with prompt chunks
        cfg = EngineConfig.from_args(folder, block_size=8, max_num_batched_tokens=12, max_model_len=128,
                                     num_kv_blocks=64, attention_backend=backend)
        engine = LLMEngine(cfg)
        assert engine.executor.attention_backend == backend
        results[backend] = run(engine, prompts)
    assert results["triton"]["r2"][1] == 24, "the third prompt reuses the first one's three cached blocks"
    assert results["triton"] == results["torch"]


def test_backend_choice_and_validation(checkpoint, monkeypatch):
    assert EngineConfig(checkpoint("qwen3"), device="cpu").resolved_attention_backend == "torch"
    with pytest.raises(ValueError, match="attention_backend='flash'"):
        EngineConfig(checkpoint("qwen3"), attention_backend="flash")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1"):
        EngineConfig(checkpoint("qwen3"), device="cpu", attention_backend="triton")


def test_minivllm_runs_without_triton(checkpoint):
    """The torch backend never imports triton: machines without it run the engine."""
    code = ("import sys; from minivllm import LLM, SamplingParams; "
            f"llm = LLM({checkpoint('qwen3')!r}, max_model_len=64, num_kv_blocks=8); "
            "llm.generate({'prompt_token_ids': [1, 2, 3]}, SamplingParams(max_tokens=2), use_tqdm=False); "
            "assert 'triton' not in sys.modules, 'triton was imported'")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
