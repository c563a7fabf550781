"""The OpenAI-compatible FastAPI app (vLLM's conventions): completions, chat, models, LoRA
load/unload, health, Prometheus metrics. :func:`build_app` wires it to a :class:`ServeConfig`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.middleware.base import BaseHTTPMiddleware

from ..errors import HotswapError
from .config import ServeConfig, Served, build_runtime
from .engine import Engine
from .generation import BatchShape, Row
from .metrics import ServerMetrics
from .protocol import (
    ChatCompletionRequest, CompletionRequest, LoadLoraRequest, UnloadLoraRequest, error_body)

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class BodyLimit(BaseHTTPMiddleware):
    """Refuse bodies over ``limit`` bytes (413) before any handler reads them."""

    def __init__(self, app: Any, limit: int) -> None:
        super().__init__(app)
        self.limit = limit

    async def dispatch(self, request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return JSONResponse(error_body(413, f"request body over {self.limit} bytes"), 413)
        if length is None and request.method == "POST":
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.limit:
                    return JSONResponse(error_body(413, f"request body over {self.limit} bytes"), 413)
            request._body = body  # noqa: SLF001 - starlette reads it back from here
        return await call_next(request)


class Server:
    """The app's state: the engine, the metrics and how each request is turned into a row."""

    def __init__(self, config: ServeConfig, served: Served) -> None:
        self.config = config
        self.served = served
        self.shape = BatchShape(config.max_batch_size, config.max_prompt_tokens, config.max_new_tokens)
        self.engine = Engine(served.rt, served.tokenizer, self.shape, config.batch_wait_ms / 1e3,
                             compile=config.compile, on_batch=self._observe_batch,
                             mixed_batches=config.mixed_batches)
        self.metrics = ServerMetrics(self.engine)
        self.created = int(time.time())

    def _observe_batch(self, rows: list[Row], seconds: float) -> None:
        self.metrics.observe_batch(rows, seconds)

    def adapter_names(self) -> list[str]:
        return [info.name for info in self.served.rt.adapters()]

    def resolve_model(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (None: the base model); 404 otherwise."""
        if model == self.served.model_name:
            return None
        if model in self.adapter_names():
            return model
        raise ApiError(404, f"The model `{model}` does not exist.", "model")

    def make_row(self, body: CompletionRequest | ChatCompletionRequest, prompt: str,
                 emit) -> Row:
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported by this server", "logprobs")
        adapter = self.resolve_model(body.model)
        ids = self.served.tokenizer.encode(prompt)
        if len(ids) > self.shape.prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                                f"{self.shape.prompt_tokens} (--max-prompt-tokens)", "prompt")
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or 16
        if max_tokens > self.shape.new_tokens:
            raise ApiError(400, f"max_tokens={max_tokens} exceeds this server's limit of "
                                f"{self.shape.new_tokens} (--max-new-tokens)", "max_tokens")
        temperature = self.served.default_temperature if body.temperature is None else body.temperature
        return Row(ids, adapter, max_tokens, emit, temperature=temperature, top_p=body.top_p,
                   seed=body.seed, stop=body.stop_strings())

    async def generate(self, body, prompt: str, endpoint: str) -> AsyncIterator[tuple[str, Any]]:
        """Run one request: yields ``("token", text_delta)`` events, then one
        ``("finish", {"reason", "prompt_tokens", "completion_tokens"})``. Invalid requests raise
        :class:`ApiError` before anything is yielded."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        arrived = time.perf_counter()
        label = body.model if body.model == self.served.model_name or body.model in self.adapter_names() \
            else "<unknown>"  # no label per made-up model name
        status, error, row = 200, None, None
        try:
            row = self.make_row(body, prompt, lambda kind, value: loop.call_soon_threadsafe(
                events.put_nowait, (kind, value)))
            self.engine.submit(row)
            deadline = loop.time() + self.config.request_timeout_s
            first = True
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), deadline - loop.time())
                except asyncio.TimeoutError:
                    raise ApiError(408, f"the request took longer than {self.config.request_timeout_s} s")
                if kind == "error":
                    error = value
                elif kind == "finish":
                    if error is not None:
                        raise ApiError(500, str(error))
                    yield kind, {"reason": value, "prompt_tokens": len(row.prompt_ids),
                                 "completion_tokens": len(row.tokens)}
                    return
                else:
                    if first:
                        self.metrics.ttft.labels(label).observe(time.perf_counter() - arrived)
                        first = False
                    yield kind, value
        except ApiError as exc:
            status = exc.status
            raise
        finally:
            if row is not None:
                row.cancelled.set()  # a client that went away stops its row at the next token
                self.metrics.tokens.labels(label).inc(len(row.tokens))
            self.metrics.requests.labels(label, endpoint, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - arrived)


