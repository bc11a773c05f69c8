"""Chapter 11's lab: a live benchmark against a real OpenAI-compatible server.

The state (`ServingBench`) is one `vllm bench serve`-style run: the bench client's own `run`
(`minivllm.bench.serve`: its seeded `BenchConfig` workload, each request streamed and timed) in a
background thread, so a notebook's widgets stay live while it runs; its callbacks count the requests
as they go out and come back. While it runs, the server's ``/metrics`` page is scraped a few times a second; when it ends,
the requests' records are summarised and printed by the code the bench client and the simulator
share (`minivllm.sim.metrics`). *stop* sets the flag `run` honours: requests not yet sent are never
sent, and those in flight are cancelled (their connections close, so the server aborts
them and frees their KV blocks).

Given no server, the lab starts its own (`minivllm.entrypoints.openai.local.InProcessServer`).
"""
from __future__ import annotations

import asyncio
import html
import math
import re
import threading
import time
from dataclasses import dataclass, replace

import httpx2 as httpx
import ipywidgets as widgets

from minivllm.bench.serve import BenchConfig, RequestResult, run, summarize_results
from minivllm.entrypoints.openai.local import InProcessServer
from minivllm.lab.base import Lab, LabError, error_html
from minivllm.sim.metrics import Metrics, report


