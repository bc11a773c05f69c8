"""An OpenAI-compatible HTTP server on `AsyncLLM`: ``/v1/completions`` and ``/v1/chat/completions``
(streamed as Server-Sent Events or not), ``/v1/models``, ``/tokenize``, ``/detokenize``, ``/health``
and ``/metrics``, in vLLM's shapes.

One request's path: the handler validates the body (pydantic, then `SamplingParams`), asks
`AsyncLLM.generate` for DELTA outputs, and either streams each as a ``data: {...}`` chunk or adds
them up into one response. A bad request gets a 400 naming the field and never reaches the engine's
batch; a client that goes away mid-request has its request aborted at once.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from minivllm.engine.async_llm import AsyncLLM, EngineDeadError
from minivllm.entrypoints.metrics import ServerMetrics
from minivllm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                  SamplingFields, TokenizeRequest)
from minivllm.llm import chat_prompt
from minivllm.outputs import CompletionOutput, RequestOutput


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               503: "service_unavailable"}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                                   "param": param, "code": status}}, status_code=status)


def param_of(message: str) -> str | None:
    """The field a ValueError names: ``SamplingParams.max_tokens=0 ...`` or ``prompt=... ``."""
    m = re.match(r"(?:\w+\.)?(\w+)[=\[ ]", message)
    return m.group(1) if m else None


def build_app(llm: AsyncLLM, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="minivllm")
    metrics = ServerMetrics(model_name, llm.replicas)
    llm.listeners.append(metrics.on_outputs)
    app.state.llm, app.state.metrics = llm, metrics
    tokenizer = llm.tokenizer
    max_model_len = llm.replicas[0].max_model_len

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        return error_response(400, f"{'.'.join(loc) or 'body'}: {first.get('msg')}", loc[0] if loc else None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(ValueError)
    async def refused(request: Request, exc: ValueError):
        return error_response(400, str(exc), param_of(str(exc)))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, exc: EngineDeadError):
        return error_response(503, str(exc))

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"The model `{name}` does not exist (this server serves `{model_name}`)", "model")

    @app.get("/health")
    async def health():
        return Response(status_code=200 if llm.is_running else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "minivllm", "max_model_len": max_model_len}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send exactly one of prompt, messages", "prompt")
        if req.messages is not None:
            ids = chat_prompt(tokenizer, [m.model_dump() for m in req.messages],
                              add_generation_prompt=req.add_generation_prompt)["prompt_token_ids"]
        else:
            ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        check_model(req.model)
        prompt = req.single_prompt()
        params = req.sampling_params(req.max_tokens if req.max_tokens is not None else 16, req.logprobs)
        return await respond(raw, req, f"cmpl-{uuid.uuid4().hex}", "text_completion",
                             prompt if isinstance(prompt, str) else {"prompt_token_ids": prompt}, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        check_model(req.model)
        prompt = chat_prompt(tokenizer, [m.model_dump() for m in req.messages], req.chat_template,
                             req.add_generation_prompt)
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, max_model_len - len(prompt["prompt_token_ids"]))
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = req.sampling_params(max_tokens, top)
        return await respond(raw, req, f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", prompt, params, chat=True)

    async def respond(raw: Request, req: SamplingFields, request_id: str, kind: str, prompt, params, *, chat: bool):
        outputs = llm.generate(request_id, prompt, params)
        first = await anext(outputs)  # a refused request raises ValueError here: a 400, nothing streamed
        reply = Reply(request_id, kind, model_name, chat, params.logprobs or 0)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(reply.stream(first, outputs, include_usage), media_type="text/event-stream")
        whole = asyncio.ensure_future(reply.collect(first, outputs))
        gone = asyncio.ensure_future(_disconnected(raw))
        await asyncio.wait({whole, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not whole.done():  # the client left: cancelling closes the outputs, which aborts the request
            whole.cancel()
            await asyncio.gather(whole, return_exceptions=True)
            return Response(status_code=499)
        gone.cancel()
        return whole.result()

    return app


async def _disconnected(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


class Reply:
    """One request's response: its DELTA outputs turned into OpenAI chunks, or added up."""

    def __init__(self, request_id: str, kind: str, model_name: str, chat: bool, top_k: int):
        self.request_id, self.kind, self.model_name, self.chat = request_id, kind, model_name, chat
        self.top_k = top_k  # chat: how many alternatives each token's logprobs list
        self.created = int(time.time())
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.role_sent: set[int] = set()

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def _each(self, first: RequestOutput, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """``first`` and the outputs after it up to the finished one, counted for ``usage``. However
        the caller leaves (a disconnect cancels it), ``outputs`` is closed at once, and closing an
        unfinished request's outputs aborts it."""
        try:
            out = first
            while True:
                self.prompt_tokens = len(out.prompt_token_ids)
                self.completion_tokens += sum(len(c.token_ids) for c in out.outputs)
                yield out
                if out.finished:
                    return
                out = await anext(outputs)
        finally:
            await outputs.aclose()

    # ---- streamed -----------------------------------------------------------------------------
    async def stream(self, first: RequestOutput, outputs: AsyncIterator[RequestOutput],
                     include_usage: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        async for out in self._each(first, outputs):
            for c in out.outputs:
                yield _sse({**self._header(), "object": kind, "choices": [self._choice(c, streamed=True)]})
        if include_usage:
            yield _sse({**self._header(), "object": kind, "choices": [], "usage": self.usage()})
        yield "data: [DONE]\n\n"

    # ---- whole --------------------------------------------------------------------------------
    async def collect(self, first: RequestOutput, outputs: AsyncIterator[RequestOutput]) -> dict:
        parts: dict[int, list[CompletionOutput]] = {}
        async for out in self._each(first, outputs):
            for c in out.outputs:
                parts.setdefault(c.index, []).append(c)
        choices = [self._choice(merge(parts[i]), streamed=False) for i in sorted(parts)]
        return {**self._header(), "object": self.kind, "choices": choices, "usage": self.usage()}

    def _header(self) -> dict:
        return {"id": self.request_id, "created": self.created, "model": self.model_name}

    def _choice(self, c: CompletionOutput, streamed: bool) -> dict:
        """One sample's choice: its text (a chat message, or a chat delta when streamed, the first
        of a sample naming the role), logprobs and finish."""
        if not self.chat:
            body = {"text": c.text, "logprobs": completion_logprobs(c)}
        elif streamed:
            delta = {"content": c.text}
            if c.index not in self.role_sent:
                self.role_sent.add(c.index)
                delta = {"role": "assistant", **delta}
            body = {"delta": delta, "logprobs": chat_logprobs(c, self.top_k)}
        else:
            body = {"message": {"role": "assistant", "content": c.text}, "logprobs": chat_logprobs(c, self.top_k)}
        return {"index": c.index, **body, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}


def merge(deltas: list[CompletionOutput]) -> CompletionOutput:
    """One sample's DELTA outputs added up."""
    last = deltas[-1]
    logprobs = None if last.logprobs is None else [r for d in deltas for r in d.logprobs]
    return CompletionOutput(last.index, "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids],
                            last.finish_reason, last.stop_reason, last.cumulative_logprob, logprobs)


def completion_logprobs(c: CompletionOutput) -> dict | None:
    """The legacy completions API's shape: the tokens, their logprobs, the top-k of each position
    (and the token itself, as vLLM adds it), and each token's offset in the text."""
    if c.logprobs is None:
        return None
    tokens, values, tops, offsets, offset = [], [], [], [], 0
    for token_id, report in zip(c.token_ids, c.logprobs):
        chosen = report[token_id]
        tokens.append(chosen.decoded_token)
        values.append(chosen.logprob)
        tops.append({lp.decoded_token: lp.logprob for lp in report.values()})
        offsets.append(offset)
        offset += len(chosen.decoded_token or "")
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(c: CompletionOutput, top_k: int) -> dict | None:
    """The chat API's shape: per token, its text, logprob and UTF-8 bytes, and the ``top_k`` most
    likely tokens at its position."""
    if c.logprobs is None:
        return None

    def entry(lp) -> dict:
        text = lp.decoded_token or ""
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode())}

    content = []
    for token_id, report in zip(c.token_ids, c.logprobs):
        top = sorted(report.values(), key=lambda lp: lp.rank)[:top_k]  # the report adds the token itself
        content.append({**entry(report[token_id]), "top_logprobs": [entry(lp) for lp in top]})
    return {"content": content}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
