"""The course models shipped as package data (`minivllm.course`, made by `python -m minivllm.course.train`):
they load in minivllm, share one tokenizer, have the sizes their cards state, and the target writes Python.

Without trained weights in minivllm/course/models the model tests skip; the name checks always run."""
from __future__ import annotations

import math
import os
import warnings

import pytest

from minivllm import LLM, SamplingParams, course

TARGET_PARAMS = (10e6, 20e6)
DRAFT_PARAMS = (1e6, 2e6)


def _shipped() -> dict[str, str] | None:
    try:
        return {name: course.model_path(name) for name in course.MODEL_NAMES}
    except FileNotFoundError:
        return None


SHIPPED = _shipped()
needs_weights = pytest.mark.skipif(
    SHIPPED is None, reason="course model weights not trained yet: python -m minivllm.course.train "
                            "--out minivllm/course/models")


def compiling_lines(text: str) -> int:
    """Lines in the longest prefix of ``text``'s complete lines that compiles as Python (0 if none)."""
    lines = text.split("\n")[:-1]  # the last line may be cut off by max_tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in generated strings
        for k in range(len(lines), 0, -1):
            try:
                compile("\n".join(lines[:k]) + "\n", "<completion>", "exec")
                return k
            except (SyntaxError, ValueError):  # ValueError: a NUL byte
                continue
    return 0


def writes_python(llm: LLM, prompt: str = "def fibonacci(n):") -> tuple[bool, str]:
    """Greedy, 64 tokens: the prompt line and at least two lines of body must compile."""
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False)
    text = prompt + out[0].outputs[0].text
    return compiling_lines(text) >= 3, text


def param_count(folder: str) -> int:
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k != "lm_head.weight")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        course.model_path("llama")
    assert "'llama'" in str(err.value)
    for name in course.MODEL_NAMES:
        assert name in str(err.value)


def test_missing_weights_say_how_to_train(monkeypatch, tmp_path):
    monkeypatch.setattr(course, "MODELS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="minivllm.course.train"):
        course.model_path("target")


def test_compiling_lines():
    assert compiling_lines("def f(n):\n    if n < 2:\n        return n\n    return f(n - 1) + f(n") == 3
    assert compiling_lines("def f(n):\n    x = 1\n        y = 2\n") == 2
    assert compiling_lines("def f(n):..............\n") == 0


@pytest.fixture(scope="module")
def llms():
    return {"target": LLM(SHIPPED["target"]), "draft": LLM(SHIPPED["draft"], num_kv_blocks=64)}


@needs_weights
def test_models_load_and_share_a_tokenizer(llms):
    assert os.path.isabs(course.model_path("target"))
    target, draft = llms["target"].get_tokenizer(), llms["draft"].get_tokenizer()
    assert target.get_vocab() == draft.get_vocab()
    assert target.eos_token == draft.eos_token == "<|endoftext|>"
    with open(os.path.join(SHIPPED["target"], "tokenizer.json")) as a, \
            open(os.path.join(SHIPPED["draft"], "tokenizer.json")) as b:
        assert a.read() == b.read()
    for llm in llms.values():
        out = llm.generate(["class Stack:"], SamplingParams(temperature=0.8, max_tokens=8, seed=0), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) >= 1


@needs_weights
def test_parameter_counts():
    target, draft = param_count(SHIPPED["target"]), param_count(SHIPPED["draft"])
    assert TARGET_PARAMS[0] <= target <= TARGET_PARAMS[1], target
    assert DRAFT_PARAMS[0] <= draft <= DRAFT_PARAMS[1], draft
    size = sum(os.path.getsize(os.path.join(f, "model.safetensors")) for f in SHIPPED.values())
    assert size < 60e6, size


@needs_weights
def test_target_writes_python(llms):
    ok, text = writes_python(llms["target"])
    assert ok, f"greedy completion does not read as Python:\n{text}"


@needs_weights
def test_a_random_model_of_the_same_shape_does_not(tmp_path):
    """The check above is one that training passes, not one any model passes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = SHIPPED["target"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path)
    ok, text = writes_python(LLM(str(tmp_path), num_kv_blocks=64))
    assert not ok, text