def build_app(config: ServeConfig | None = None, served: Served | None = None) -> FastAPI:
    """The FastAPI app for ``config``; the engine compiles and starts with the app's lifespan."""
    config = config or ServeConfig()
    served = served or build_runtime(config)
    server = Server(config, served)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(server.engine.start)
        yield
        await asyncio.to_thread(server.engine.stop)

    app = FastAPI(title="hotswap_rt", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.status, exc.message, exc.param), exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(400, f"malformed request: {first.get('msg', exc)}", where), 400)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        base = served.model_name
        card = {"object": "model", "created": server.created, "owned_by": "hotswap-rt",
                "max_model_len": config.max_prompt_tokens + config.max_new_tokens}
        data = [{"id": base, "root": base, "parent": None, **card}]
        data += [{"id": info.name, "root": info.source or info.name, "parent": base, **card}
                 for info in served.rt.adapters()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "send one prompt per request", "prompt")
        return await _respond(server, body, prompts[0], "completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        prompt = served.tokenizer.chat_prompt([m.model_dump() for m in body.messages])
        return await _respond(server, body, prompt, "chat", chat=True)

    if config.allow_runtime_adapter_updates:
        _add_adapter_routes(app, server)
    return app


async def _respond(server: Server, body, prompt: str, endpoint: str, chat: bool):
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    stream = server.generate(body, prompt, endpoint)
    if not body.stream:
        parts, finish = [], {}
        async for kind, value in stream:
            if kind == "token":
                parts.append(value)
            else:
                finish = value
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": finish["reason"]} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish["reason"]})
        return {"id": request_id, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": body.model, "choices": [choice], "usage": _usage(finish)}
    # Streaming: fail before the first byte if the request is invalid (400/404, not a stream).
    first = await _first_event(stream)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_sse(first, stream, request_id, created, body.model, chat, include_usage),
                             media_type="text/event-stream")


async def _first_event(stream: AsyncIterator) -> tuple[str, Any] | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


def _usage(finish: dict) -> dict[str, int]:
    return {"prompt_tokens": finish["prompt_tokens"], "completion_tokens": finish["completion_tokens"],
            "total_tokens": finish["prompt_tokens"] + finish["completion_tokens"]}


async def _sse(first, stream, request_id: str, created: int, model: str, chat: bool,
               include_usage: bool):
    """Server-sent events as OpenAI streams them; with ``include_usage`` a last chunk with empty
    ``choices`` carries the token counts."""
    kind_name = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, reason: str | None, role: bool = False) -> str:
        if chat:
            content = {"role": "assistant"} if role else ({"content": delta} if delta is not None else {})
            choice = {"index": 0, "delta": content, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
        payload = {"id": request_id, "object": kind_name, "created": created, "model": model,
                   "choices": [choice]}
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if chat:
            yield chunk(None, None, role=True)
        event = first
        while event is not None:
            kind, value = event
            yield chunk(value, None) if kind == "token" else chunk(None, value["reason"])
            if kind == "finish" and include_usage:
                payload = {"id": request_id, "object": kind_name, "created": created,
                           "model": model, "choices": [], "usage": _usage(value)}
                yield f"data: {json.dumps(payload)}\n\n"
            event = await _first_event(stream)
    except ApiError as exc:
        yield f"data: {json.dumps(error_body(exc.status, exc.message, exc.param))}\n\n"
    finally:
        await stream.aclose()
    yield "data: [DONE]\n\n"


def _add_adapter_routes(app: FastAPI, server: Server) -> None:
    root = Path(server.config.adapter_root).resolve()

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest):
        name = body.lora_name
        if name == server.served.model_name or name in server.adapter_names():
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name")
        path = Path(body.lora_path)
        path = (root / path if not path.is_absolute() else path).resolve()
        if path != root and root not in path.parents:
            raise ApiError(403, f"lora_path must lie under the adapter root {root}", "lora_path")
        future = server.engine.call(lambda rt: rt.load(name, path))
        try:
            await asyncio.wrap_future(future)
        except HotswapError as exc:
            raise ApiError(400, str(exc), "lora_path") from exc
        except Exception as exc:  # noqa: BLE001
            log.exception("loading %r failed", name)
            raise ApiError(500, f"loading {name!r} failed: {exc}") from exc
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest):
        name = body.lora_name
        if name not in server.adapter_names():
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
        future = server.engine.call(lambda rt: rt.unload(name, force=True))
        try:
            await asyncio.wrap_future(future)
        except HotswapError as exc:
            raise ApiError(400, str(exc), "lora_name") from exc
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
