"""The OpenAI-compatible FastAPI app (vLLM's conventions): completions, chat, models, LoRA
load/unload, health, Prometheus metrics.

:func:`create_app` puts the routes in front of any backend (:class:`~.backend.LocalBackend`
here, ``RayBackend`` for Ray Serve); :func:`build_app` is the single-process server.
"""

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

from .backend import ApiError, LocalBackend
from .config import ServeConfig, Served, build_runtime
from .metrics import RequestMetrics
from .protocol import (
    ChatCompletionRequest, CompletionRequest, LoadLoraRequest, UnloadLoraRequest, error_body)

log = logging.getLogger(__name__)
REPLICA_HEADER = "x-hotswap-replica"
RESIDENT_HEADER = "x-hotswap-adapter-resident"


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


def build_app(config: ServeConfig | None = None, served: Served | None = None) -> FastAPI:
    """The single-process server for ``config``; the engine compiles in the app's lifespan."""
    config = config or ServeConfig()
    backend = LocalBackend(config, served or build_runtime(config))
    app = create_app(backend, config, RequestMetrics(backend.collectors()),
                     startup=backend.start, shutdown=backend.stop)
    app.state.server = backend
    return app


def create_app(backend: Any, config: ServeConfig, metrics: RequestMetrics,
               startup=None, shutdown=None) -> FastAPI:
    """The routes over ``backend``; ``startup``/``shutdown`` run (in a thread) in the lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if startup is not None:
            await asyncio.to_thread(startup)
        yield
        if shutdown is not None:
            await asyncio.to_thread(shutdown)

    app = FastAPI(title="hotswap_rt", lifespan=lifespan)
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
    async def metrics_endpoint() -> Response:
        refresh = getattr(backend, "refresh_stats", None)  # remote figures (Ray replicas)
        if refresh is not None:
            await refresh()
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/stats")
    async def stats() -> dict:
        result = backend.stats()
        return await result if asyncio.iscoroutine(result) else result

    @app.get("/v1/models")
    async def models() -> dict:
        base = backend.model_name
        card = {"object": "model", "created": backend.created, "owned_by": "hotswap-rt",
                "max_model_len": config.max_prompt_tokens + config.max_new_tokens}
        data = [{"id": base, "root": base, "parent": None, **card}]
        data += [{"id": a["id"], "root": a["root"], "parent": base, **card}
                 for a in await backend.adapter_cards()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await _respond(backend, metrics, body, "completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        return await _respond(backend, metrics, body, "chat", chat=True)

    if config.allow_runtime_adapter_updates:
        _add_adapter_routes(app, backend, Path(config.adapter_root).resolve())
    return app


async def _measured(backend: Any, metrics: RequestMetrics, body, endpoint: str) -> AsyncIterator:
    """``backend.generate`` with the request metrics recorded around it."""
    arrived = time.perf_counter()
    label = body.model if await backend.knows(body.model) else "<unknown>"  # bounded labels
    status, tokens, first = 200, 0, True
    try:
        async for kind, value in backend.generate(body):
            if kind == "token" and first:
                metrics.ttft.labels(label).observe(time.perf_counter() - arrived)
                first = False
            if kind == "finish":
                tokens = value["completion_tokens"]
            yield kind, value
    except ApiError as exc:
        status = exc.status
        raise
    finally:
        metrics.requests.labels(label, endpoint, str(status)).inc()
        metrics.latency.labels(label).observe(time.perf_counter() - arrived)
        metrics.tokens.labels(label).inc(tokens)


async def _respond(backend: Any, metrics: RequestMetrics, body, endpoint: str, chat: bool):
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    stream = _measured(backend, metrics, body, endpoint)
    first = await _next_event(stream)  # errors before the first token are HTTP errors
    headers = {}
    if first is not None and first[0] == "replica":  # Ray Serve: which replica, was it warm
        headers[REPLICA_HEADER] = str(first[1]["id"])
        headers[RESIDENT_HEADER] = "true" if first[1]["resident"] else "false"
        first = await _next_event(stream)
    if not body.stream:
        parts, finish, event = [], {}, first
        while event is not None:
            kind, value = event
            if kind == "token":
                parts.append(value)
            elif kind == "finish":
                finish = value
            event = await _next_event(stream)
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": finish["reason"]} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish["reason"]})
        return JSONResponse({"id": request_id, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": body.model, "choices": [choice],
                             "usage": _usage(finish)}, headers=headers)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_sse(first, stream, request_id, created, body.model, chat, include_usage),
                             media_type="text/event-stream", headers=headers)


async def _next_event(stream: AsyncIterator) -> tuple[str, Any] | None:
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
            event = await _next_event(stream)
    except ApiError as exc:
        yield f"data: {json.dumps(error_body(exc.status, exc.message, exc.param))}\n\n"
    finally:
        await stream.aclose()
    yield "data: [DONE]\n\n"


def _add_adapter_routes(app: FastAPI, backend: Any, root: Path) -> None:
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest):
        name = body.lora_name
        if name == backend.model_name or await backend.knows(name):
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name")
        path = Path(body.lora_path)
        path = (root / path if not path.is_absolute() else path).resolve()
        if path != root and root not in path.parents:
            raise ApiError(403, f"lora_path must lie under the adapter root {root}", "lora_path")
        try:
            await backend.load_adapter(name, str(path))
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.exception("loading %r failed", name)
            raise ApiError(500, f"loading {name!r} failed: {exc}") from exc
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest):
        await backend.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
