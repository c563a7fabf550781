"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}``.

A request runs as a chat completion: its ``input`` items (messages, ``function_call`` /
``function_call_output`` items, ``reasoning`` items) become chat messages after the stored
conversation of ``previous_response_id`` and the ``instructions`` (a system message, not
carried to later responses, as OpenAI does), its function ``tools``, ``tool_choice`` and
``text.format`` the chat fields (:func:`chat_request`). The same backend generates it, the
same parsers read the answer (:mod:`.answers`), and the answer's deltas become output items
(:class:`OutputItems`): a ``reasoning`` item (with a reasoning parser), a ``message`` with
``output_text``, ``function_call`` items. Streamed: OpenAI's typed events
(``response.created`` ... ``response.output_text.delta`` ... ``response.completed``).

``store`` (OpenAI's default: true) keeps the response and its conversation in memory
(:class:`ResponseStore`, the last ``STORED_RESPONSES``, per server process): what
``previous_response_id`` continues and ``GET`` returns. Not implemented (400s naming them):
built-in tools (web search, files, ...), non-text input parts, ``reasoning`` effort,
``include``, ``background``, ``truncation`` other than ``"disabled"``, ``conversation``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from typing import Annotated, Any, AsyncIterator, Literal, Optional, Union

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from .answers import AnswerPlan, answer_plan
from .protocol import ApiError, ChatCompletionRequest, next_event

STORED_RESPONSES = 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TextContent(_Strict):
    """A text part: ``input_text`` (what a user or system wrote) or ``output_text`` (an earlier
    answer's, as a client sends it back)."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: Optional[list[Any]] = None  # output_text's, sent back: must be empty
    logprobs: Optional[list[Any]] = None


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[TextContent]]
    id: Optional[str] = None
    status: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(part.annotations for part in self.content):
            raise ApiError(400, "output_text annotations are not supported", "input")
        return "".join(part.text for part in self.content)


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: Optional[str] = None
    status: Optional[str] = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, list[TextContent]]  # text, or text parts
    id: Optional[str] = None
    status: Optional[str] = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(part.text for part in self.output)


class ReasoningText(_Strict):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Strict):
    """An earlier answer's reasoning: goes back to the template with the assistant message
    after it (as ``reasoning_content``)."""

    type: Literal["reasoning"]
    summary: list[ReasoningText] = Field(default_factory=list)
    content: Optional[list[ReasoningText]] = None
    id: Optional[str] = None
    status: Optional[str] = None
    encrypted_content: None = None

    def text(self) -> str:
        return "".join(part.text for part in (self.content if self.content is not None else self.summary))


_ITEM_TAGS = {"function_call": "FunctionCall", "function_call_output": "FunctionCallOutput",
              "reasoning": "Reasoning"}


def _item_kind(value: Any) -> str:
    """An input item's model (tags capitalized: an error's field path leaves them out)."""
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return _ITEM_TAGS.get(kind, "Message")


InputItem = Annotated[Union[Annotated[MessageItem, Tag("Message")],
                            Annotated[FunctionCallItem, Tag("FunctionCall")],
                            Annotated[FunctionCallOutputItem, Tag("FunctionCallOutput")],
                            Annotated[ReasoningItem, Tag("Reasoning")]],
                      Discriminator(_item_kind)]


class FunctionTool(_Strict):
    """``{"type": "function", "name", "parameters", ...}`` (the Responses API's flat shape)."""

    type: Literal["function"]
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None

    def function(self) -> dict[str, Any]:
        """The chat shape's ``function`` object."""
        return self.model_dump(exclude_none=True, exclude={"type"})


class FunctionChoice(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    """``strict`` as in chat: the output matches the schema whatever it says (``description``,
    which would not change the output, is a 400 as in chat)."""

    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class TextConfig(_Strict):
    format: Optional[TextFormat] = None


class ResponsesRequest(_Strict):
    """The fields this server implements; any other is a 400 naming it (``include`` may be
    given empty, ``reasoning`` null: what asks for nothing)."""

    model: str
    input: Union[str, list[InputItem]]
    instructions: Optional[str] = None
    previous_response_id: Optional[str] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None  # vLLM's
    tools: Optional[list[FunctionTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], FunctionChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextConfig] = None
    stream: bool = False
    store: bool = True
    metadata: Optional[dict[str, str]] = None
    truncation: Optional[Literal["disabled"]] = None
    include: Optional[list[str]] = Field(default=None, max_length=0)  # nothing extra: [] only
    reasoning: None = None  # effort / summary are not implemented: null only


def chat_request(body: ResponsesRequest,
                 history: list[dict[str, Any]]) -> tuple[ChatCompletionRequest, list[dict[str, Any]]]:
    """``body`` as the chat completion it runs as, after ``history`` (the chat messages of the
    previous responses), and the conversation so far without the instructions (what a stored
    response keeps, its answer added); a 400 naming the field for what does not fit."""
    conversation = history + input_messages(body.input)
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + conversation
    fields: dict[str, Any] = {"model": body.model, "messages": messages, "max_tokens": body.max_output_tokens,
                              "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
                              "parallel_tool_calls": body.parallel_tool_calls}
    if body.tools is not None:
        fields["tools"] = [{"type": "function", "function": tool.function()}
                           for tool in body.tools]
    if isinstance(body.tool_choice, FunctionChoice):
        fields["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    else:
        fields["tool_choice"] = body.tool_choice
    text_format = body.text.format if body.text is not None else None
    if text_format is not None and text_format.type == "json_schema":
        if text_format.schema_ is None or text_format.name is None:
            raise ApiError(400, "a json_schema format needs its name and schema", "text.format")
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            "name": text_format.name, "schema": text_format.schema_, "strict": text_format.strict}}
    elif text_format is not None:
        fields["response_format"] = {"type": text_format.type}
    try:
        chat = ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ApiError(400, f"{error['msg']} (as a chat message: {'.'.join(map(str, error['loc']))})",
                       "input") from None
    return chat, conversation


CHAT_FIELDS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}


