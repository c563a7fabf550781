""":class:`LocalBackend`: the :class:`~.protocol.Backend` over one runtime and its
:class:`~hotswap_rt.engine.GenerationEngine` in this process (``serve.ray`` runs one per
replica). It turns a request body into an engine request (:func:`engine_request`) and the
engine's events into the backend events of :mod:`.protocol`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Any, AsyncIterator

from ..engine import FinishEvent, GenerationEngine, RequestError, SamplingParams
from ..engine.structured import StructuredOutput
from ..errors import HotswapError, SelectionError, UnknownAdapterError
from .config import ServeConfig
from .metrics import RuntimeCollector, StepMetrics
from .model import Served
from .precompile import CompileInAnotherProcess
from .protocol import (
    ApiError, ChatCompletionRequest, ChatTemplateFields, DetokenizeRequest, GenerationRequest, TokenizeRequest)
from .reasoning import prompt_reasoning, reasoning_length, reasoning_pattern
from .tools import ToolPlan, tool_plan

log = logging.getLogger(__name__)


TEMPLATE_RESERVED = {"messages", "conversation", "tools", "documents", "add_generation_prompt",
                     "continue_final_message", "tokenize", "chat_template", "return_dict"}


def chat_text(body: ChatTemplateFields, served: Served) -> str:
    """The chat prompt of ``body``'s messages (its tools given to the template); a 400 for
    template variables it may not set or a final message it cannot continue."""
    variables = body.chat_template_kwargs or {}
    reserved = sorted(set(variables) & TEMPLATE_RESERVED)
    if reserved:
        raise ApiError(400, f"chat_template_kwargs may not set {reserved} (the request's own fields)",
                       "chat_template_kwargs")
    if body.continue_final_message:
        if body.add_generation_prompt:
            raise ApiError(400, "continue_final_message needs add_generation_prompt false (the last message "
                                "is continued, no new turn opened)", "continue_final_message")
        if body.messages[-1].role != "assistant":
            raise ApiError(400, "continue_final_message needs an assistant message last",
                           "continue_final_message")
    try:
        return served.tokenizer.chat_prompt(
            [m.rendered() for m in body.messages], body.tool_dicts(), variables,
            generation_prompt=body.add_generation_prompt, continue_final=body.continue_final_message)
    except RequestError as exc:
        raise ApiError(400, str(exc), exc.param) from exc


def prompts_of(body: GenerationRequest, served: Served) -> list[tuple[list[int], str]]:
    """Every prompt of ``body`` as (token ids, text): the chat template applied to the messages
    (and tools), or each completion prompt (a string, strings, token ids, lists of token ids)."""
    tokenizer = served.tokenizer
    if isinstance(body, ChatCompletionRequest):
        text = chat_text(body, served)
        return [(tokenizer.encode_chat(text), text)]
    prompt = body.prompt
    if isinstance(prompt, str):
        return [(tokenizer.encode(prompt), prompt)]
    if not prompt:
        raise ApiError(400, "the prompt is empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [(list(prompt), tokenizer.decode(list(prompt)))]
    return [(tokenizer.encode(p), p) if isinstance(p, str) else (list(p), tokenizer.decode(list(p)))
            for p in prompt]


def structured_output_of(body: GenerationRequest, tools: ToolPlan | None = None) -> StructuredOutput | None:
    """What ``response_format``, vLLM's ``structured_outputs`` or a required / named tool
    choice asks the output to match (None: nothing); a 400 for a malformed or double request."""
    response_format, extra = body.response_format, body.structured_outputs
    if tools is not None and tools.structured is not None:
        if extra is not None or (response_format is not None and response_format.type != "text"):
            raise ApiError(400, f"tool_choice {tools.mode!r} constrains the output itself: not with "
                                f"response_format or structured_outputs", "tool_choice")
        return tools.structured
    if extra is not None:
        if response_format is not None and response_format.type != "text":
            raise ApiError(400, "give response_format or structured_outputs, not both", "structured_outputs")
        given = {name: value for name, value in (("json", extra.json_), ("regex", extra.regex),
                                                 ("choice", extra.choice)) if value is not None}
        if len(given) != 1:
            raise ApiError(400, f"structured_outputs takes exactly one of json, regex and choice, got "
                                f"{sorted(given) or 'none'}", "structured_outputs")
        (kind, value), = given.items()
        try:
            if kind == "json":
                return StructuredOutput.json_schema(value)
            return StructuredOutput.regex(value) if kind == "regex" else StructuredOutput.choice(value)
        except RequestError as exc:
            raise ApiError(400, str(exc), "structured_outputs") from exc
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutput.json_object()
    if response_format.json_schema is None:
        raise ApiError(400, "response_format json_schema needs its json_schema", "response_format")
    return StructuredOutput.json_schema(response_format.json_schema.schema_)


def sampling_of(body: GenerationRequest, served: Served, tools: ToolPlan | None = None) -> SamplingParams:
    """The engine's sampling parameters for ``body`` (defaults from the model's generation
    config; ``tools``' constraint and stop strings); raises :class:`ApiError` 400 naming a bad
    parameter."""
    chat = isinstance(body, ChatCompletionRequest)
    if not chat and body.echo and body.logprobs is not None:
        raise ApiError(400, "echo with logprobs (prompt log-probabilities) is not supported", "echo")
    max_tokens = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
    if chat:
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        logprobs = body.logprobs
    structured = structured_output_of(body, tools)
    try:
        bias = {int(token): value for token, value in (body.logit_bias or {}).items()}
    except ValueError:
        raise ApiError(400, "logit_bias keys must be token ids", "logit_bias") from None
    defaults = {"temperature": served.default_temperature, "top_p": served.default_top_p,
                "top_k": served.default_top_k, "min_p": served.default_min_p,
                "presence_penalty": served.default_presence_penalty,
                "frequency_penalty": served.default_frequency_penalty,
                "repetition_penalty": served.default_repetition_penalty}
    given = {name: getattr(body, name) for name in defaults}
    try:
        return SamplingParams(
            max_tokens=max_tokens, seed=body.seed, logit_bias=bias,
            stop=body.stop_strings() + (tools.stop if tools else ()),
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens, logprobs=logprobs, structured=structured,
            **{name: defaults[name] if value is None else value for name, value in given.items()})
    except RequestError as exc:
        raise ApiError(400, str(exc), exc.param) from exc


class LocalBackend:
    """One runtime and its engine thread, in this process (see the module doc)."""

    def __init__(self, config: ServeConfig, served: Served, *, rebuildable: bool = False) -> None:
        self.config = config
        self.served = served
        # served is what build_runtime(config) builds: another process can build the same
        # (serve_while_compiling compiles there first on CPU, see .precompile)
        self.rebuildable = rebuildable
        self._elsewhere: CompileInAnotherProcess | None = None
        self.model_name = served.model_name
        self.step_metrics = StepMetrics()
        self.engine = GenerationEngine(served.rt, served.tokenizer, config.engine_config(),
                                       on_step=self.step_metrics.observe)
        self.max_model_len = self.engine.max_len
        self.created = int(time.time())
        self._relay: LoopRelay | None = None

    # ------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Compile every bucket (logged as it goes); returns when the server may take traffic."""
        def progress(done: int, total: int, what: str) -> None:
            log.info("compiled %s (%d/%d graphs)", what, done, total)

        if self.config.serve_while_compiling and self.rebuildable:  # CPU only (ServeConfig)
            self._elsewhere = CompileInAnotherProcess(self.config, self.engine)
        self.engine.start(progress=progress, before_compile=self._elsewhere)
        if self.engine.compile_state == "compiling":
            log.info("engine ready in %.1f s, answering with the eager forward until every graph "
                     "is compiled", self.engine.startup_seconds or 0.0)
        else:
            log.info("engine ready in %.1f s", self.engine.startup_seconds or 0.0)

    def stop(self) -> None:
        if self._elsewhere is not None:
            self._elsewhere.cancel()
        self.engine.stop()

    def collectors(self) -> list:
        """Prometheus collectors for the runtime side (steps, swaps, tiers, recompiles)."""
        return [*self.step_metrics.collectors(), RuntimeCollector(self.engine)]

    # ---------------------------------------------------------------------------------- models
    def adapter_names(self) -> list[str]:
        return [info.name for info in self.served.rt.adapters()]

    async def knows(self, model: str) -> bool:
        return model == self.model_name or model in self.adapter_names()

    async def adapter_cards(self) -> list[dict[str, str]]:
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
        load = self.engine.load()
        engine = self.engine
        return {**rt.stats(), "recompiles": rt.guard.recompiles, "compiles": rt.guard.compiles,
                "compile": {"state": engine.compile_state, "seconds": engine.compile_seconds,
                            "error": None if engine.compile_error is None else str(engine.compile_error)},
                "prefix_cache": None if engine.prefix_cache is None else engine.prefix_cache.stats.as_dict(),
                "requests_waiting": load["waiting"], "requests_running": load["running"],
                "waiting_adapters": load["waiting_adapters"],
                "running_adapters": load["running_adapters"], "max_lora": rt.config.device_slots,
                "adapters": {i.name: {"tier": i.tier, "leases": i.leases, "pinned": i.pinned}
                             for i in rt.adapters()}}

    async def refresh_stats(self) -> None:
        return None

    # ------------------------------------------------------------------------------ tokenizer
    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        """The ids a chat completion (``messages``) or a completion (``prompt``) would be given
        (the route has checked ``model``)."""
        tokenizer = self.served.tokenizer
        if isinstance(body, ChatTemplateFields):
            ids = tokenizer.encode_chat(chat_text(body, self.served))
        else:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        bad = [t for t in body.tokens if not 0 <= t < self.engine.vocab_size]
        if bad:
            raise ApiError(400, f"token ids outside the vocabulary (0..{self.engine.vocab_size - 1}): "
                                f"{bad[:5]}", "tokens")
        return {"prompt": self.served.tokenizer.decode(list(body.tokens))}

    # ------------------------------------------------------------------------------ generation
    def adapter_of(self, body: GenerationRequest) -> str | dict[str, float] | None:
        """The request's adapter: its ``model`` (an adapter or the base model), or with
        ``adapters`` (``model`` = the base model) that weighted mix."""
        names = self.adapter_names()
        if body.adapters is not None:
            if body.model != self.model_name:
                raise ApiError(400, f"with `adapters`, `model` must be the base model "
                                    f"`{self.model_name}`", "model")
            unknown = [n for n in body.adapters if n not in names]
            if unknown:
                raise ApiError(404, f"The adapter `{unknown[0]}` does not exist.", "adapters")
            return dict(body.adapters)
        if body.model == self.model_name:
            return None
        if body.model in names:
            return body.model
        raise ApiError(404, f"The model `{body.model}` does not exist.", "model")

    def _default_max_tokens(self, ids: list[int]) -> int | None:
        """The model's generation config's ``max_new_tokens`` for a request that gave no
        ``max_tokens``, cut to what remains of the context (as vLLM does; None: nothing
        remains, the engine says so)."""
        remaining = self.engine.max_len - len(ids)
        return min(self.served.default_max_tokens, remaining) if remaining > 0 else None

    async def generate(self, body: GenerationRequest) -> AsyncIterator[tuple[str, Any]]:
        """Events for every choice of one request (see :mod:`.protocol`); a client that goes
        away (the consumer stops iterating) cancels them at the next step."""
        adapter = self.adapter_of(body)
        tools = tool_plan(body, self.config.auto_tool_parser()) if isinstance(
            body, ChatCompletionRequest) else None
        params = sampling_of(body, self.served, tools)
        prompts = prompts_of(body, self.served)
        parser = self.config.reasoning_parser if isinstance(body, ChatCompletionRequest) else None
        reasoning = prompt_reasoning(prompts[0][1]) if parser is not None else None
        if params.structured is not None:  # compiled off the event loop (a large vocabulary: seconds)
            try:
                thinking = reasoning_pattern(parser, reasoning) if parser is not None else None
                if thinking is not None:  # the grammar starts after the reasoning
                    params = dataclasses.replace(params, structured=params.structured.after(thinking))
                await asyncio.to_thread(lambda: self.engine.grammars().index(params.structured))
            except RequestError as exc:
                field = ("tools" if tools is not None and tools.structured is not None else
                         "structured_outputs" if body.structured_outputs is not None else exc.param)
                raise ApiError(400, str(exc), field) from exc
        echo = not isinstance(body, ChatCompletionRequest) and body.echo
        loop = asyncio.get_running_loop()
        if self._relay is None or self._relay.loop is not loop:
            self._relay = LoopRelay(loop)
        relay = self._relay
        events: asyncio.Queue = asyncio.Queue()
        handles = []
        try:
            for p, (ids, _) in enumerate(prompts):
                for i in range(body.n):
                    index = p * body.n + i
                    choice = params if params.seed is None or body.n == 1 else \
                        dataclasses.replace(params, seed=params.seed + i)  # choices differ
                    if params.max_tokens is None and self.served.default_max_tokens is not None:
                        choice = dataclasses.replace(choice, max_tokens=self._default_max_tokens(ids))
                    handles.append(self.engine.submit(ids, adapter, choice, cache_salt=body.cache_salt,
                                                      sink=(lambda event, index=index: relay.put(
                                                          events, (index, event)))))
        except RequestError as exc:
            _cancel(handles)
            raise ApiError(400, str(exc), exc.param) from exc
        except UnknownAdapterError as exc:
            _cancel(handles)
            raise ApiError(404, str(exc), "model") from exc
        except SelectionError as exc:
            _cancel(handles)
            raise ApiError(400, str(exc), "adapters") from exc
        decode = self.served.tokenizer.decode
        try:
            if parser is not None:
                yield "prompt", {"reasoning": reasoning}
            if echo:
                for index in range(len(handles)):
                    yield "token", {"index": index, "text": prompts[index // body.n][1], "logprobs": None}
            deadline = loop.time() + self.config.request_timeout_s
            running = len(handles)
            answers: dict[int, list[str]] = {}  # a reasoning server's choices: each token's text
            while running:
                try:
                    index, event = await asyncio.wait_for(events.get(), deadline - loop.time())
                except asyncio.TimeoutError:
                    raise ApiError(408, f"the request took longer than {self.config.request_timeout_s} s")
                if isinstance(event, FinishEvent):
                    if event.reason == "error":
                        raise ApiError(500, event.error or "generation failed")
                    running -= 1
                    yield "finish", {"index": index, "reason": event.reason,
                                     "prompt_tokens": event.prompt_tokens,
                                     "completion_tokens": event.completion_tokens,
                                     "cached_tokens": event.cached_tokens,
                                     "reasoning_tokens": _reasoning_tokens(answers.pop(index, []), parser,
                                                                           reasoning)}
                    continue
                if parser is not None:
                    answers.setdefault(index, []).append(event.text)
                logprobs = None
                if event.logprob is not None:
                    logprobs = [{"token": decode([event.token_id]), "logprob": event.logprob,
                                 "top": [[decode([t]), lp] for t, lp in event.top_logprobs or []]}]
                if event.text or logprobs:
                    yield "token", {"index": index, "text": event.text, "logprobs": logprobs}
        finally:
            _cancel(handles)


def _reasoning_tokens(texts: list[str], parser: str | None, prompt: str | None) -> int:
    """Of an answer's tokens (each one's text), those that begin inside its think block (the
    closing tag's own included): OpenAI's ``reasoning_tokens``; 0 without a reasoning parser."""
    if parser is None or not texts:
        return 0
    end = reasoning_length("".join(texts), parser, prompt)
    count, start = 0, 0
    for text in texts:
        if start >= end:
            break
        count, start = count + 1, start + len(text)
    return count


class LoopRelay:
    """Moves events from the engine thread into asyncio queues of one event loop, with one
    wake-up of the loop per burst (a step's tokens for every stream) instead of one per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Any]] = []

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        """Any thread: ``queue.put_nowait(item)`` on the loop, soon."""
        with self._lock:
            self._pending.append((queue, item))
            if len(self._pending) > 1:  # a flush is already scheduled
                return
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, item in pending:
            queue.put_nowait(item)


def _cancel(handles: list) -> None:
    for handle in handles:
        handle.cancel()
