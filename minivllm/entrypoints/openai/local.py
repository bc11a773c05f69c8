"""The OpenAI-compatible server on a free 127.0.0.1 port, started from Python: in a thread of this
process (`InProcessServer`: chapter 11's lab, exercise 11's check, the tests) or as ``minivllm serve``
in a process of its own (`serve_process`: the tests, the serving benchmark)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

import httpx2 as httpx
import uvicorn

from minivllm.engine.async_llm import AsyncLLM
from minivllm.entrypoints.openai.api_server import build_app
from minivllm.executor.multiproc import free_port

STARTUP_GUARD_S = 120  # not a performance bound: a server that never comes up must not hang its caller


def wait_until_healthy(url: str, is_alive: Callable[[], bool]) -> None:
    """Poll ``url``/health until it answers 200; RuntimeError once ``is_alive()`` is False or
    ``STARTUP_GUARD_S`` have passed."""
    deadline = time.monotonic() + STARTUP_GUARD_S
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or not is_alive():
            raise RuntimeError(f"the server at {url} did not come up")
        time.sleep(0.05)


@contextlib.contextmanager
def serve_process(*args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """``minivllm serve ARGS`` in a process of its own on a free port; yields its URL once healthy,
    and terminates it on leaving."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minivllm", "serve", "--port", str(port), *args],
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, lambda: proc.poll() is None)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


class InProcessServer:
    """The OpenAI-compatible server on ``llm``, served by uvicorn in a thread of this process on a
    free 127.0.0.1 port. ``close()`` stops it (and shuts ``llm`` down if the server owns it)."""

    def __init__(self, llm: AsyncLLM, model_name: str = "course", *, owns_llm: bool = False):
        self.llm, self.model_name, self.owns_llm = llm, model_name, owns_llm
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(build_app(llm, model_name), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="minivllm-server", daemon=True)
        self.thread.start()
        try:
            wait_until_healthy(self.url, self.thread.is_alive)
        except RuntimeError:
            self.close()
            raise

    @classmethod
    def launch(cls, model: str, model_name: str = "course", **engine_args) -> "InProcessServer":
        """Build an `AsyncLLM` on ``model`` (``engine_args`` as `LLM`'s) and serve it; the server owns it."""
        llm = AsyncLLM.from_args(model, **engine_args)
        try:
            return cls(llm, model_name, owns_llm=True)
        except BaseException:
            llm.shutdown()
            raise

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(STARTUP_GUARD_S)
        if self.owns_llm:
            self.owns_llm = False
            self.llm.shutdown()

    def __enter__(self) -> "InProcessServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