MAX_PROMPTS = 200  # a lab run on a CPU should end within minutes
MAX_RATE = 1000.0  # requests per second
PERCENTILES = (99.0,)  # and the median: p50
PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
STOP_GUARD_S = 60.0  # closing waits this long for a stopped run to wind down
DRAIN_WAIT_S = 2.0  # after a stop, how long the last scrape waits for the server to abort what was cancelled


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """A Prometheus text page as ``{sample name: value}``, each summed over its label sets (so
    ``vllm:request_success_total`` counts every finish reason); histogram buckets are left out,
    their ``_sum`` and ``_count`` kept."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m.group(1).endswith("_bucket"):
            continue
        values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(2))
    return values


# ---- the state ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServingSettings:
    request_rate: float = 8.0  # requests per second, Poisson arrivals
    num_prompts: int = 16
    max_concurrency: int = 0  # requests in flight at most; 0: no limit
    output_len: int = 32  # tokens per request (ignore_eos, so exactly this many)
    input_len: int = 64  # prompt tokens per request (random ids)
    seed: int = 0

    def check(self, max_model_len: int) -> None:
        """Refuse (`LabError`, naming the setting) what the bench or the server cannot run."""
        rate = self.request_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0 < rate <= MAX_RATE):
            raise LabError(f"request rate {rate!r} req/s must be above 0 and at most {MAX_RATE:g}")
        for name, low, high in (("num_prompts", 1, MAX_PROMPTS), ("max_concurrency", 0, None),
                                ("output_len", 1, None), ("input_len", 1, None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
                bound = f"between {low} and {high}" if high else f"an integer >= {low}"
                hint = " (0: no limit)" if name == "max_concurrency" else ""
                raise LabError(f"{name}={value!r} must be {bound}{hint}")
        if self.input_len + self.output_len > max_model_len:
            raise LabError(f"a {self.input_len}-token prompt and {self.output_len} output tokens do not fit the "
                           f"server's max_model_len={max_model_len}")

    def bench_config(self, base_url: str, model: str) -> BenchConfig:
        return BenchConfig(base_url, model, num_prompts=self.num_prompts, request_rate=float(self.request_rate),
                           max_concurrency=self.max_concurrency or None, random_input_len=self.input_len,
                           random_output_len=self.output_len, seed=self.seed)


class ServingBench:
    """A server, the bench settings in effect, and the last (or current) run against it.

    ``status`` is ``idle`` (nothing run yet), ``running``, ``stopping`` (stop asked, the sending loop
    not yet out), ``done``, ``stopped`` or ``failed`` (the bench itself broke: ``error`` says how).
    ``on_update`` (if set) is called from the bench's thread after every scrape of ``/metrics`` and
    once when the run ends."""

    def __init__(self, base_url: str, model: str | None = None, settings: ServingSettings | None = None,
                 *, poll_interval: float = 0.25):
        self.base_url = base_url.rstrip("/")
        info = httpx.get(f"{self.base_url}/v1/models", timeout=30).json()["data"][0]
        self.model = model or info["id"]
        self.max_model_len = int(info["max_model_len"])
        settings = settings or ServingSettings()
        settings.check(self.max_model_len)
        self.settings = settings
        self.poll_interval = poll_interval
        self.on_update = None
        self.status = "idle"
        self.error = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.config: BenchConfig | None = None  # the last run's
        self._reset()

    def _reset(self) -> None:
        self.num_sent = self.num_finished = self.num_failed = self.num_cancelled = 0
        self.results: list[RequestResult] = []
        self.metrics: Metrics | None = None
        self.report = ""
        self.baseline: dict[str, float] = {}
        self.live: dict[str, float] = {}
        self.started = self.duration = None

    # ---- actions ----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.status in ("running", "stopping")

    def update(self, **changes) -> None:
        """Change settings (between runs only); a refused change leaves the settings in effect."""
        if self.running:
            raise LabError("a bench is running with the settings shown: stop it, or let it end, before changing them")
        new = replace(self.settings, **changes)
        new.check(self.max_model_len)
        self.settings = new

    def start(self) -> None:
        """Start a run with the settings in effect, in a background thread."""
        if self.running:
            raise LabError("a bench is already running: stop it first")
        self._reset()
        self._stop.clear()
        self.status, self.error = "running", ""
        self.config = self.settings.bench_config(self.base_url, self.model)
        self._thread = threading.Thread(target=self._thread_main, name="minivllm-lab-bench", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the run to stop: no more requests are sent, those in flight are cancelled."""
        with self._lock:
            if not self.running:
                raise LabError("no bench is running")
            self._stop.set()
            self.status = "stopping"

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run to end; whether it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    @property
    def num_not_sent(self) -> int:
        return self.config.num_prompts - self.num_sent if self.status != "idle" else 0

    @property
    def num_in_flight(self) -> int:
        return self.num_sent - self.num_finished - self.num_failed - self.num_cancelled

    def since_start(self, name: str) -> float:
        """How much a server counter grew since the run started (as last scraped)."""
        return self.live.get(name, 0.0) - self.baseline.get(name, 0.0)

    # ---- the bench's thread -------------------------------------------------------------------
    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
            error = ""
        except Exception as e:  # noqa: BLE001 - the server went away, a bug: shown in the lab, not raised in a thread
            error = f"{type(e).__name__}: {e}"
        with self._lock:
            self.error = error
            self.status = "failed" if error else "stopped" if self._stop.is_set() else "done"
        self._notify()

    def _notify(self) -> None:
        if self.on_update is not None:
            self.on_update()

    async def _main(self) -> None:
        config = self.config
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:  # for /metrics
            self.baseline = self.live = await self._scrape(client)
            poller = asyncio.create_task(self._poll(client))
            self.started = time.monotonic()
            results, self.duration = await run(config, stop=self._stop, on_sent=self._sent, on_result=self._answered)
            with self._lock:
                self.num_cancelled = self.num_sent - len(results)
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
            self.live = await self._scrape(client)
            if self.num_cancelled:  # the server aborts them as it notices the closed connections
                deadline = time.monotonic() + DRAIN_WAIT_S
                while self._busy(self.live) and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                    self.live = await self._scrape(client)
        if any(r.record is not None for r in self.results):
            self.metrics = summarize_results(self.results, self.duration, percentiles=PERCENTILES)
            self.report = report(self.metrics, PERCENTILE_METRICS, max_concurrency=config.max_concurrency,
                                 request_rate=config.request_rate)

    def _sent(self) -> None:
        with self._lock:
            self.num_sent += 1

    def _answered(self, result: RequestResult) -> None:
        with self._lock:
            self.results.append(result)
            if result.record is None:
                self.num_failed += 1
            else:
                self.num_finished += 1

    async def _scrape(self, client) -> dict[str, float]:
        response = await client.get(f"{self.base_url}/metrics")
        response.raise_for_status()
        return parse_metrics(response.text)

    @staticmethod
    def _busy(metrics: dict[str, float]) -> bool:
        return metrics.get("vllm:num_requests_running", 0) + metrics.get("vllm:num_requests_waiting", 0) > 0

    async def _poll(self, client) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self.live = await self._scrape(client)
            self._notify()


# ---- the widget ---------------------------------------------------------------------------------
CONTROLS = {"request_rate": "req/s", "num_prompts": "prompts", "max_concurrency": "max concurrency",
            "output_len": "output tokens"}