def responses_error(exc: ApiError) -> ApiError:
    """A chat request's error as the Responses request's: its fields under their names here."""
    param = exc.param or ""
    head, dot, rest = param.partition(".")
    if head not in CHAT_FIELDS:
        return exc
    message = exc.message
    if message.startswith(head):
        message = CHAT_FIELDS[head] + message[len(head):]
    return ApiError(exc.status, message, CHAT_FIELDS[head] + dot + rest)


def input_messages(items: str | list) -> list[dict[str, Any]]:
    """Input items -> chat messages: a function call joins the assistant message before it (or
    opens one), a reasoning item goes with the next assistant message."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    reasoning: str | None = None

    def assistant() -> dict[str, Any]:
        nonlocal reasoning
        message = {"role": "assistant", "content": None}
        if reasoning is not None:
            message["reasoning"], reasoning = reasoning, None
        messages.append(message)
        return message

    for item in items:
        if isinstance(item, ReasoningItem):
            reasoning = item.text()
        elif isinstance(item, MessageItem):
            if item.role == "assistant":
                assistant()["content"] = item.text()
            else:
                messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            last = messages[-1] if messages and reasoning is None else None
            message = last if last is not None and last["role"] == "assistant" else assistant()
            message.setdefault("tool_calls", []).append(_tool_call(item.call_id, item.name, item.arguments))
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    return messages


def _tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """A chat assistant message's call."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputItems:
    """One answer's deltas (:class:`~.answers.AnswerStream`) -> output items, and the stream
    events that build them (without ``sequence_number``, which the caller numbers)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._open: tuple[str, int] | None = None  # ("reasoning" | "message" | "call", call index)

    def feed(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if "reasoning" in delta:
            events += self._ensure(("reasoning", 0))
            item = self.items[-1]
            item["content"][0]["text"] += delta["reasoning"]
            events.append(self._event("response.reasoning_text.delta", content_index=0,
                                      delta=delta["reasoning"]))
        elif "content" in delta:
            events += self._ensure(("message", 0))
            self.items[-1]["content"][0]["text"] += delta["content"]
            events.append(self._event("response.output_text.delta", content_index=0, delta=delta["content"],
                                      logprobs=[]))
        for call in delta.get("tool_calls", []):
            function = call.get("function", {})
            events += self._ensure(("call", call["index"]), call)
            if function.get("arguments"):
                self.items[-1]["arguments"] += function["arguments"]
                events.append(self._event("response.function_call_arguments.delta",
                                          delta=function["arguments"]))
        return events

    def finish(self) -> list[dict[str, Any]]:
        return self._close()

    def messages(self) -> list[dict[str, Any]]:
        """The answer as chat messages (one assistant message), for a later response."""
        message: dict[str, Any] = {"role": "assistant", "content": None}
        for item in self.items:
            if item["type"] == "reasoning":
                message["reasoning"] = item["content"][0]["text"]
            elif item["type"] == "message":
                message["content"] = item["content"][0]["text"]
            else:
                message.setdefault("tool_calls", []).append(
                    _tool_call(item["call_id"], item["name"], item["arguments"]))
        return [message]

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "item_id": self.items[-1]["id"], "output_index": len(self.items) - 1, **fields}

    def _ensure(self, key: tuple[str, int], call: dict | None = None) -> list[dict[str, Any]]:
        if self._open == key:
            return []
        events = self._close()
        self._open = key
        if key[0] == "reasoning":
            item = {"id": _id("rs"), "type": "reasoning", "summary": [], "status": "in_progress",
                    "content": [{"type": "reasoning_text", "text": ""}]}
        elif key[0] == "message":
            item = {"id": _id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
        else:
            item = {"id": _id("fc"), "type": "function_call", "status": "in_progress", "call_id": call["id"],
                    "name": call["function"]["name"], "arguments": ""}
        self.items.append(item)
        events.append({"type": "response.output_item.added", "output_index": len(self.items) - 1,
                       "item": json.loads(json.dumps(item))})
        if key[0] != "call":
            events.append(self._event("response.content_part.added", content_index=0,
                                      part={**item["content"][0]}))
        return events

    def _close(self) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        kind, self._open = self._open[0], None
        item = self.items[-1]
        item["status"] = "completed"
        if kind == "reasoning":
            events = [self._event("response.reasoning_text.done", content_index=0,
                                  text=item["content"][0]["text"]),
                      self._event("response.content_part.done", content_index=0, part=item["content"][0])]
        elif kind == "message":
            events = [self._event("response.output_text.done", content_index=0, text=item["content"][0]["text"],
                                  logprobs=[]),
                      self._event("response.content_part.done", content_index=0, part=item["content"][0])]
        else:
            events = [self._event("response.function_call_arguments.done", arguments=item["arguments"],
                                  name=item["name"])]
        events.append({"type": "response.output_item.done", "output_index": len(self.items) - 1,
                       "item": json.loads(json.dumps(item))})
        return events


def response_object(body: ResponsesRequest, response_id: str, created: int, output: list[dict[str, Any]],
                    status: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    """The ``response`` object (OpenAI's fields; ``usage`` None while in progress)."""
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, FunctionChoice) else (
        body.tool_choice or "auto")
    text_format = (body.text.format.model_dump(exclude_none=True, by_alias=True)
                   if body.text is not None and body.text.format is not None else {"type": "text"})
    return {"id": response_id, "object": "response", "created_at": created, "model": body.model,
            "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "previous_response_id": body.previous_response_id, "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False, "tool_choice": choice, "tools": tools,
            "temperature": body.temperature, "top_p": body.top_p, "text": {"format": text_format},
            "truncation": "disabled", "store": body.store, "metadata": body.metadata or {}, "usage": usage}


