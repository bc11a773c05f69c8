"""The server's Prometheus metrics, with vLLM's names and meanings (``vllm:`` prefix, so dashboards
built for vLLM read them). The gauges read the engine's queues and block manager when scraped; the
counters and histograms are filled in the engine thread after every step, from the outputs the step
made. Each server has its own registry."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from minivllm.engine.llm_engine import LLMEngine
from minivllm.outputs import RequestOutput

disable_created_metrics()  # no ``*_created`` series beside every counter (vLLM turns them off too)

# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, model_name: str, replicas: list[LLMEngine]):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        r, names = self.registry, ["model_name"]

        def gauge(name, doc):
            return Gauge(name, doc, names, registry=r).labels(**labels)

        def counter(name, doc):
            return Counter(name, doc, names, registry=r).labels(**labels)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, names, buckets=buckets, registry=r).labels(**labels)

        # read when scraped: plain ints of the engine's, safe to read from the server's thread
        gauge("vllm:num_requests_running", "Requests running (holding KV blocks).").set_function(
            lambda: sum(len(e.scheduler.running) for e in replicas))
        gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.").set_function(
            lambda: sum(len(e.scheduler.waiting) for e in replicas))
        gauge("vllm:kv_cache_usage_perc", "Share of KV blocks held by requests (1 = full).").set_function(
            lambda: sum(e.block_manager.num_used_blocks for e in replicas)
            / sum(e.block_manager.num_blocks for e in replicas))
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of the requests that got their first token.")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache "
                                                                   "(counted when a request finishes).")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache "
                                                             "(counted when a request finishes).")
        self.success = Counter("vllm:request_success", "Samples finished (n per request), by finish reason.",
                               names + ["finished_reason"], registry=r)
        self.model_name = model_name
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time from arrival to first token.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between a request's outputs "
                                                                 "(per token within one output).", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             REQUEST_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds", "Time from arrival to first scheduling.",
                                    REQUEST_BUCKETS)
        self._last_output_time: dict[str, float] = {}
        self._num_samples: dict[str, int] = {}  # n, as far as the outputs so far show it

    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        """An `AsyncLLM` listener: the outputs of one step or abort."""
        now = time.time()
        for out in outputs:
            new_tokens = sum(len(c.token_ids) for c in out.outputs)
            self.generation_tokens.inc(new_tokens)
            m, last = out.metrics, self._last_output_time.get(out.request_id)
            if last is None and m.first_token_time is not None:  # its first output: the prompt is in
                self.prompt_tokens.inc(len(out.prompt_token_ids))
                self.ttft.observe(m.first_token_time - m.arrival_time)
                if m.first_scheduled_time is not None:
                    self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
            elif last is not None and new_tokens:
                for _ in range(new_tokens):  # speculative decoding hands out several tokens at once
                    self.itl.observe((now - last) / new_tokens)
            self._last_output_time[out.request_id] = now
            n = self._num_samples[out.request_id] = max([self._num_samples.get(out.request_id, 0)]
                                                        + [c.index + 1 for c in out.outputs])
            if out.finished:
                del self._last_output_time[out.request_id], self._num_samples[out.request_id]
                for c in out.outputs:
                    if c.finish_reason is not None:
                        self.success.labels(self.model_name, c.finish_reason).inc()
                self.e2e.observe(m.finished_time - m.arrival_time)
                self.prefix_queries.inc(n * len(out.prompt_token_ids))  # each sample looks its prompt up
                self.prefix_hits.inc(m.num_cached_tokens)
