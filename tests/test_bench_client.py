"""The bench client (`python -m minivllm.bench serve`) against a stand-in OpenAI streaming server that
sends a known schedule of chunks: its TTFT, ITL, TPOT, E2E, goodput and percentiles against values
worked out by hand from that schedule; arrivals, the concurrency cap, failures, the saved JSON; and the
one table it shares with the simulator."""
from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from minivllm.bench import serve
from minivllm.bench.serve import BenchConfig, RequestResult, run, summarize_results
from minivllm.core.trace import ChunkRecord, StepRecord
from minivllm.sim import metrics as sim_metrics
from minivllm.sim.metrics import SLO, RequestRecord, compute_metrics, summarize

ROOT = Path(__file__).resolve().parents[1]
TOL = 0.025  # seconds of scheduling jitter allowed on a busy machine; the schedules' steps are >= 40 ms apart


# ---- the stand-in server --------------------------------------------------------------------------
class StandIn:
    """A raw asyncio HTTP/1.1 server. The k-th completion request it receives streams
    ``ceil(max_tokens / tokens_per_chunk)`` token chunks, the first ``ttfts[k % len]`` seconds after the
    request, the next ones ``gaps`` apart (cycled; times are from the request, so errors don't add up),
    then, ``tail`` seconds after the last, a usage chunk and ``[DONE]``. ``faults[k]`` breaks the k-th
    request instead. It counts the requests in flight, from the request's arrival to just before its
    last bytes are written (so a client that reuses a freed slot can never be seen overlapping)."""

    def __init__(self, ttfts=(0.1,), gaps=(0.05,), tokens_per_chunk=1, send_usage=True, tail=0.0, faults=None):
        self.ttfts, self.gaps, self.tokens_per_chunk, self.send_usage = ttfts, gaps, tokens_per_chunk, send_usage
        self.tail = tail
        self.faults = faults or {}
        self.payloads: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            method, path, _ = head.split("\r\n")[0].split(" ")
            length = next((int(h.split(":")[1]) for h in head.split("\r\n") if h.lower().startswith("content-length")),
                          0)
            body = await reader.readexactly(length)
            if method == "GET" and path == "/v1/models":
                return self.respond(writer, 200, json.dumps({"object": "list", "data": [{"id": "stand-in-model"}]}))
            k = len(self.payloads)
            self.payloads.append(json.loads(body))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if not await self.stream(k, self.payloads[k], writer):
                    self.in_flight -= 1  # a broken request is counted out too
            except BaseException:
                self.in_flight -= 1
                raise
        finally:
            writer.close()

    def respond(self, writer, status: int, body: str) -> None:
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n{body}".encode())

    async def stream(self, k: int, payload: dict, writer: asyncio.StreamWriter) -> bool:
        """Answer the k-th request; True once it has counted itself out of the requests in flight."""
        fault = self.faults.get(k)
        if fault == "http500":
            self.respond(writer, 500, '{"error": "boom"}')
            return False
        if fault == "hang":
            await asyncio.sleep(30)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n")

        def event(data: str) -> None:
            raw = f"data: {data}\n\n".encode()
            writer.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")

        loop = asyncio.get_running_loop()
        t0, at = loop.time(), self.ttfts[k % len(self.ttfts)]
        n = -(-payload["max_tokens"] // self.tokens_per_chunk)
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + at - loop.time()))
            event(json.dumps({"choices": [{"index": 0, "text": "ab"[: self.tokens_per_chunk],
                                           "finish_reason": "length" if i == n - 1 else None}]}))
            await writer.drain()
            if fault == "disconnect" and i == 1:
                writer.transport.abort()
                return False
            at += self.gaps[i % len(self.gaps)]
        await asyncio.sleep(self.tail)
        if fault == "error_event":
            event(json.dumps({"error": {"message": "engine died"}}))
        if self.send_usage:
            event(json.dumps({"choices": [], "usage": {"prompt_tokens": len(payload["prompt"]),
                                                       "completion_tokens": payload["max_tokens"]}}))
        self.in_flight -= 1
        if fault != "no_done":
            event("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


@contextmanager
def stand_in(**kwargs):
    """The stand-in serving on a free port of 127.0.0.1, in a thread with its own event loop."""
    server = StandIn(**kwargs)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def main():
        srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        server.port = srv.sockets[0].getsockname()[1]
        server.stop = asyncio.Event()
        started.set()
        await server.stop.wait()
        srv.close()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:  # a hung handler
            task.cancel()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(server.stop.set)
        thread.join(10)


def config(server: StandIn, **kwargs) -> BenchConfig:
    defaults = dict(num_prompts=4, random_input_len=8, random_output_len=5, request_timeout=10.0)
    return BenchConfig(f"http://127.0.0.1:{server.port}", "stand-in-model", **(defaults | kwargs))


def pct(stats) -> dict[float, float]:
    return dict(stats.percentiles)


# ---- timings against the schedule ---------------------------------------------------------------
def test_timings_and_summary_match_the_schedule():
    # two requests get their first token after 100 ms, two after 300 ms; then gaps of 30, 90, 30, 90 ms:
    # TTFT 100/300, E2E 340/540, TPOT 240 / 4 = 60 ms, ITL eight 30s and eight 90s; the usage chunk and
    # [DONE] come 80 ms after the last token, which ends neither E2E nor the ITLs (as in vLLM's client)
    with stand_in(ttfts=(0.1, 0.3), gaps=(0.03, 0.09), tail=0.08) as server:
        results, duration = asyncio.run(run(config(server)))
    assert [r.error for r in results] == [""] * 4
    for p in server.payloads:  # what vLLM's client sends for its random dataset, with token ids
        assert (p["model"], p["max_tokens"], p["ignore_eos"], p["stream"], p["stream_options"], p["temperature"]) == (
            "stand-in-model", 5, True, True, {"include_usage": True}, 0.0)
        assert len(p["prompt"]) == 8 and all(isinstance(t, int) and 0 <= t < 4096 for t in p["prompt"])
    records = [r.record for r in results]
    assert all(len(x.token_times) == 5 and x.num_output_tokens == 5 and x.num_prompt_tokens == 8 for x in records)
    assert sorted(x.ttft for x in records) == pytest.approx([0.1, 0.1, 0.3, 0.3], abs=TOL)
    for x in records:
        assert x.itls == pytest.approx([0.03, 0.09, 0.03, 0.09], abs=TOL)
        assert x.tpot == pytest.approx(0.06, abs=TOL / 4)  # (E2E - TTFT) / 4: the jitter is shared out
        assert x.e2e == pytest.approx(x.ttft + 0.24, abs=TOL)
    assert 0.54 + 0.08 <= duration < 0.54 + 0.08 + 0.3

    m = summarize_results(results, duration, SLO(ttft=0.2), percentiles=(25, 50, 90, 99))
    assert (m.num_requests, m.num_failed, m.total_input_tokens, m.total_output_tokens) == (4, 0, 32, 20)
    assert (m.request_throughput, m.output_throughput, m.total_token_throughput) == pytest.approx(
        (4 / duration, 20 / duration, 52 / duration))
    assert m.goodput == pytest.approx(2 / duration)  # the two 100 ms TTFTs
    # np.percentile by hand: TTFTs sorted 100, 100, 300, 300 (positions 0..3)
    assert pct(m.ttft) == pytest.approx({25: 0.1, 50: 0.2, 90: 0.3, 99: 0.3}, abs=TOL)
    assert (m.ttft.mean, m.ttft.std) == pytest.approx((0.2, 0.1), abs=TOL)
    # 16 gaps pooled: 8 x 30 ms then 8 x 90 ms; position 3.75 -> 30, 7.5 -> (30 + 90) / 2, 13.5 -> 90
    assert pct(m.itl) == pytest.approx({25: 0.03, 50: 0.06, 90: 0.09, 99: 0.09}, abs=TOL)
    assert (m.itl.mean, m.itl.std) == pytest.approx((0.06, 0.03), abs=TOL / 2)
    assert pct(m.tpot) == pytest.approx({25: 0.06, 50: 0.06, 90: 0.06, 99: 0.06}, abs=TOL / 4)
    assert pct(m.e2e) == pytest.approx({25: 0.34, 50: 0.44, 90: 0.54, 99: 0.54}, abs=TOL)
    # goodput needs every target met: TPOT is 60 ms for all, E2E 340 or 540 ms
    for slo, good in [(SLO(ttft=0.2, tpot=0.07), 2), (SLO(tpot=0.05), 0), (SLO(e2e=0.44), 2),
                      (SLO(ttft=0.2, e2e=0.3), 0), (SLO(ttft=0.4, tpot=0.07, e2e=0.6), 4)]:
        assert summarize_results(results, duration, slo).goodput * duration == pytest.approx(good)


@pytest.mark.parametrize("send_usage", [True, False])
def test_tpot_counts_the_tokens_of_the_usage_chunk(send_usage):
    # three chunks of two tokens: first at 100 ms, then 50 ms apart, so E2E - TTFT = 100 ms;
    # usage says 6 tokens: TPOT 100 / 5 = 20 ms; without usage the 3 chunks are the tokens: 100 / 2 = 50 ms
    with stand_in(ttfts=(0.1,), gaps=(0.05,), tokens_per_chunk=2, send_usage=send_usage) as server:
        results, duration = asyncio.run(run(config(server, num_prompts=1, random_output_len=6)))
    x = results[0].record
    assert x.itls == pytest.approx([0.05, 0.05], abs=TOL)
    assert x.num_output_tokens == (6 if send_usage else 3)
    assert x.tpot == pytest.approx(0.02 if send_usage else 0.05, abs=TOL / 2)
    assert results[0].generated_text == "ababab"


# ---- arrivals and concurrency -------------------------------------------------------------------
@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrival_gaps_have_the_rate_and_burstiness_asked_for(burstiness):
    cfg = BenchConfig("http://unused", "m", num_prompts=20000, request_rate=8.0, burstiness=burstiness,
                      random_input_len=1, random_output_len=1, seed=3)
    gaps = np.diff([r.arrival_time for r in cfg.workload().generate()])
    # gamma(shape k, mean 1/rate): coefficient of variation 1/sqrt(k); 1 for a Poisson process
    assert gaps.mean() == pytest.approx(1 / 8, rel=4 / math.sqrt(burstiness * len(gaps)))
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_random_lengths_and_token_ids():
    cfg = BenchConfig("http://unused", "m", num_prompts=4000, random_input_len=100, random_output_len=20,
                      random_range_ratio=0.5, random_vocab_size=50, seed=1)
    requests = cfg.workload().generate()
    prompt_lens = np.array([len(r.prompt_token_ids) for r in requests])
    output_lens = np.array([r.output_len for r in requests])
    assert prompt_lens.min() >= 50 and prompt_lens.max() <= 150 and prompt_lens.mean() == pytest.approx(100, abs=2)
    assert output_lens.min() >= 10 and output_lens.max() <= 30 and output_lens.mean() == pytest.approx(20, abs=0.5)
    assert {t for r in requests for t in r.prompt_token_ids} == set(range(50))
    assert requests == cfg.workload().generate()  # seeded
    assert all(r.arrival_time == 0 for r in requests)  # rate inf: all at once


def test_requests_are_sent_at_their_arrival_times():
    cfg_kwargs = dict(num_prompts=10, request_rate=20.0, random_output_len=1, seed=2)
    with stand_in(ttfts=(0.01,)) as server:
        cfg = config(server, **cfg_kwargs)
        results, _ = asyncio.run(run(cfg))
    arrivals = [r.arrival_time for r in cfg.workload().generate()]
    assert arrivals[-1] > 0.2  # the test would not see a sender that ignored the schedule otherwise
    assert [r.start_time for r in results] == pytest.approx(arrivals, abs=TOL)


def test_max_concurrency_caps_the_requests_in_flight():
    with stand_in(ttfts=(0.05,), gaps=(0.02,)) as server:
        results, _ = asyncio.run(run(config(server, num_prompts=12, max_concurrency=3, random_output_len=2)))
    assert all(r.record is not None for r in results)
    assert server.max_in_flight == 3  # all 12 arrive at once: the cap is reached, never passed
    events = sorted([(r.record.arrival, 1) for r in results] + [(r.record.finished, -1) for r in results])
    assert max(np.cumsum([d for _, d in events])) <= 3
    assert sum(r.queue_time > 0.04 for r in results) >= 9  # the 9 that waited for a slot


# ---- failures -----------------------------------------------------------------------------------
def test_failed_requests_are_counted_and_never_hang():
    faults = {1: "http500", 2: "disconnect", 3: "hang", 4: "no_done", 5: "error_event"}
    with stand_in(ttfts=(0.01,), gaps=(0.01,), faults=faults) as server:
        t = time.perf_counter()
        # one at a time, so the server's k-th request is the workload's k-th
        results, duration = asyncio.run(run(config(server, num_prompts=6, max_concurrency=1, random_output_len=3,
                                                   request_timeout=0.5)))
        assert time.perf_counter() - t < 3
    errors = [r.error for r in results]
    assert errors[0] == "" and results[0].record is not None
    assert "HTTP 500" in errors[1] and "boom" in errors[1]
    assert errors[2] and results[2].record is None  # the connection dropped mid-stream
    assert errors[3] == "timed out after 0.5 s"
    assert "without [DONE]" in errors[4] and "engine died" in errors[5]
    m = summarize_results(results, duration)
    assert (m.num_requests, m.num_failed, m.total_output_tokens, m.total_input_tokens) == (1, 5, 3, 8)
    assert "Failed requests:                         5" in sim_metrics.report(m)


# ---- the command line and the saved JSON ----------------------------------------------------------
VLLM_KEYS = {"date", "endpoint_type", "backend", "label", "model_id", "tokenizer_id", "num_prompts", "request_rate",
             "burstiness", "max_concurrency", "duration", "completed", "failed", "total_input_tokens",
             "total_output_tokens", "request_throughput", "request_goodput", "output_throughput",
             "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times",
             "queue_times", "generated_texts", "errors"} | {
    f"{stat}_{metric}_ms" for stat in ("mean", "median", "std", "p50", "p90", "p99")
    for metric in ("ttft", "tpot", "itl", "e2el")}


def test_command_line_prints_the_report_and_saves_vllms_keys(tmp_path):
    with stand_in(ttfts=(0.1, 0.3), gaps=(0.03, 0.09)) as server:
        # no --model: the client asks the server's /v1/models, as vLLM's does
        run_ = subprocess.run(
            [sys.executable, "-m", "minivllm.bench", "serve", "--base-url", f"http://127.0.0.1:{server.port}",
             "--num-prompts", "4", "--request-rate", "inf", "--max-concurrency", "4", "--random-input-len", "8",
             "--random-output-len", "5", "--seed", "0", "--goodput", "ttft:200", "tpot:70",
             "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99", "--save-result",
             "--result-dir", str(tmp_path / "out"), "--result-filename", "r.json"],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run_.returncode == 0, run_.stderr[-3000:]
    out = run_.stdout
    for line in ("============ Serving Benchmark Result ============", "Successful requests:                     4",
                 "Maximum request concurrency:             4", "---------------Time to First Token----------------",
                 "-----Time per Output Token (excl. 1st token)------", "P90 ITL (ms):", "Median E2EL (ms):",
                 "Request goodput (req/s):", "=" * 50):
        assert line in out, line
    assert "Request rate configured" not in out  # vLLM leaves it out for inf

    saved = json.loads((tmp_path / "out" / "r.json").read_text())
    assert set(saved) == VLLM_KEYS
    assert (saved["model_id"], saved["completed"], saved["failed"], saved["request_rate"], saved["max_concurrency"]) \
        == ("stand-in-model", 4, 0, "inf", 4)
    assert (saved["total_input_tokens"], saved["total_output_tokens"]) == (32, 20)
    assert saved["input_lens"] == [8] * 4 and saved["output_lens"] == [5] * 4 and saved["errors"] == [""] * 4
    d = saved["duration"]
    assert saved["request_goodput"] == pytest.approx(2 / d) and saved["request_throughput"] == pytest.approx(4 / d)
    # the summary keys are the per-request lists' statistics, in ms (their values against the schedule are
    # checked in-process above: a fresh process's first requests are slower to send under load)
    ttfts, itls, lat = np.array(saved["ttfts"]), np.concatenate(saved["itls"]), np.array(saved["latencies"])
    assert saved["mean_ttft_ms"] == pytest.approx(ttfts.mean() * 1e3)
    assert saved["std_itl_ms"] == pytest.approx(itls.std() * 1e3)
    assert saved["p90_e2el_ms"] == pytest.approx(np.percentile(lat, 90) * 1e3)
    assert saved["median_tpot_ms"] == pytest.approx(np.median((lat - ttfts) / 4) * 1e3)
    assert [len(x) for x in saved["itls"]] == [4] * 4


# ---- one table for the simulator and the bench ----------------------------------------------------
def step(i, start, end, chunks, finished=()):
    return StepRecord(step=i, start_time=start, end_time=end, chunks=tuple(ChunkRecord(*c) for c in chunks),
                      preempted=(), finished=tuple((rid, "length") for rid in finished), blocks_allocated=(),
                      blocks_freed=(), blocks_cache_hit=(), blocks_evicted=(), num_free_blocks=10,
                      num_cached_free_blocks=0, num_running=1, num_waiting=0, blocks=None)


# A arrives at 0 with 4 prompt tokens, B at 0.5 with 3; A's tokens come at 1, 2, 4, B's at 2, 4, 5
TRACE = [step(0, 0, 1, [("A", 0, 4, True, 7)]),
         step(1, 1, 2, [("A", 4, 1, False, 7), ("B", 0, 3, True, 7)]),
         step(2, 2, 4, [("A", 5, 1, False, 7), ("B", 3, 1, False, 7)], finished=["A"]),
         step(3, 4, 5, [("B", 4, 1, False, 7)], finished=["B"])]
MEASURED = [RequestRecord("A", 0.0, 1.0, 4.0, (1.0, 2.0, 4.0), 4, 3),
            RequestRecord("B", 0.5, 2.0, 5.0, (2.0, 4.0, 5.0), 3, 3)]
# `vllm bench serve`'s block for these numbers, written out: "{:<40} {:<10}" lines, 50-wide rules
EXPECTED = """\
============ Serving Benchmark Result ============
Successful requests:                     2         
Failed requests:                         0         
Benchmark duration (s):                  5.00      
Total input tokens:                      7         
Total generated tokens:                  6         
Request throughput (req/s):              0.40      
Request goodput (req/s):                 0.20      
Output token throughput (tok/s):         1.20      
Total token throughput (tok/s):          2.60      
---------------Time to First Token----------------
Mean TTFT (ms):                          1250.00   
Median TTFT (ms):                        1250.00   
P99 TTFT (ms):                           1495.00   
-----Time per Output Token (excl. 1st token)------
Mean TPOT (ms):                          1500.00   
Median TPOT (ms):                        1500.00   
P99 TPOT (ms):                           1500.00   
---------------Inter-token Latency----------------
Mean ITL (ms):                           1500.00   
Median ITL (ms):                         1500.00   
P99 ITL (ms):                            2000.00   
----------------End-to-end Latency----------------
Mean E2EL (ms):                          4250.00   
Median E2EL (ms):                        4250.00   
P99 E2EL (ms):                           4495.00   
=================================================="""


def test_the_simulator_and_the_bench_print_one_table_from_one_implementation():
    assert serve.summarize is sim_metrics.summarize and serve.report is sim_metrics.report
    assert serve.RequestRecord is sim_metrics.RequestRecord
    simulated = compute_metrics(TRACE, {"A": 0.0, "B": 0.5}, SLO(ttft=1.2))
    results = [RequestResult(x.request_id, x.num_prompt_tokens, 3, x.arrival, 0.0, x) for x in MEASURED]
    measured = summarize_results(results, 5.0, SLO(ttft=1.2))
    assert simulated.table() == sim_metrics.report(measured) == EXPECTED
    assert simulated.num_preemptions == 0 and measured.num_preemptions is None  # the only difference
    assert summarize(MEASURED, 5.0).table(("ttft",)).splitlines()[-2] == f"{'P99 TTFT (ms):':<40} {1495.0:<10.2f}"
