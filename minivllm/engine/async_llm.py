"""`AsyncLLM`: the engine behind a server. The same `LLMEngine` steps in a thread of its own while
there is work, and every request gets an asyncio stream of its outputs.

The engine is not thread-safe and a step holds the CPU (or waits on the GPU) for milliseconds to
seconds, so the event loop never calls it: it posts commands (add a request, abort one) to the
engine thread, which runs them between steps, and the engine thread hands each step's outputs back
to the loop. A request whose consumer goes away (a client that disconnected) is aborted at once, and
its KV blocks return to the pool in the engine's next pass.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from typing import AsyncIterator, Callable

from minivllm.config.engine import EngineConfig
from minivllm.engine.data_parallel import DataParallelEngine
from minivllm.engine.llm_engine import LLMEngine, PromptType
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams

OutputListener = Callable[[list[RequestOutput]], None]


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an error; the server cannot serve any more."""


class AsyncLLM:
    def __init__(self, engine: LLMEngine | DataParallelEngine, max_trace_steps: int = 10_000):
        if not isinstance(max_trace_steps, int) or max_trace_steps < 1:
            raise ValueError(f"max_trace_steps={max_trace_steps!r} must be an int >= 1")
        self.engine = engine
        self.replicas: list[LLMEngine] = getattr(engine, "replicas", [engine])
        self.tokenizer = engine.tokenizer
        self.max_trace_steps = max_trace_steps  # a long-running server keeps only the last steps
        self.listeners: list[OutputListener] = []  # called in the engine thread with all outputs (metrics)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self.dead_because: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="minivllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_args(cls, model: str, max_trace_steps: int = 10_000, **engine_args) -> "AsyncLLM":
        config = EngineConfig.from_args(model, **engine_args)
        engine = DataParallelEngine(config) if config.parallel_config.data_parallel_size > 1 else LLMEngine(config)
        return cls(engine, max_trace_steps)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.dead_because is None

    # ---- the event loop's side -----------------------------------------------------------------
    async def generate(self, request_id: str, prompt: PromptType, params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """The request's outputs as the engine makes them (as ``params.output_kind`` asks: a server
        asks for DELTA), until one is ``finished``. A bad request raises ValueError before the first
        output. Leaving the loop early (the consumer was cancelled) aborts the request."""
        if not self.is_running:
            raise EngineDeadError(f"the engine has stopped: {self.dead_because!r}")
        if request_id in self._streams:
            raise ValueError(f"request_id={request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._post(("add", request_id, prompt, params))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._post(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def shutdown(self) -> None:
        """Stop the engine thread (requests still running end with an error), then free the model."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self.engine.close()

    def _post(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand ``(request_id, output or error)`` pairs to their streams, one wake-up per event loop
        (not one per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput | BaseException]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:  # else its consumer has gone: an abort is on its way
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, pairs in by_loop.items():
            loop.call_soon_threadsafe(_put_all, pairs)

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._run_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                for replica in self.replicas:
                    if len(replica.trace) > 2 * self.max_trace_steps:  # trim now and then, not every step
                        del replica.trace[:-self.max_trace_steps]
                self._publish(outputs)
        except BaseException as e:  # a worker died, a bug: every waiting request hears of it
            self.dead_because = e
            raise
        finally:
            why = f"the engine stopped: {self.dead_because!r}" if self.dead_because else "the engine was shut down"
            self._deliver([(request_id, EngineDeadError(why)) for request_id in list(self._streams)])

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt, params = command
                if request_id not in self._streams:
                    continue  # its consumer left before the engine saw it
                try:
                    self.engine.add_sequences(self.engine.make_request(request_id, prompt, params))
                except ValueError as e:  # a bad request: only its sender hears of it
                    self._deliver([(request_id, e)])
            else:
                self._publish(self.engine.abort_request(command[1]))

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """Outputs of a step or of an abort: to the listeners (metrics), then to their streams."""
        for listener in self.listeners:
            listener(outputs)
        self._deliver([(out.request_id, out) for out in outputs])


def _put_all(pairs: list[tuple[asyncio.Queue, RequestOutput | BaseException]]) -> None:
    for stream, item in pairs:
        stream.put_nowait(item)
