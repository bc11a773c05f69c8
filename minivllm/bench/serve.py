"""Benchmark an OpenAI-compatible server as `vllm bench serve` does, with its random dataset.

    python -m minivllm.bench serve --base-url http://127.0.0.1:8000 --model NAME \\
        --num-prompts 200 --request-rate 8 [--burstiness 1] [--max-concurrency 16] \\
        --random-input-len 256 --random-output-len 64 [--random-range-ratio 0.25] [--seed 0] \\
        [--goodput ttft:500 tpot:50 [e2el:2000]] [--percentile-metrics ttft,tpot,itl,e2el] \\
        [--metric-percentiles 50,90,99] [--save-result [--result-dir D] [--result-filename F]]

The requests are the simulator's seeded `Workload` (minivllm.sim.workload), so a simulated and a measured
run can serve the very same requests: gaps between arrivals are gamma-distributed with shape
``--burstiness`` and mean ``1 / --request-rate`` (1: a Poisson process; ``inf``: all at once), the first
at time 0; prompt and output lengths are uniform on ``len * (1 -+ --random-range-ratio)``; prompts are
random token ids below ``--random-vocab-size``. ``--max-concurrency`` caps the requests in flight.

Each request is a streamed completion, ``{"prompt": [token ids], "max_tokens": its output length,
"ignore_eos": true, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}``,
read as Server-Sent Events and timed as vLLM's client times it: every chunk with a choice is a token
chunk (its text may be empty: a special token, or bytes held back mid-character); TTFT is the first
one's arrival after the send, ITL every gap between consecutive ones, E2E latency the last one's
arrival after the send, TPOT ``(E2E - TTFT) / (output tokens - 1)`` with the output tokens from the
final ``usage`` chunk (else the token chunks counted). An HTTP error, a dropped stream, a stream with
no token or without ``[DONE]``, an ``error`` event or ``--request-timeout`` seconds without finishing
make a request failed. The summary (`summarize`) and the table (`report`) are the simulator's
(minivllm.sim.metrics): ITL pooled over all requests; goodput counts the requests that meet every
``--goodput`` target, per second; throughputs over the wall time from the first send to the last answer.

Differences from vLLM: arrival times are not rescaled to end at ``num_prompts / rate``; lengths are
drawn as rounded continuous uniforms; no tokenizer, so no text prompts and no ``/tokenize``
alignment; temperature 0 is sent (vLLM leaves it to the server); per-request lists are always saved
(vLLM's ``--save-detailed``), with null, not 0, for a failed request's times; no peak-throughput
lines, warm-ups, ramp-ups or other datasets.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Callable

import httpx2 as httpx  # httpx's successor, which openai and huggingface_hub use

from minivllm.sim.metrics import SLO, PERCENTILE_METRICS, Metrics, RequestRecord, report, summarize
from minivllm.sim.workload import Lengths, Request, Workload


@dataclass(frozen=True)
class BenchConfig:
    base_url: str  # http://host:port, without the endpoint
    model: str
    num_prompts: int = 1000
    request_rate: float = math.inf  # requests per second; inf sends them all at once
    burstiness: float = 1.0
    max_concurrency: int | None = None
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    random_vocab_size: int = 4096  # the course models' vocabulary: any of their ids is valid for larger ones
    seed: int = 0
    temperature: float = 0.0
    endpoint: str = "/v1/completions"
    request_timeout: float = 600.0  # seconds from a request's send to its last byte

    def __post_init__(self) -> None:
        if not 0 <= self.random_range_ratio < 1:
            raise ValueError(f"random_range_ratio={self.random_range_ratio!r} must be in [0, 1)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency={self.max_concurrency!r} must be >= 1 or None")
        if not self.request_timeout > 0:
            raise ValueError(f"request_timeout={self.request_timeout!r} must be > 0")

    def workload(self) -> Workload:
        """The requests to send (validates the rest of the settings)."""
        def lengths(n: int) -> Lengths:
            return Lengths("uniform", n, n * self.random_range_ratio)

        return Workload(self.num_prompts, self.request_rate, lengths(self.random_input_len),
                        lengths(self.random_output_len), burstiness=self.burstiness,
                        vocab_size=self.random_vocab_size, seed=self.seed)


@dataclass(frozen=True)
class RequestResult:
    """What the client saw of one request: its record when it finished, the error when not. Times are
    seconds after the benchmark's start."""

    request_id: str
    prompt_len: int
    max_tokens: int
    start_time: float  # sent (after waiting for --max-concurrency)
    queue_time: float  # how long it waited for --max-concurrency
    record: RequestRecord | None
    generated_text: str = ""
    error: str = ""