def response_usage(finish: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's usage object from a choice's finish event."""
    return {"input_tokens": finish["prompt_tokens"], "output_tokens": finish["completion_tokens"],
            "total_tokens": finish["prompt_tokens"] + finish["completion_tokens"],
            "input_tokens_details": {"cached_tokens": finish.get("cached_tokens", 0)},
            "output_tokens_details": {"reasoning_tokens": finish.get("reasoning_tokens", 0)}}


class ResponseStore:
    """Stored responses (``store``) and each one's conversation as chat messages (without its
    instructions), the last ``capacity`` kept (any thread)."""

    def __init__(self, capacity: int = STORED_RESPONSES) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        with self._lock:
            self._entries[response["id"]] = (response, conversation)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def response(self, response_id: str) -> dict[str, Any]:
        return self._get(response_id)[0]

    def conversation(self, response_id: str, param: str = "response_id") -> list[dict[str, Any]]:
        return list(self._get(response_id, param)[1])

    def delete(self, response_id: str) -> None:
        with self._lock:
            if self._entries.pop(response_id, None) is None:
                raise ApiError(404, f"Response with id '{response_id}' not found.", "response_id")

    def _get(self, response_id: str, param: str = "response_id") -> tuple[dict[str, Any], list[dict[str, Any]]]:
        with self._lock:
            entry = self._entries.get(response_id)
        if entry is None:
            raise ApiError(404, f"Response with id '{response_id}' not found.", param)
        return entry


async def respond(body: ResponsesRequest, chat: ChatCompletionRequest, conversation: list[dict[str, Any]],
                  first: tuple[str, Any] | None, events: AsyncIterator[tuple[str, Any]], prompt: str | None,
                  headers: dict[str, str], store: ResponseStore,
                  parsers: tuple[str | None, str | None]) -> JSONResponse | StreamingResponse:
    """The response to ``body``, run as ``chat``: the backend's ``events`` from ``first`` on
    (the replica and prompt events already read: ``headers``, ``prompt``), read with the
    server's tool-call and reasoning ``parsers``; stored with ``conversation`` if asked."""
    plan = answer_plan(chat, *parsers, prompt)
    response_id, created = _id("resp"), int(time.time())
    answer = Answer(plan, OutputItems())

    def finished(finish: dict[str, Any]) -> dict[str, Any]:
        reason = answer.finish(finish["reason"])
        response = response_object(body, response_id, created, answer.output.items,
                                   "incomplete" if reason == "length" else "completed", response_usage(finish))
        if body.store:
            store.put(response, conversation + answer.output.messages())
        return response

    if not body.stream:
        finish, event = None, first
        while event is not None:
            if event[0] == "token":
                answer.feed(event[1]["text"])
            else:
                finish = event[1]
            event = await next_event(events)
        return JSONResponse(finished(finish), headers=headers)

    async def stream() -> AsyncIterator[str]:
        number = 0

        def sse(event: dict[str, Any]) -> str:
            nonlocal number
            event["sequence_number"], number = number, number + 1
            return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

        start = response_object(body, response_id, created, [], "in_progress", None)
        yield sse({"type": "response.created", "response": start})
        yield sse({"type": "response.in_progress", "response": start})
        try:
            finish, event = None, first
            while event is not None:
                if event[0] == "token":
                    for item_event in answer.feed(event[1]["text"]):
                        yield sse(item_event)
                else:
                    finish = event[1]
                event = await next_event(events)
            response = finished(finish)
            for item_event in answer.closing:
                yield sse(item_event)
            kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
            yield sse({"type": kind, "response": response})
        except ApiError as exc:
            yield sse({"type": "error", "code": str(exc.status), "message": exc.message, "param": exc.param})
        finally:
            await events.aclose()

    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


class Answer:
    """One answer's text -> output items: read by the request's :class:`~.answers.AnswerPlan`
    (None: all content), each delta made into items and events (:class:`OutputItems`)."""

    def __init__(self, plan: AnswerPlan | None, output: OutputItems) -> None:
        self._reader = plan.stream() if plan is not None else None
        self.output = output
        self.closing: list[dict[str, Any]] = []  # the events of finish()

    def feed(self, text: str) -> list[dict[str, Any]]:
        deltas = self._reader.feed(text) if self._reader is not None else ([{"content": text}] if text else [])
        return [event for delta in deltas for event in self.output.feed(delta)]

    def finish(self, reason: str) -> str:
        """The finish reason; the last items' events go to :attr:`closing`."""
        deltas, reason = self._reader.finish(reason) if self._reader is not None else ([], reason)
        self.closing = [event for delta in deltas for event in self.output.feed(delta)] + self.output.finish()
        return reason