class ServingLab(Lab):
    """Choose a request rate, a number of prompts, a concurrency cap and an output length; *start*
    benchmarks the server in the background (live numbers from its ``/metrics``), *stop* ends the
    run early. Without ``base_url`` the lab serves the course model itself (`close` stops it)."""

    def __init__(self, base_url: str | None = None, model: str | None = None,
                 settings: ServingSettings | None = None, *, poll_interval: float = 0.25):
        self.server = None
        if base_url is None:
            from minivllm import course
            self.server = InProcessServer.launch(course.model_path("target"), "course", max_model_len=512)
            base_url = self.server.url
        self.state = ServingBench(base_url, model, settings, poll_interval=poll_interval)
        s = self.state.settings
        self.request_rate = widgets.FloatText(value=s.request_rate, description=CONTROLS["request_rate"])
        self.num_prompts = widgets.IntText(value=s.num_prompts, description=CONTROLS["num_prompts"])
        self.max_concurrency = widgets.IntText(value=s.max_concurrency, description=CONTROLS["max_concurrency"])
        self.output_len = widgets.IntText(value=s.output_len, description=CONTROLS["output_len"])
        self.start_button = widgets.Button(description="start", button_style="success")
        self.stop_button = widgets.Button(description="stop", button_style="danger")
        controls = [self.on_change(getattr(self, name), lambda v, name=name: self.state.update(**{name: v}))
                    for name in CONTROLS]
        buttons = [self.on_click(self.start_button, self.state.start), self.on_click(self.stop_button, self.state.stop)]
        super().__init__([controls[:2], controls[2:] + buttons])
        self.state.on_update = self._live

    # ---- from code: what the buttons do ----------------------------------------------------------
    def start(self) -> None:
        self.start_button.click()

    def stop(self) -> None:
        self.stop_button.click()

    def run(self, timeout: float | None = None) -> Metrics | None:
        """*start*, then wait for the run to end (blocking: for a notebook driving the lab); the
        run's metrics (None if no request finished). A refused start raises `LabError`."""
        self.start()
        if not self.state.running and self.error_message:
            raise LabError(self.error_message)
        self.state.wait(timeout)
        self.refresh()
        return self.state.metrics

    def close(self) -> None:
        """Stop a run in progress and, if the lab started its own server, that server."""
        if self.state.running:
            self.state.stop()
            self.state.wait(STOP_GUARD_S)
        if self.server is not None:
            self.server.close()

    # ---- view ------------------------------------------------------------------------------------
    def refresh(self) -> None:
        super().refresh()
        self._sync_buttons()

    def _live(self) -> None:
        """The bench thread's update: the view and the buttons only (an error shown stays)."""
        self.view.value = self.render()
        self._sync_buttons()

    def _sync_buttons(self) -> None:
        running = self.state.running
        self.start_button.disabled, self.stop_button.disabled = running, not running

    def render(self) -> str:
        st, s = self.state, self.state.settings
        limit = s.max_concurrency or "none"
        head = (f"<p><b>{s.num_prompts} requests</b> of {s.input_len} random prompt tokens and {s.output_len} "
                f"output tokens each, Poisson arrivals at <b>{s.request_rate:g} req/s</b>, max concurrency "
                f"<b>{limit}</b>; server model <code>{html.escape(st.model)}</code> "
                f"(max_model_len {st.max_model_len})</p>")
        if st.status == "idle":
            return head + "<p>status: <b>idle</b>: press <i>start</i></p>"
        elapsed = st.duration if st.duration is not None else (
            time.monotonic() - st.started if st.started is not None else 0.0)
        status = (f"<p>status: <b>{st.status}</b> &middot; sent {st.num_sent} of {st.config.num_prompts}, "
                  f"finished {st.num_finished}, failed {st.num_failed}, in flight {st.num_in_flight}"
                  + (f", cancelled {st.num_cancelled}, never sent {st.num_not_sent}" if st._stop.is_set() else "")
                  + f" &middot; {elapsed:.1f} s</p>")
        if st.error:
            status += error_html(st.error)
        if st.report:
            result = f"<pre>{html.escape(st.report)}</pre>"
        else:
            result = "" if st.running else "<p>no request finished, so there is no report</p>"
        return head + status + self._live_table() + result

    def _live_table(self) -> str:
        st = self.state
        if not st.live:
            return ""
        ttft_n = st.since_start("vllm:time_to_first_token_seconds_count")
        ttft = st.since_start("vllm:time_to_first_token_seconds_sum") / ttft_n * 1e3 if ttft_n else math.nan
        rows = [("requests running", f"{st.live.get('vllm:num_requests_running', 0):.0f}"),
                ("requests waiting", f"{st.live.get('vllm:num_requests_waiting', 0):.0f}"),
                ("KV cache usage", f"{100 * st.live.get('vllm:kv_cache_usage_perc', 0):.1f} %"),
                ("tokens generated, this run", f"{st.since_start('vllm:generation_tokens_total'):.0f}"),
                ("requests finished, this run", f"{st.since_start('vllm:request_success_total'):.0f}"),
                ("mean TTFT in the server, this run", "-" if math.isnan(ttft) else f"{ttft:.1f} ms")]
        body = "".join(f"<tr><td>{k}</td><td style='text-align:right'>{v}</td></tr>" for k, v in rows)
        return f"<table><tr><th>server's /metrics</th><th></th></tr>{body}</table>"


__all__ = ["ServingBench", "ServingLab", "ServingSettings", "parse_metrics"]
