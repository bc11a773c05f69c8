"""The course models shipped as package data (`minivllm.course`, made by `python -m minivllm.course.train`):
they load in minivllm, share one tokenizer, have the sizes their cards state, and the target writes Python.

Without trained weights in minivllm/course/models the model tests skip; the name checks always run."""
from __future__ import annotations

import math
import os
import re

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


HEADERS = ("def fibonacci(n):", "class Stack:", "def read_file(path):\n", "for i in range(10):\n")
# hand-written, not from the corpus: what a model that learnt Python predicts far better than chance
SNIPPET = '''import os


def count_lines(path):
    """Return the number of lines in the file at path."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    with open(path) as f:
        return sum(1 for _ in f)


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key):
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]
'''


def indents_its_blocks(llm: LLM) -> tuple[bool, list[str]]:
    """Greedy, 16 tokens after each header of `HEADERS`: does the completion go on, on a new line,
    indented deeper than the header, with a statement (a keyword, a name or a docstring)?"""
    outs = llm.generate(list(HEADERS), SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    texts = [h + o.outputs[0].text for h, o in zip(HEADERS, outs)]
    body = re.compile(r"^[^\n]*:\n+( +)(\"\"\"|[A-Za-z_])")
    return all(body.match(t) for t in texts), texts


def snippet_loss(folder: str) -> float:
    """Mean next-token cross-entropy (nats) of the model in ``folder`` on `SNIPPET`, by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.tensor([AutoTokenizer.from_pretrained(folder).encode(SNIPPET, add_special_tokens=False)])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()


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
def test_newlines_are_tokens_of_their_own(llms):
    """The tokenizer splits newlines off before BPE, so no token holds a newline and anything else: a
    prompt ending in ":\n" ends as a block opener does in the corpus, with the indentation still to come."""
    tokenizer = llms["target"].get_tokenizer()
    text = "class Stack:\n    def push(self, item):\n        self.items.append(item)\n\n\nx = 1\n"
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(text, add_special_tokens=False)]
    assert "".join(pieces) == text
    assert all(set(p) == {"\n"} or "\n" not in p for p in pieces), pieces
    assert "\n\n\n" in pieces


@needs_weights
def test_target_writes_python(llms):
    """Block structure in greedy completions, and a hand-written snippet predicted far better than chance
    (a uniform guess over the vocabulary costs ln 4096 = 8.3 nats per token)."""
    ok, texts = indents_its_blocks(llms["target"])
    assert ok, "a completion is not an indented block:\n" + "\n---\n".join(texts)
    assert snippet_loss(SHIPPED["target"]) < 0.4 * math.log(4096)


@needs_weights
def test_a_random_model_of_the_same_shape_does_not(tmp_path):
    """The checks above are ones that training passes, not ones any model passes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = SHIPPED["target"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path)
    ok, texts = indents_its_blocks(LLM(str(tmp_path), num_kv_blocks=64))
    assert not ok, texts
    assert snippet_loss(str(tmp_path)) > 0.9 * math.log(4096)
