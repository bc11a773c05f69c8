"""The OpenAI-compatible server on uvicorn in a thread of this process, on a free 127.0.0.1 port:
what chapter 11's lab, exercise 11's check and the tests serve with (``minivllm serve`` is the same
app in a process of its own)."""
from __future__ import annotations

import threading
import time

import httpx2 as httpx
import uvicorn

from minivllm.engine.async_llm import AsyncLLM
from minivllm.entrypoints.openai.api_server import build_app
from minivllm.executor.multiproc import free_port

STARTUP_GUARD_S = 60  # not a performance bound: a server that never comes up must not hang its caller


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
        deadline = time.monotonic() + STARTUP_GUARD_S
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.close()
                raise RuntimeError(f"the server at {self.url} did not come up")
            time.sleep(0.05)

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
