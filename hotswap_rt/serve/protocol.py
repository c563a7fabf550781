"""The HTTP contract: OpenAI/vLLM request bodies (pydantic), the errors vLLM returns
(:class:`ApiError`, :func:`error_body`), and the :class:`Backend` interface the routes call.

Bodies forbid fields they do not know: a parameter this server does not implement is a 400 that
names it, never silently ignored.

A backend turns a validated body into a stream of events for its choices (one per prompt and
per ``n``, numbered ``index`` in order): optionally ``("replica", {"id", "resident"})`` first,
then, for a chat request on a server with a reasoning parser, ``("prompt", {"reasoning"})``
(what the prompt's end did to the think block: ``"open"``, ``"closed"`` or None, see
:func:`.reasoning.prompt_reasoning`), then ``("token", {"index", "text", "logprobs"})`` ...
and one ``("finish", {"index", "reason", "prompt_tokens", "completion_tokens",
"cached_tokens", "reasoning_tokens"})`` per choice. ``logprobs`` is None or a list with one
``{"token", "logprob", "top": [[token, logprob], ...]}`` per generated token. A request that
cannot run raises :class:`ApiError` before its first event.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, AsyncIterator, Awaitable, Literal, Optional, Protocol, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator


class ApiError(Exception):
    """An HTTP error as vLLM reports it: status, message, the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, "param": self.param}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``; the output always matches ``schema`` (as with
    ``strict``: true, whatever ``strict`` says; ``name`` labels it). ``description`` (which
    OpenAI shows the model) is not implemented: a 400 naming it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` (any JSON
    object) or ``json_schema`` (the output matches its schema)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: exactly one of ``json`` (a JSON schema), ``regex`` or
    ``choice`` (the output is one of these strings). vLLM's ``grammar``, ``structural_tag`` and
    ``whitespace_pattern`` are not implemented (400s naming them)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: Optional[Union[dict[str, Any], str]] = Field(default=None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None


class SamplingFields(BaseModel):
    """Fields shared by completions and chat; ranges are checked by the engine's
    :class:`~hotswap_rt.engine.SamplingParams` (a 400 naming the parameter)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=16)
    adapters: Optional[dict[str, float]] = None  # a weighted mix of adapters (this server's own)
    cache_salt: Optional[str] = None  # vLLM's: prefix-cache KV shared only with the same salt
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = None  # vLLM's

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class FunctionDefinition(BaseModel):
    """A function the model may call: OpenAI's name rules (letters, digits, ``_``, ``-``, up to
    64), ``parameters`` a JSON schema of its arguments (absent: any object), ``strict``: its
    arguments always match ``parameters`` (see :mod:`.tools`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    """``{"type": "function", "function": {"name": ...}}``: the answer is a call of that function."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str  # a JSON object, as OpenAI returns it

    @field_validator("arguments")
    @classmethod
    def _a_json_object(cls, arguments: str) -> str:
        try:
            value = json.loads(arguments)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise ValueError("function arguments must be a JSON object")
        return arguments


class ToolCall(BaseModel):
    """A call an assistant message made (an earlier answer's ``tool_calls``)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(BaseModel):
    """A chat message; ``developer`` is rendered as ``system``; an assistant's ``tool_calls``
    (with their arguments as objects), its ``reasoning`` (as ``reasoning_content``) and
    ``tool`` results go through the chat template."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    reasoning: Optional[str] = None  # an earlier answer's (vLLM's field)

    @model_validator(mode="after")
    def _calls_only_from_the_assistant(self) -> ChatMessage:
        for field in ("tool_calls", "reasoning"):
            if getattr(self, field) is not None and self.role != "assistant":
                raise ValueError(f"only assistant messages have {field}")
        return self

    def rendered(self) -> dict[str, Any]:
        """The message as a chat template takes it."""
        text = self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content or [])
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": text}
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        if self.reasoning is not None:  # as chat templates (Qwen3, DeepSeek-R1) read it
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)}}
                for call in self.tool_calls]
        return message


class ChatTemplateFields(BaseModel):
    """How chat messages become a prompt (chat completions and ``/tokenize``; vLLM's fields):
    ``add_generation_prompt`` ends it with the assistant's turn opening,
    ``continue_final_message`` leaves the last (assistant) message open for the model to go on
    (not with ``add_generation_prompt``), ``chat_template_kwargs`` are more template variables."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1)
    tools: Optional[list[Tool]] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates take them (``{"type": "function", "function": ...}``)."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    include_reasoning: bool = True  # vLLM's: False leaves the reasoning out of the answer


class TokenizeChatRequest(ChatTemplateFields):
    """vLLM's ``/tokenize`` of chat messages: the ids a chat completion would be given."""

    model: Optional[str] = None


class TokenizePromptRequest(BaseModel):
    """vLLM's ``/tokenize`` of a prompt (``add_special_tokens``: the tokenizer's ``<bos>`` ...)."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    tokens: list[int]


def _tokenize_kind(value: Any) -> str:
    has_messages = "messages" in value if isinstance(value, dict) else hasattr(value, "messages")
    return "Chat" if has_messages else "Prompt"


# a body with "messages" is the chat form, any other the prompt form (errors name the form's fields)
TokenizeRequest = Annotated[Union[Annotated[TokenizeChatRequest, Tag("Chat")],
                                  Annotated[TokenizePromptRequest, Tag("Prompt")]],
                            Discriminator(_tokenize_kind)]


class LoadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)


GenerationRequest = Union[CompletionRequest, ChatCompletionRequest]

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
               404: "NotFoundError", 408: "TimeoutError", 413: "BadRequestError",
               500: "InternalServerError", 503: "ServiceUnavailableError"}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """``{"error": {"message", "type", "param", "code"}}`` as vLLM's OpenAI server returns it."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "BadRequestError"),
                      "param": param, "code": status}}


class Backend(Protocol):
    """What the routes need of a backend (:class:`~.backend.LocalBackend`, ``RayBackend``)."""

    model_name: str
    created: int
    max_model_len: int

    async def knows(self, model: str) -> bool: ...

    async def adapter_cards(self) -> list[dict[str, str]]:
        """``{"id", "root"}`` of every adapter."""
        ...

    async def load_adapter(self, name: str, path: str) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...

    def stats(self) -> dict | Awaitable[dict]: ...

    async def refresh_stats(self) -> None:
        """Fetch remote figures before a metrics scrape (a no-op locally)."""
        ...

    def generate(self, body: GenerationRequest) -> AsyncIterator[tuple[str, Any]]: ...

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        """vLLM's ``/tokenize`` answer: ``{"count", "max_model_len", "tokens"}`` (``model``
        already checked)."""
        ...

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        """vLLM's ``/detokenize`` answer: ``{"prompt"}``."""
        ...


async def next_event(events: AsyncIterator[tuple[str, Any]]) -> tuple[str, Any] | None:
    """The next backend event, None at the end."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None