class StreamError(Exception):
    """The server answered, but not with a complete stream of tokens."""


def payload(config: BenchConfig, request: Request) -> dict:
    return {"model": config.model, "prompt": request.prompt_token_ids, "max_tokens": request.output_len,
            "temperature": config.temperature, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


async def send(client: httpx.AsyncClient, config: BenchConfig, request: Request, t0: float,
               queue_time: float) -> RequestResult:
    """Stream one completion, timestamping every event as it arrives."""
    start = time.perf_counter() - t0
    token_times: list[float] = []
    texts: list[str] = []
    usage: dict = {}
    try:
        async with asyncio.timeout(config.request_timeout):
            async with client.stream("POST", config.base_url + config.endpoint,
                                     json=payload(config, request)) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode(errors="replace")
                    raise StreamError(f"HTTP {response.status_code}: {body[:300]}")
                done = False
                async for line in response.aiter_lines():
                    now = time.perf_counter() - t0
                    if not line.startswith("data:"):  # blank separators, ": ping" comments
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise StreamError(f"error event: {event['error']}")
                    if event.get("choices"):
                        token_times.append(now)
                        texts.append(event["choices"][0].get("text") or "")
                    usage = event.get("usage") or usage
                if not done:
                    raise StreamError("the stream ended without [DONE]")
                if not token_times:
                    raise StreamError("the stream carried no token")
    except Exception as e:  # any failure of one request is that request's: counted, never fatal
        error = f"timed out after {config.request_timeout:g} s" if isinstance(e, TimeoutError) else \
            f"{type(e).__name__}: {e}"
        return RequestResult(request.request_id, len(request.prompt_token_ids), request.output_len, start,
                             queue_time, None, "".join(texts), error)
    record = RequestRecord(request.request_id, arrival=start, first_token=token_times[0], finished=token_times[-1],
                           token_times=tuple(token_times),
                           num_prompt_tokens=usage.get("prompt_tokens") or len(request.prompt_token_ids),
                           num_output_tokens=usage.get("completion_tokens") or len(token_times))
    return RequestResult(request.request_id, len(request.prompt_token_ids), request.output_len, start, queue_time,
                         record, "".join(texts))


async def run(config: BenchConfig, requests: list[Request] | None = None, *, stop: threading.Event | None = None,
              on_sent: Callable[[], None] | None = None,
              on_result: Callable[[RequestResult], None] | None = None) -> tuple[list[RequestResult], float]:
    """Send ``requests`` (by default the config's workload) at their arrival times; the results in
    request order and the wall time from the first send to the last answer. ``stop`` (set from any
    thread) ends the run early: no more requests are sent and those in flight are cancelled (their
    connections close, so the server aborts them); the results hold only the requests that ended
    on their own. ``on_sent`` and ``on_result`` are called as each request goes out and comes back."""
    requests = config.workload().generate() if requests is None else requests
    stop = stop or threading.Event()
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else contextlib.nullcontext()
    # no connection-pool limit of the client's own: only --max-concurrency may hold requests back
    async with httpx.AsyncClient(timeout=httpx.Timeout(config.request_timeout),
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)) as client:
        t0 = time.perf_counter()

        async def limited(request: Request) -> RequestResult:
            ready = time.perf_counter()
            async with limit:  # cancelled while waiting here: never sent
                if on_sent is not None:
                    on_sent()
                result = await send(client, config, request, t0, time.perf_counter() - ready)
            if on_result is not None:
                on_result(result)
            return result

        tasks = []
        for request in requests:  # sleep until each arrival time, measured from the start, so no drift
            if not await _sleep_until(t0 + request.arrival_time, stop):
                break
            tasks.append(asyncio.create_task(limited(request)))
        pending = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=0.05)
            if pending and stop.is_set():
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                break
        results = [t.result() for t in tasks if not t.cancelled()]
        return results, time.perf_counter() - t0


