"""What the HTTP routes call: :class:`LocalBackend` (one runtime and its engine thread, in this
process). ``hotswap_rt.serve.ray_app.RayBackend`` is the same interface over Ray Serve replicas.

A backend turns a validated request body into a stream of events:
``("replica", {"id", "resident"})`` (optional, first), ``("token", text_delta)`` ..., then one
``("finish", {"reason", "prompt_tokens", "completion_tokens"})``; a request that cannot run
raises :class:`ApiError` before its first token.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from prometheus_client import Histogram

from ..errors import HotswapError
from .config import ServeConfig, Served
from .engine import Engine
from .generation import BatchShape, Row
from .metrics import RuntimeCollector
from .protocol import ChatCompletionRequest, CompletionRequest


class ApiError(Exception):
    """An HTTP error as vLLM reports it: status, message, the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, "param": self.param}


def prompt_of(body: CompletionRequest | ChatCompletionRequest, tokenizer: Any) -> str:
    """The text to tokenize: the one prompt, or the chat template applied to the messages."""
    if isinstance(body, ChatCompletionRequest):
        return tokenizer.chat_prompt([m.model_dump() for m in body.messages])
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, "send one prompt per request", "prompt")
    return prompts[0]


class LocalBackend:
    """The runtime of this process behind the backend interface (see the module doc)."""

    def __init__(self, config: ServeConfig, served: Served) -> None:
        self.config = config
        self.served = served
        self.model_name = served.model_name
        self.shape = BatchShape(config.max_batch_size, config.max_prompt_tokens, config.max_new_tokens)
        self.engine = Engine(served.rt, served.tokenizer, self.shape, config.batch_wait_ms / 1e3,
                             compile=config.compile, on_batch=self._observe_batch,
                             mixed_batches=config.mixed_batches)
        self.batch_rows = Histogram("hotswap_batch_rows", "Requests per batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=None)
        self.batch_adapters = Histogram("hotswap_batch_adapters", "Distinct adapters per batch",
                                        buckets=(0, 1, 2, 4, 8, 16), registry=None)
        self.created = int(time.time())

    # ------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    def collectors(self) -> list:
        """Prometheus collectors for the runtime side (batches, swaps, tiers, recompiles)."""
        return [self.batch_rows, self.batch_adapters, RuntimeCollector(self.engine)]

    def _observe_batch(self, rows: list[Row], seconds: float) -> None:
        self.batch_rows.observe(len(rows))
        self.batch_adapters.observe(len({row.adapter for row in rows if row.adapter is not None}))

    # ---------------------------------------------------------------------------------- models
    def adapter_names(self) -> list[str]:
        return [info.name for info in self.served.rt.adapters()]

    async def knows(self, model: str) -> bool:
        return model == self.model_name or model in self.adapter_names()

    async def adapter_cards(self) -> list[dict[str, str]]:
        """``{"id", "root"}`` of every adapter, for ``/v1/models``."""
        return [{"id": i.name, "root": i.source or i.name} for i in self.served.rt.adapters()]

    async def load_adapter(self, name: str, path: str) -> None:
        if await self.knows(name):
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name")
        try:
            await asyncio.wrap_future(self.engine.call(lambda rt: rt.load(name, path)))
        except HotswapError as exc:
            raise ApiError(400, str(exc), "lora_path") from exc

    async def unload_adapter(self, name: str) -> None:
        if name not in self.adapter_names():
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
        try:
            await asyncio.wrap_future(self.engine.call(lambda rt: rt.unload(name, force=True)))
        except HotswapError as exc:
            raise ApiError(400, str(exc), "lora_name") from exc

    def stats(self) -> dict[str, Any]:
        rt = self.served.rt
        return {**rt.stats(), "recompiles": rt.guard.recompiles, "compiles": rt.guard.compiles,
                "requests_waiting": self.engine.queue_depth(),
                "waiting_adapters": sorted(self.engine.waiting_adapters()),
                "adapters": {i.name: {"tier": i.tier, "leases": i.leases, "pinned": i.pinned}
                             for i in rt.adapters()}}

    # ------------------------------------------------------------------------------ generation
    def make_row(self, body: CompletionRequest | ChatCompletionRequest, emit) -> Row:
        """Check ``body`` against the limits and build its row (raises :class:`ApiError`)."""
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported by this server", "logprobs")
        if body.model == self.model_name:
            adapter = None
        elif body.model in self.adapter_names():
            adapter = body.model
        else:
            raise ApiError(404, f"The model `{body.model}` does not exist.", "model")
        ids = self.served.tokenizer.encode(prompt_of(body, self.served.tokenizer))
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

    async def generate(self, body: CompletionRequest | ChatCompletionRequest) -> AsyncIterator[tuple[str, Any]]:
        """Events for one request (see the module doc); a client that goes away (the consumer
        stops iterating) cancels its row at the next token."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        row = self.make_row(body, lambda kind, value: loop.call_soon_threadsafe(
            events.put_nowait, (kind, value)))
        try:
            self.engine.submit(row)
            deadline = loop.time() + self.config.request_timeout_s
            error = None
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
                    yield kind, value
        finally:
            row.cancelled.set()
