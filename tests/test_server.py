"""The OpenAI-compatible server against independent references: the official ``openai`` client
against a real ``minivllm serve`` process (greedy text equal to `LLM.generate`'s, usage counted by
hand); a bounded load with disconnects against an in-process server whose engine we can inspect (no
request lost or duplicated, every KV block back in the pool, /health answered throughout); every bad
request's status and error body, each followed by a good request; the streamed text equal to the
offline text, also where stop strings and multi-byte characters cut across tokens."""
from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time

import httpx2 as httpx
import pytest
from openai import OpenAI

from minivllm import LLM, SamplingParams, course
from minivllm.engine.detokenizer import IncrementalDetokenizer
from minivllm.entrypoints.openai.local import STARTUP_GUARD_S, InProcessServer, serve_process
from minivllm.sampling_params import RequestOutputKind

NAME = "course"
PROMPTS = ["def fibonacci(n):", "class Stack:\n", "import os\n", "for i in range(10):", "x = [", "try:\n"]


@pytest.fixture(scope="module")
def offline():
    return LLM(course.model_path("target"), max_model_len=256)


def offline_text(llm: LLM, prompts: list, **kw) -> list[str]:
    outs = llm.generate(prompts, SamplingParams(temperature=0, **kw), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


# ---- a real `minivllm serve` process and the official client --------------------------------------
@pytest.fixture(scope="module")
def served():
    with serve_process("--max-model-len", "256", "--served-model-name", NAME, "--api-key", "secret") as url:
        yield url, OpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0)


def test_the_openai_client_gets_the_offline_text_streamed_or_not(served, offline):
    _, client = served
    want = offline_text(offline, PROMPTS, max_tokens=24)
    for prompt, text in zip(PROMPTS, want):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
        assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
            len(offline.get_tokenizer().encode(prompt)), 24)
        chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_completions_follow_the_chat_template(served, offline):
    _, client = served
    messages = [{"role": "user", "content": "write a stack"}]
    want = offline.chat(messages, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0].text
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0, n=2,
                                       logprobs=True, top_logprobs=2)
    assert [c.message.content for c in r.choices] == [want, want] and [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 24
    content = r.choices[0].logprobs.content
    assert len(content) == 12 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob for t in content)  # greedy: the chosen token is the top one
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_models_tokenize_and_detokenize(served, offline):
    url, client = served
    assert [m.id for m in client.models.list().data] == [NAME]
    ids = offline.get_tokenizer().encode("def add(a, b):")
    tok = httpx.post(f"{url}/tokenize", json={"prompt": "def add(a, b):"}).json()
    assert tok["tokens"] == ids and tok["count"] == len(ids) and tok["max_model_len"] == 256
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids}).json()["prompt"] == "def add(a, b):"


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x " * 300, "max_tokens": 4}, 400, "prompt"),
    ({"prompt": [1, 99999], "max_tokens": 4}, 400, "prompt_token_ids"),
    ({"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ({"prompt": "x", "structured_outputs": {"regex": "("}}, 400, "regex"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
])
def test_bad_requests_get_their_status_and_the_next_good_one_succeeds(served, body, status, param):
    url, client = served
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer secret"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == status and error["message"] and error["type"]
    assert client.completions.create(model=NAME, prompt="x = 1", max_tokens=2).usage.completion_tokens == 2


def test_malformed_json_and_a_wrong_key_are_refused(served):
    url, _ = served
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"Authorization": "Bearer secret",
                                                                          "Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/health").status_code == 200  # /health needs no key


def test_metrics_use_vllms_names(served):
    url, client = served
    client.completions.create(model=NAME, prompt="import sys\n", max_tokens=5, temperature=0)
    text = httpx.get(f"{url}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket"):
        assert f"\n{name}{{" in text, name
    assert 'vllm:request_success_total{finished_reason="length",model_name="course"}' in text


# ---- load with disconnects, against an in-process server ---------------------------------------------
@pytest.fixture(scope="module")
def in_process():
    with InProcessServer.launch(course.model_path("target"), NAME, max_model_len=256, max_trace_steps=50) as server:
        yield server.llm, server.url


async def stream_one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, hang_up_after: int | None):
    """The streamed text, or None if it hung up after ``hang_up_after`` chunks."""
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text, chunks = "", 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text += json.loads(line[6:])["choices"][0]["text"]
            chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                return None  # leaving the block closes the connection mid-stream
    return text