async def _sleep_until(deadline: float, stop: threading.Event) -> bool:
    """Sleep until ``deadline`` (perf_counter), waking now and then to look at ``stop``; False if it
    was set first."""
    while not stop.is_set():
        left = deadline - time.perf_counter()
        if left <= 0:
            return True
        await asyncio.sleep(min(left, 0.05))
    return False


def summarize_results(results: list[RequestResult], duration: float, slo: SLO | None = None,
                      percentiles: tuple[float, ...] = (99.0,)) -> Metrics:
    records = [r.record for r in results if r.record is not None]
    return summarize(records, duration, slo, num_failed=len(results) - len(records), percentiles=percentiles)


def result_json(config: BenchConfig, results: list[RequestResult], metrics: Metrics,
                percentile_metrics: tuple[str, ...]) -> dict:
    """What `vllm bench serve --save-result --save-detailed` writes, under its keys."""
    def each(f) -> list:
        return [None if r.record is None else f(r.record) for r in results]

    return {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "endpoint_type": "openai", "backend": "openai",
            "label": None, "model_id": config.model, "tokenizer_id": None, "num_prompts": config.num_prompts,
            "request_rate": config.request_rate if math.isfinite(config.request_rate) else "inf",
            "burstiness": config.burstiness, "max_concurrency": config.max_concurrency,
            **metrics.result_dict(percentile_metrics),
            "input_lens": [r.prompt_len if r.record is None else r.record.num_prompt_tokens for r in results],
            "output_lens": [0 if r.record is None else r.record.num_output_tokens for r in results],
            "ttfts": each(lambda x: x.ttft), "itls": each(lambda x: x.itls.tolist()),
            "latencies": each(lambda x: x.e2e), "start_times": [r.start_time for r in results],
            "queue_times": [r.queue_time for r in results], "generated_texts": [r.generated_text for r in results],
            "errors": [r.error for r in results]}


# ---- command line -----------------------------------------------------------------------------
def parse_goodput(pairs: list[str]) -> SLO:
    """``["ttft:500", "tpot:50", "e2el:2000"]`` (milliseconds) as an SLO in seconds."""
    names = {"ttft": "ttft", "tpot": "tpot", "e2el": "e2e"}
    targets = {}
    for pair in pairs:
        name, _, value = pair.partition(":")
        if name not in names or not value:
            raise ValueError(f"--goodput {pair!r}: expected KEY:MILLISECONDS with KEY one of {', '.join(names)}")
        targets[names[name]] = float(value) / 1e3
    return SLO(**targets)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    arg = parser.add_argument
    arg("--base-url", help="the server, e.g. http://127.0.0.1:8000 (default: http://HOST:PORT)")
    arg("--host", default="127.0.0.1")
    arg("--port", type=int, default=8000)
    arg("--endpoint", default="/v1/completions")
    arg("--model", help="the model name to send (default: the first of the server's /v1/models)")
    arg("--dataset-name", choices=["random"], default="random", help="only vLLM's random dataset")
    arg("--num-prompts", type=int, default=1000)
    arg("--request-rate", type=float, default=math.inf, help="requests per second; inf (default): all at once")
    arg("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps; 1: Poisson")
    arg("--max-concurrency", type=int, default=None, help="requests in flight at most")
    arg("--random-input-len", type=int, default=1024)
    arg("--random-output-len", type=int, default=128)
    arg("--random-range-ratio", type=float, default=0.0, help="lengths uniform on len * (1 -+ ratio)")
    arg("--random-vocab-size", type=int, default=4096, help="prompt token ids are drawn below this")
    arg("--seed", type=int, default=0)
    arg("--temperature", type=float, default=0.0)
    arg("--ignore-eos", action="store_true", help="accepted for vLLM's command lines: always on here")
    arg("--request-timeout", type=float, default=600.0, help="seconds a request may take before it fails")
    arg("--goodput", nargs="+", metavar="KEY:MS", help="SLOs in ms: ttft:500 tpot:50 e2el:2000")
    arg("--percentile-metrics", default="ttft,tpot,itl", help=f"of {','.join(PERCENTILE_METRICS)}")
    arg("--metric-percentiles", default="99", help="e.g. 50,90,99")
    arg("--save-result", action="store_true", help="write the result JSON")
    arg("--result-dir", default=None)
    arg("--result-filename", default=None)


