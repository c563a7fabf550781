"""The OpenAI-compatible FastAPI app (vLLM's conventions): completions, chat, models, LoRA
load/unload, health, Prometheus metrics.

:func:`create_app` puts the routes in front of any :class:`~.protocol.Backend`
(:class:`~.backend.LocalBackend` here, ``RayBackend`` for Ray Serve); :func:`build_app` is the
single-process server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .backend import LocalBackend
from .config import ServeConfig
from .metrics import RequestMetrics
from .model import Served, build_runtime
from .answers import AnswerPlan, AnswerStream, answer_plan
from .protocol import (
    ApiError, Backend, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, GenerationRequest,
    LoadLoraRequest, TokenizeRequest, UnloadLoraRequest, error_body, next_event)
from .responses import ResponsesRequest, ResponseStore, chat_request, respond, responses_error

log = logging.getLogger(__name__)
REPLICA_HEADER = "x-hotswap-replica"
RESIDENT_HEADER = "x-hotswap-adapter-resident"


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes gets 413: at once by its ``content-length``,
    or as soon as it streams past the limit (the handler reading it gets an HTTP 413 error)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            body = json.dumps(error_body(413, self._message())).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, counting_receive, send)

    def _message(self) -> str:
        return f"request body over {self.limit} bytes"


class ApiKeys:
    """ASGI middleware: ``/v1/*``, ``/stats``, ``/tokenize`` and ``/detokenize`` need
    ``Authorization: Bearer <key>`` with one of ``keys`` (401 otherwise); loading and unloading
    adapters need one of ``admin_keys`` when given. Keys are compared in constant time."""

    ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
    OTHER_PATHS = ("/stats", "/tokenize", "/detokenize")

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], admin_keys: tuple[str, ...]) -> None:
        self.app, self.keys, self.admin_keys = app, keys, admin_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/v1/") or path in self.OTHER_PATHS):
            keys = self.admin_keys if self.admin_keys and path in self.ADMIN_PATHS else self.keys
            if keys and not self._allowed(scope, keys):
                body = json.dumps(error_body(401, "Incorrect or missing API key: send "
                                                  "'Authorization: Bearer <key>'")).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _allowed(scope: Scope, keys: tuple[str, ...]) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return any(hmac.compare_digest(token.strip().encode(), key.encode()) for key in keys)


class RequestId:
    """ASGI middleware: every response carries ``x-request-id`` (the client's, or a new one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id")
        request_id = given[:200] if given else uuid.uuid4().hex.encode()

        async def with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, with_header)


def build_app(config: ServeConfig | None = None, served: Served | None = None) -> FastAPI:
    """The single-process server for ``config``; the engine compiles in the app's lifespan."""
    config = config or ServeConfig()
    backend = LocalBackend(config, served or build_runtime(config), rebuildable=served is None)
    app = create_app(backend, config, RequestMetrics(backend.collectors()),
                     startup=backend.start, shutdown=backend.stop)
    app.state.server = backend
    return app


def create_app(backend: Backend, config: ServeConfig, metrics: RequestMetrics,
               startup: Callable[[], None] | None = None,
               shutdown: Callable[[], None] | None = None) -> FastAPI:
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
    app.add_middleware(ApiKeys, keys=config.api_keys, admin_keys=config.admin_api_keys)
    app.add_middleware(RequestId)  # outermost: 401 and 413 carry it too

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.status, exc.message, exc.param), exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = f"Not Found: {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        # the deepest error: of a union's members, the one the body came closest to
        first = max(exc.errors(), key=lambda error: len(error.get("loc", ())), default={})
        where = _field_path(first.get("loc", ())[1:])
        if first.get("type") == "extra_forbidden":
            return JSONResponse(error_body(400, f"{where} is not supported by this server", where), 400)
        return JSONResponse(error_body(400, f"malformed request: {first.get('msg', exc)}", where), 400)

    @app.get("/version")
    async def version() -> dict:
        from .. import __version__

        return {"version": __version__}

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        await backend.refresh_stats()
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/stats")
    async def stats() -> dict:
        result = backend.stats()
        return await result if asyncio.iscoroutine(result) else result

    @app.get("/v1/models")
    async def models() -> dict:
        base = backend.model_name
        card = {"object": "model", "created": backend.created, "owned_by": "hotswap-rt",
                "max_model_len": backend.max_model_len}
        data = [{"id": base, "root": base, "parent": None, **card}]
        data += [{"id": a["id"], "root": a["root"], "parent": base, **card}
                 for a in await backend.adapter_cards()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await _respond(backend, metrics, body, "completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        return await _respond(backend, metrics, body, "chat", chat=True, parsers=(
            config.auto_tool_parser(), config.reasoning_parser))

    stored = ResponseStore()

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest):
        history = stored.conversation(body.previous_response_id, "previous_response_id") \
            if body.previous_response_id else []
        chat, conversation = chat_request(body, history)
        stream = _measured(backend, metrics, chat, "responses")
        try:
            first, headers, prompt = await _opening(stream)
        except ApiError as exc:
            raise responses_error(exc) from None
        return await respond(body, chat, conversation, first, stream, prompt, headers, stored,
                             (config.auto_tool_parser(), config.reasoning_parser))

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> dict:
        return stored.response(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict:
        stored.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    async def known(model: str | None) -> None:
        """A named ``model`` must be the base model or an adapter (as the backend knows them:
        with Ray, the adapter directory, not what one replica holds)."""
        if model is not None and not await backend.knows(model):
            raise ApiError(404, f"The model `{model}` does not exist.", "model")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        await known(body.model)
        return await backend.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        await known(body.model)
        return await backend.detokenize(body)

    if config.allow_runtime_adapter_updates:
        _add_adapter_routes(app, backend, Path(config.adapter_root).resolve())
    return app


def _field_path(loc: tuple) -> str | None:
    """A pydantic error location as the request's field path (``messages.0.tool_calls``),
    without the union members pydantic names in it (``literal['none','auto']``, ``NamedToolChoice``)."""
    return ".".join(str(part) for part in loc if not (
        isinstance(part, str) and ("[" in part or part[:1].isupper()))) or None


async def _measured(backend: Backend, metrics: RequestMetrics, body: GenerationRequest,
                    endpoint: str) -> AsyncIterator[tuple[str, Any]]:
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
                tokens += value["completion_tokens"]
            yield kind, value
    except ApiError as exc:
        status = exc.status
        raise
    finally:
        metrics.requests.labels(label, endpoint, str(status)).inc()
        metrics.latency.labels(label).observe(time.perf_counter() - arrived)
        metrics.tokens.labels(label).inc(tokens)


async def _respond(backend: Backend, metrics: RequestMetrics, body: GenerationRequest,
                   endpoint: str, chat: bool, parsers: tuple[str | None, str | None] = (None, None)):
    """The response to ``body``: JSON, or server-sent events with ``stream``; a chat answer is
    read with ``parsers`` (the server's tool-call and reasoning parsers, :mod:`.answers`)."""
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    stream = _measured(backend, metrics, body, endpoint)
    first, headers, prompt = await _opening(stream)
    wants_logprobs = (body.logprobs if chat else body.logprobs is not None)
    answers = answer_plan(body, *parsers, prompt) if chat else None  # the backend checked it: no error here
    if not body.stream:
        texts: dict[int, list[str]] = {}
        entries: dict[int, list] = {}
        finishes: dict[int, dict] = {}
        event = first
        while event is not None:
            kind, value = event
            if kind == "token":
                texts.setdefault(value["index"], []).append(value["text"])
                entries.setdefault(value["index"], []).extend(value["logprobs"] or [])
            elif kind == "finish":
                finishes[value["index"]] = value
            event = await next_event(stream)
        choices = []
        for index in sorted(finishes):
            text = "".join(texts.get(index, []))
            logprobs = _logprobs(entries.get(index, []), chat) if wants_logprobs else None
            reason = finishes[index]["reason"]
            message = {"role": "assistant", "content": text}
            if answers is not None:
                message, reason = answers.message(text, reason)
            choices.append({"index": index, "message": message,
                            "logprobs": logprobs, "finish_reason": reason} if chat else
                           {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason})
        return JSONResponse({"id": request_id, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": body.model, "choices": choices,
                             "usage": _usage(list(finishes.values()), body.n)}, headers=headers)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        _sse(first, stream, request_id, created, body.model, chat, include_usage, wants_logprobs,
             body.n, answers), media_type="text/event-stream", headers=headers)


async def _opening(stream: AsyncIterator) -> tuple[tuple[str, Any] | None, dict[str, str], str | None]:
    """The first token or finish event of ``stream`` (errors before it are HTTP errors), the
    headers of the replica event before it (Ray Serve: which replica, was it warm), and what
    the prompt event says the prompt did to a reasoning model's think block."""
    first, headers, prompt = await next_event(stream), {}, None
    if first is not None and first[0] == "replica":
        headers[REPLICA_HEADER] = str(first[1]["id"])
        headers[RESIDENT_HEADER] = "true" if first[1]["resident"] else "false"
        first = await next_event(stream)
    if first is not None and first[0] == "prompt":
        prompt = first[1]["reasoning"]
        first = await next_event(stream)
    return first, headers, prompt


def _usage(finishes: list[dict], n: int) -> dict[str, Any]:
    """Token counts of a request: each prompt counted once (not once per ``n``), every choice's
    generated tokens; ``prompt_tokens_details.cached_tokens``: prompt tokens whose KV came from
    the prefix cache; ``completion_tokens_details.reasoning_tokens``: generated tokens of think
    blocks (0 without a reasoning parser)."""
    firsts = [f for f in finishes if f["index"] % n == 0]
    prompt = sum(f["prompt_tokens"] for f in firsts)
    completion = sum(f["completion_tokens"] for f in finishes)
    reasoning = sum(f.get("reasoning_tokens", 0) for f in finishes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(f.get("cached_tokens", 0) for f in firsts)},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def _logprobs(entries: list[dict], chat: bool, offset: int = 0) -> dict:
    """OpenAI's logprobs object for generated tokens (``entries`` as in :mod:`.protocol`):
    chat ``{"content": [...]}``; completions ``tokens``/``token_logprobs``/``top_logprobs``/
    ``text_offset`` (``offset``: characters of text before these tokens)."""
    if chat:
        def item(token: str, logprob: float) -> dict:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return {"content": [{**item(e["token"], e["logprob"]),
                             "top_logprobs": [item(t, lp) for t, lp in e["top"]]} for e in entries]}
    offsets, position = [], offset
    for entry in entries:
        offsets.append(position)
        position += len(entry["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict((t, lp) for t, lp in e["top"]) for e in entries],
            "text_offset": offsets}


async def _sse(first, stream, request_id: str, created: int, model: str, chat: bool,
               include_usage: bool, wants_logprobs: bool, n: int, answers: AnswerPlan | None = None):
    """Server-sent events as OpenAI streams them, one chunk per choice event (with ``answers``,
    per delta of the choice's :class:`~.answers.AnswerStream`); with ``include_usage`` a last
    chunk with empty ``choices`` carries the token counts."""
    kind_name = "chat.completion.chunk" if chat else "text_completion"
    text_so_far: dict[int, int] = {}
    finishes: list[dict] = []
    readers: dict[int, AnswerStream] = {}

    def chunk(index: int, delta: str | dict | None, reason: str | None, entries: list | None = None) -> str:
        """``delta``: chat, the delta object (None: empty) or text; completions, the text."""
        logprobs = (_logprobs(entries or [], chat, text_so_far.get(index, 0))
                    if wants_logprobs and entries else None)
        if chat:
            content = delta if isinstance(delta, dict) else ({"content": delta} if delta is not None else {})
            choice = {"index": index, "delta": content, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": index, "text": delta or "", "logprobs": logprobs, "finish_reason": reason}
        payload = {"id": request_id, "object": kind_name, "created": created, "model": model,
                   "choices": [choice]}
        return f"data: {json.dumps(payload)}\n\n"

    try:
        event = first
        started: set[int] = set()
        while event is not None:
            kind, value = event
            index = value["index"]
            if chat and index not in started:
                started.add(index)
                yield chunk(index, {"role": "assistant"}, None)
                if answers is not None:
                    readers[index] = answers.stream()
            if kind == "token" and index in readers:
                deltas = readers[index].feed(value["text"]) or ([{}] if value["logprobs"] else [])
                for i, delta in enumerate(deltas):
                    yield chunk(index, delta, None, value["logprobs"] if i == 0 else None)
            elif kind == "token":
                yield chunk(index, value["text"], None, value["logprobs"])
                text_so_far[index] = text_so_far.get(index, 0) + len(value["text"])
            else:
                finishes.append(value)
                reason = value["reason"]
                if index in readers:
                    deltas, reason = readers[index].finish(reason)
                    for delta in deltas:
                        yield chunk(index, delta, None)
                yield chunk(index, None, reason)
            event = await next_event(stream)
        if include_usage:
            payload = {"id": request_id, "object": kind_name, "created": created, "model": model,
                       "choices": [], "usage": _usage(finishes, n)}
            yield f"data: {json.dumps(payload)}\n\n"
    except ApiError as exc:
        yield f"data: {json.dumps(error_body(exc.status, exc.message, exc.param))}\n\n"
    finally:
        await stream.aclose()
    yield "data: [DONE]\n\n"


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _add_adapter_routes(app: FastAPI, backend: Backend, root: Path) -> None:
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest):
        name = body.lora_name
        if name == backend.model_name or await backend.knows(name):
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name")
        path = Path(body.lora_path)
        path = (root / path if not path.is_absolute() else path).resolve()
        if not _under(path, root):
            raise ApiError(403, f"lora_path must lie under the adapter root {root}", "lora_path")
        if path.is_dir():  # a file inside may be a link out of the root: resolve every one
            escaping = [entry.name for entry in path.iterdir() if not _under(entry.resolve(), root)]
            if escaping:
                raise ApiError(403, f"{escaping[0]} in lora_path links outside the adapter root "
                                    f"{root}", "lora_path")
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