def test_two_hundred_streams_with_disconnects_lose_nothing(in_process, offline):
    llm, url = in_process
    engine = llm.engine
    rng = random.Random(0)
    n = 200
    prompts = [rng.choice(PROMPTS) + rng.choice(["", " ", "\n", "    "]) for _ in range(n)]
    max_tokens = [rng.randint(8, 32) for _ in range(n)]
    hang_ups = {i: rng.randint(1, 6) for i in rng.sample(range(n), n // 5)}
    health = []

    async def watch_health(client, done):
        while not done.is_set():
            health.append((await client.get(f"{url}/health")).status_code)
            await asyncio.sleep(0.05)

    async def run():
        limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            done = asyncio.Event()
            watcher = asyncio.create_task(watch_health(client, done))
            results = await asyncio.gather(*(stream_one(client, url, p, m, hang_ups.get(i))
                                             for i, (p, m) in enumerate(zip(prompts, max_tokens))))
            done.set()
            await watcher
            return results

    results = asyncio.run(run())
    deadline = time.monotonic() + STARTUP_GUARD_S  # the aborts reach the engine thread between steps
    while (engine.requests or engine.has_unfinished_requests()) and time.monotonic() < deadline:
        time.sleep(0.05)
    want = [o.outputs[0].text for o in offline.generate(
        prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens], use_tqdm=False)]
    for i, (got, text) in enumerate(zip(results, want)):
        assert (got is None) == (i in hang_ups)
        if got is not None:
            assert got == text, i
    bm = engine.block_manager
    assert not engine.requests and not engine.streams and not llm._streams
    assert bm.num_free_blocks == bm.num_blocks, "every KV block is back in the pool"
    bm.check_invariants([])
    assert health and set(health) == {200}
    metrics = llm.listeners[0].__self__
    assert not metrics._last_output_time and not metrics._num_samples, "aborted requests leave no state behind"
    assert len(engine.trace) <= 2 * 50, "the trace keeps only the last steps"
    finished = [f for rec in engine.trace for f in rec.finished]
    assert len({rid for rid, _ in finished}) == len(finished), "no request finishes twice"


def test_a_disconnected_non_streaming_request_is_aborted(in_process):
    llm, url = in_process
    engine = llm.engine
    steps_before = engine.num_steps

    async def run():
        async with httpx.AsyncClient(timeout=30) as client:
            task = asyncio.create_task(client.post(f"{url}/v1/completions", json={
                "model": NAME, "prompt": "def f():", "max_tokens": 200, "ignore_eos": True, "temperature": 0}))
            while not engine.requests:
                await asyncio.sleep(0.01)
            task.cancel()  # the client hangs up while the request runs
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    deadline = time.monotonic() + STARTUP_GUARD_S
    while engine.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.num_steps - steps_before < 150, "it stopped long before its 200 tokens"


# ---- streamed text equals the offline text -------------------------------------------------------------
def test_incremental_detokenization_equals_decoding_the_whole_output(offline):
    """Byte-level BPE splits non-ASCII characters over tokens: the text grown token by token equals
    decoding the whole sequence at every point where no character is unfinished."""
    tok = offline.get_tokenizer()
    samples = ["naïve café — ünïcödé ✓ 日本語 🚀 done", "def f():\n    return 'émoji 🎉'\n", "tabs\tand\nnewlines  x"]
    for text in samples:
        ids = tok.encode(text)
        detok = IncrementalDetokenizer(tok)
        for i, t in enumerate(ids):
            detok.add(t)
            whole = tok.decode(ids[:i + 1])
            if not whole.endswith("\ufffd"):
                assert detok.text == whole
        assert detok.text == tok.decode(ids) == text


def test_delta_outputs_add_up_to_the_final_text(offline):
    """DELTA outputs, with stop strings that cut across tokens and are held back until decided, add
    up to exactly the FINAL_ONLY text; no delta is ever taken back."""
    engine = offline.llm_engine
    final = offline_text(offline, PROMPTS, max_tokens=40)
    rng = random.Random(1)
    for p, text in zip(PROMPTS, final):
        stop = [text[i:i + 3] for i in (rng.randrange(5, 30),)] if len(text) > 35 else []
        for include in (False, True):
            params = SamplingParams(temperature=0, max_tokens=40, stop=stop, include_stop_str_in_output=include,
                                    output_kind=RequestOutputKind.DELTA)
            rid = f"delta-{p!r}-{include}"
            engine.add_request(rid, p, params)
            deltas, finished = [], False
            while not finished:
                for out in engine.step():
                    assert out.request_id == rid
                    deltas.append(out.outputs[0].text)
                    finished = out.finished
            want = offline.generate([p], SamplingParams(temperature=0, max_tokens=40, stop=stop,
                                                        include_stop_str_in_output=include), use_tqdm=False)
            assert "".join(deltas) == want[0].outputs[0].text
            if stop:
                assert stop[0] not in "".join(deltas[:-1]), "a stop string is never streamed before it is decided"


def test_serve_help_lists_the_engine_arguments():
    out = subprocess.run([sys.executable, "-m", "minivllm", "serve", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--api-key" in out.stdout and "--max-num-seqs" in out.stdout