def first_model(base_url: str, timeout: float) -> str:
    response = httpx.get(base_url + "/v1/models", timeout=timeout)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def from_args(args: argparse.Namespace) -> tuple[BenchConfig, SLO | None, tuple[str, ...], tuple[float, ...]]:
    """The settings a parsed command line asks for; ValueError names the first bad one."""
    percentile_metrics = tuple(m.strip() for m in args.percentile_metrics.split(","))
    if unknown := [m for m in percentile_metrics if m not in PERCENTILE_METRICS]:
        raise ValueError(f"--percentile-metrics: unknown {unknown}; known: {', '.join(PERCENTILE_METRICS)}")
    percentiles = tuple(float(p) for p in args.metric_percentiles.split(","))
    if not all(0 <= p <= 100 for p in percentiles):
        raise ValueError(f"--metric-percentiles {args.metric_percentiles}: each must be in [0, 100]")
    slo = parse_goodput(args.goodput) if args.goodput else None
    config = BenchConfig((args.base_url or f"http://{args.host}:{args.port}").rstrip("/"), args.model or "",
                         num_prompts=args.num_prompts, request_rate=args.request_rate, burstiness=args.burstiness,
                         max_concurrency=args.max_concurrency, random_input_len=args.random_input_len,
                         random_output_len=args.random_output_len, random_range_ratio=args.random_range_ratio,
                         random_vocab_size=args.random_vocab_size, seed=args.seed, temperature=args.temperature,
                         endpoint=args.endpoint, request_timeout=args.request_timeout)
    config.workload()  # validates the counts, rate, burstiness and lengths
    return config, slo, percentile_metrics, percentiles


def main(args: argparse.Namespace) -> dict:
    """Run the benchmark the parsed command line describes, print the report, maybe save the JSON;
    returns the result dict."""
    config, slo, percentile_metrics, percentiles = from_args(args)
    if not config.model:
        config = replace(config, model=first_model(config.base_url, config.request_timeout))
    requests = config.workload().generate()

    print(f"Traffic request rate: {config.request_rate}")
    print(f"Burstiness factor: {config.burstiness} "
          f"({'Poisson process' if config.burstiness == 1 else 'Gamma distribution'})")
    print(f"Maximum request concurrency: {config.max_concurrency}")
    results, duration = asyncio.run(run(config, requests))
    metrics = summarize_results(results, duration, slo, percentiles)
    if failed := [r for r in results if r.record is None]:
        print(f"{len(failed)} requests failed; the first errors:")
        for r in failed[:10]:
            print(f"  {r.request_id}: {r.error}")
    print(report(metrics, percentile_metrics, max_concurrency=config.max_concurrency,
                 request_rate=config.request_rate))

    result = result_json(config, results, metrics, percentile_metrics)
    if args.save_result:
        concurrency = f"-concurrency{config.max_concurrency}" if config.max_concurrency else ""
        name = args.result_filename or \
            f"openai-{config.request_rate}qps{concurrency}-{config.model.split('/')[-1]}-{result['date']}.json"
        if args.result_dir:
            os.makedirs(args.result_dir, exist_ok=True)
            name = os.path.join(args.result_dir, name)
        with open(name, "w", encoding="utf-8") as f:
            json.dump(result, f)
        print(f"saved {name}")
    return result
