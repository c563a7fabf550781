"""Tool calling on ``/v1/chat/completions`` (OpenAI's ``tools`` / ``tool_choice``, vLLM's rules).

::

    tool_choice   prompt                      output                       becomes
    "none"        the tools in the template   free text                    content
    named         the tools in the template   JSON of that function's      one call (its arguments)
                                              parameters (constrained)
    "required"    the tools in the template   a JSON array of {"name",     one call per item
                                              "parameters"} (constrained)
    "auto"        the tools in the template   free text                    the calls the model wrote in
                                                                           its format (a parser), the
                                                                           rest content

"auto" needs a parser for the model's format (``ServeConfig.tool_call_parser``; vLLM's
``--enable-auto-tool-choice --tool-call-parser``): ``hermes``, the ``<tool_call>{"name": ...,
"arguments": {...}}</tool_call>`` blocks of Hermes, Qwen 2.5 / 3 and the built-in model's chat
format (:class:`HermesReader`), ``llama3_json``, Llama 3.x's answers that are JSON calls
(:class:`JsonReader`), ``pythonic`` (Llama 3.2 / 4's lists of Python calls) or ``mistral``
(``[TOOL_CALLS]`` calls; both in :mod:`.tool_parsers`). What is not a call of a known
function (not JSON, an unknown name, arguments that are not an object, or with ``strict``
arguments that do not match the schema) stays in the content as written. With ``hermes``,
the calls of ``strict`` functions are enforced as they are generated: the answer's grammar
is free text and blocks whose JSON is a call of a strict function that matches its schema
(or names another function, whose arguments are then checked after the fact as before); with
``llama3_json`` and ``mistral`` likewise, in their formats (content, or calls of strict
functions and at most one of another function, last); ``pythonic`` calls are checked after
the fact only.
``parallel_tool_calls: false`` makes a required answer one call, ends a Hermes auto answer
after its first call, and with the other parsers keeps an auto answer's first call (the
grammars of strict functions then allow one).

:class:`ToolCallStream` turns a choice's text, as it streams, into OpenAI deltas
(``{"content": ...}`` / ``{"tool_calls": [...]}``); a whole answer is the same stream fed at
once (:func:`~.answers.answer_message`), so streamed and whole answers never differ.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from ..engine.sampling import RequestError
from ..engine.structured import StructuredOutput, regex_literal, regex_other_than, regex_without
from .protocol import ApiError, ChatCompletionRequest
from .tags import partial_tag
from .tool_parsers import HeldAnswer, MistralReader, PythonicReader, decide_by_start

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "pythonic", "mistral")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools.

    Attributes:
        mode: "none", "auto", "required" or "named".
        tools: the tools as chat templates take them (``{"type": "function", "function": ...}``).
        name: the function a named choice calls.
        structured: what the output must match (named, required; auto with ``strict``
            functions and the ``hermes`` parser: their calls), else None.
        stop: stop strings the plan adds (auto without parallel calls: the end of a Hermes call).
        single_call: auto with ``parallel_tool_calls`` false: at most one call (Hermes: the
            stop ends the answer after it; the parsers that read calls at the end keep the
            first; the grammars of strict functions allow one).
        schemas: function name -> its parameters schema, for functions marked ``strict``
            (auto checks their arguments).
        parser: auto's reader of the model's calls (:data:`TOOL_CALL_PARSERS`).
    """

    mode: Literal["none", "auto", "required", "named"]
    tools: tuple[dict[str, Any], ...]
    name: str | None = None
    structured: StructuredOutput | None = None
    stop: tuple[str, ...] = ()
    schemas: dict[str, dict] = field(default_factory=dict)
    parser: str | None = None
    single_call: bool = False

    @property
    def names(self) -> frozenset[str]:
        return frozenset(tool["function"]["name"] for tool in self.tools)


_PLANS: OrderedDict[str, ToolPlan] = OrderedDict()  # recent plans by their request fields
_PLANS_KEPT = 256
_PLANS_LOCK = threading.Lock()


def tool_plan(body: ChatCompletionRequest, parser: str | None) -> ToolPlan | None:
    """The plan for ``body``'s tools (None: it has none); ``parser``: the server's tool-call
    parser (None: "auto" is refused). Raises :class:`ApiError` 400 naming the bad field.

    Plans of the last 256 distinct (tools, tool_choice, parallel_tool_calls, parser) are kept:
    with ``strict`` functions a plan costs ~3 ms (their schemas checked and turned into a
    grammar's pattern; ad hoc), and each request asks for its plan twice (its sampling and its
    answer's reader), an agent the same tools every turn."""
    if not body.tools:
        return _tool_plan(body, parser)
    fields = body.model_dump(include={"tools", "tool_choice", "parallel_tool_calls"}, mode="json")
    key = json.dumps([fields, parser], sort_keys=True)
    with _PLANS_LOCK:
        plan = _PLANS.get(key)
        if plan is not None:
            _PLANS.move_to_end(key)
            return plan
    plan = _tool_plan(body, parser)  # a bad request raises here, every time
    with _PLANS_LOCK:
        _PLANS[key] = plan
        while len(_PLANS) > _PLANS_KEPT:
            _PLANS.popitem(last=False)
    return plan


def _tool_plan(body: ChatCompletionRequest, parser: str | None) -> ToolPlan | None:
    choice = body.tool_choice
    if not body.tools:
        if body.tools is not None:
            raise ApiError(400, "tools must not be empty (leave it out instead)", "tools")
        if choice is not None and choice != "none":
            raise ApiError(400, "tool_choice needs tools", "tool_choice")
        if body.parallel_tool_calls is not None:
            raise ApiError(400, "parallel_tool_calls needs tools", "parallel_tool_calls")
        return None
    tools = tuple(body.tool_dicts())
    names = [tool.function.name for tool in body.tools]
    if len(set(names)) != len(names):
        raise ApiError(400, f"tools name a function twice: {sorted({n for n in names if names.count(n) > 1})}",
                       "tools")
    parallel = body.parallel_tool_calls is not False
    mode = choice if isinstance(choice, str) else ("named" if choice is not None else "auto")
    if mode == "none":
        return ToolPlan("none", tools)
    if mode == "named":
        name = choice.function.name
        if name not in names:
            raise ApiError(400, f"tool_choice names {name!r}, which is not one of the tools {names}",
                           "tool_choice")
        parameters = body.tools[names.index(name)].function.parameters
        return ToolPlan("named", tools, name=name, structured=StructuredOutput.json_schema(
            parameters if parameters is not None else {"type": "object"}))
    if mode == "required":
        return ToolPlan("required", tools, structured=StructuredOutput.json_schema(
            _calls_schema(body.tools, "parameters", array=parallel)))
    if parser is None:
        raise ApiError(400, '"auto" tool choice (the default with tools) needs a server started with '
                            '--enable-auto-tool-choice --tool-call-parser; this one was not: give '
                            'tool_choice "none", "required" or a function', "tool_choice")
    schemas = {tool.function.name: tool.function.parameters or {"type": "object"}
               for tool in body.tools if tool.function.strict}
    for name, schema in schemas.items():
        _check_schema(name, schema)
    single = not parallel
    patterns = {"hermes": lambda: _hermes_pattern(body),
                "llama3_json": lambda: _llama3_json_pattern(body, single),
                "mistral": lambda: _mistral_pattern(body, single)}
    structured = StructuredOutput.regex(patterns[parser]()) if schemas and parser in patterns else None
    stop = (CALL_CLOSE,) if single and parser == "hermes" else ()
    return ToolPlan("auto", tools, structured=structured, stop=stop, schemas=schemas, parser=parser,
                    single_call=single)


def _hermes_pattern(body: ChatCompletionRequest) -> str:
    """A Hermes "auto" answer whose ``strict`` functions' calls match their schemas as they are
    generated: text without ``<tool_call>``, then any number of blocks, each followed by such
    text. A block holds a call of a strict function (its schema's JSON, ``name`` first) or of
    another function (``{"name": "...",`` then any text without ``</tool_call>``: read as
    today, after the fact)."""
    calls = [_strict_call(body, "arguments")]
    calls += [start + regex_without(CALL_CLOSE) for start in _loose_call_starts(body)]
    free, blank = regex_without(CALL_OPEN), "[ \n]{0,2}"
    block = f"{regex_literal(CALL_OPEN)}{blank}(?:{'|'.join(calls)}){blank}{regex_literal(CALL_CLOSE)}"
    return f"{free}(?:{block}{free})*"


_ANY = r"[\s\S]*"  # any text, to the end of the answer
_SPACE = "[ \n]*"  # between calls (the readers take any whitespace; the grammar these)


def _llama3_json_pattern(body: ChatCompletionRequest, single: bool) -> str:
    """A ``llama3_json`` "auto" answer whose ``strict`` functions' calls match their schemas as
    they are generated (:class:`JsonReader`): either calls (after whitespace and an optional
    ``<|python_tag|>``: calls of strict functions, ``{"name": ..., "parameters": {...}}``
    separated by ``;``, and at most one call of another function, ``{"name": "...",`` then any
    text, last: read after the fact as before) or content that does not begin so, as the
    reader decides. ``single``: one call."""
    tag = JsonReader.TAG
    head = f"{_SPACE}(?:{regex_literal(tag)}{_SPACE})?"
    loose = [start + _ANY for start in _loose_call_starts(body)]
    calls = _calls_then_loose(_strict_call(body, "parameters"), loose, f"{_SPACE};{_SPACE}", _SPACE, single)
    # content, as the reader decides it: after the whitespace, a first character that is not
    # "{" (nor "<", or a "<" the whole tag does not follow), or the tag and then not "{"
    first, after_tag = r"[^\s\x1c-\x1f{<]", r"[^\s\x1c-\x1f{]"
    leave, part = "", ""  # after "<": the tag left before its end (then any text), or only begun
    for at, char in reversed(list(enumerate(tag[1:], 1))):
        leave = regex_other_than(char) + (f"|{regex_literal(char)}(?:{leave})" if leave else "")
        if at < len(tag) - 1:
            part = f"(?:{regex_literal(char)}{part})?"
    not_tag = f"(?:(?:{leave}){_ANY}|{part})"  # (one _ANY: nested after each branch, it compiled in
    # time exponential in the tag's length)
    content = f"{_SPACE}(?:{first}{_ANY}|<{not_tag}|{regex_literal(tag)}{_SPACE}(?:{after_tag}{_ANY})?)?"
    return f"(?:{head}{calls})|(?:{content})"


def _mistral_pattern(body: ChatCompletionRequest, single: bool) -> str:
    """A ``mistral`` "auto" answer whose ``strict`` functions' calls match their schemas as
    they are generated (:class:`MistralReader`): text without ``[TOOL_CALLS]``, then optionally
    the marker and calls, as a JSON array (``{"name": ..., "arguments": {...}}`` of strict
    functions, then at most one of another function, ``{"name": "...",`` and any text, last)
    or named (``name[ARGS]{...}``, joined by the marker; the arguments of another function any
    text, last): calls of other functions are read after the fact as before. ``single``: one
    call."""
    mark, args = MistralReader.MARK, MistralReader.ARGS
    loose = [start + _ANY for start in _loose_call_starts(body)]
    array = _calls_then_loose(_strict_call(body, "arguments"), loose, f"{_SPACE},{_SPACE}",
                              f"{_SPACE}\\]{_SPACE}", single)
    named_strict, named_loose = [], []  # name[ARGS]{...}
    for tool in body.tools:
        name = regex_literal(tool.function.name + args)
        if tool.function.strict:
            named_strict.append(name + _enforced(tool.function.parameters or {"type": "object"}))
        else:
            named_loose.append(name + _ANY)
    named = _calls_then_loose(f"(?:{'|'.join(named_strict)})", named_loose,
                              f"{_SPACE}{regex_literal(mark)}{_SPACE}", _SPACE, single)
    return f"{regex_without(mark)}(?:{regex_literal(mark)}{_SPACE}(?:\\[{_SPACE}{array}|{named}))?"


def _calls_then_loose(strict: str, loose: list[str], between: str, end: str, single: bool) -> str:
    """Calls of strict functions (``strict``: one call's pattern) joined by ``between`` (one if
    ``single``), then ``end``; or, where there are ``loose`` calls (patterns of calls of the
    other functions, each running to the answer's end), one of them last instead of ``end``
    (or alone)."""
    calls = strict if single else f"{strict}(?:{between}{strict})*"
    if not loose:
        return calls + end
    loose_call = f"(?:{'|'.join(loose)})"
    return f"(?:{calls}{end if single else f'(?:{end}|{between}{loose_call})'}|{loose_call})"


def _strict_call(body: ChatCompletionRequest, key: str) -> str:
    """The pattern of a call of one of the request's ``strict`` functions: its schema's JSON
    object, ``name`` first, the arguments under ``key``."""
    return _enforced(_calls_schema([tool for tool in body.tools if tool.function.strict], key, array=None))


def _enforced(schema: dict) -> str:
    """The pattern of ``schema``'s JSON; a 400 if it cannot be enforced."""
    try:
        return StructuredOutput.json_schema(schema).pattern()
    except RequestError as exc:
        raise ApiError(400, f"the strict functions' parameters cannot be enforced: {exc}", "tools") from None


def _loose_call_starts(body: ChatCompletionRequest) -> list[str]:
    """How a call of each function that is not ``strict`` begins, ``{"name": "<name>",`` (what
    follows is read after the fact)."""
    return [r'\{[ ]?"name"[ ]?:[ ]?"' + regex_literal(tool.function.name) + '"[ ]?,'
            for tool in body.tools if not tool.function.strict]


def _calls_schema(tools: list, key: str, array: bool | None) -> dict:
    """A call of one of ``tools`` (``{"name", <key>}`` objects, ``key`` the arguments'), or with
    ``array`` a JSON array of them (``False``: of one); their ``$defs`` lifted to the top (one
    name, one schema)."""
    items, defs = [], {}
    for tool in tools:
        parameters = dict(tool.function.parameters or {"type": "object"})
        for name, schema in (parameters.pop("$defs", None) or {}).items():
            if defs.setdefault(name, schema) != schema:
                raise ApiError(400, f"tools define $defs {name!r} twice, differently", "tools")
        items.append({"type": "object", "properties": {"name": {"const": tool.function.name}, key: parameters},
                      "required": ["name", key], "additionalProperties": False})
    schema: dict[str, Any] = {"anyOf": items}
    if array is not None:
        schema = {"type": "array", "minItems": 1, "items": schema}
        if not array:
            schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _check_schema(name: str, schema: dict) -> None:
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ApiError(400, f"the parameters of {name!r} are not a valid JSON schema: {exc.message}",
                       "tools") from None


def _matches(schema: dict, value: Any) -> bool:
    import jsonschema

    return jsonschema.validators.validator_for(schema)(schema).is_valid(value)


def call_id(parser: str | None = None) -> str:
    """A new call's id: ``call_`` and 24 hex digits; for ``mistral``, 9 alphanumeric characters
    (all Mistral's chat templates take)."""
    if parser == "mistral":
        return uuid.uuid4().hex[:9]
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """One choice's text -> OpenAI message deltas under ``plan`` (see the module doc).

    :meth:`feed` takes each new piece of text and returns the deltas it completes; text that
    may still become a call is held back until it is decided. :meth:`finish` returns the last
    deltas and the finish reason (``"tool_calls"`` when auto or required made calls). "auto"
    reads the text with the plan's parser (:class:`HermesReader`, :class:`JsonReader`).
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.calls = 0
        self._answer = ""  # required: the whole answer
        self._reader = None if plan.mode != "auto" else READERS[plan.parser](self)

    def feed(self, text: str) -> list[dict]:
        if self.plan.mode == "named":
            return [self._argument_delta(text)] if text else []
        if self.plan.mode == "required":
            self._answer += text
            return []
        return self._reader.feed(text)

    def finish(self, reason: str) -> tuple[list[dict], str]:
        mode = self.plan.mode
        if mode == "named":
            return ([self._argument_delta("")] if self.calls == 0 else []), reason
        if mode == "required":
            calls = _required_calls(self._answer) if reason == "stop" else None  # cut short: none
            return self.calls_or_content(calls, self._answer), reason if calls is None else "tool_calls"
        out = self._reader.finish(reason)
        return out, ("tool_calls" if self.calls and reason == "stop" else reason)

    def calls_or_content(self, calls: list[tuple[str, str]] | None, text: str) -> list[dict]:
        """A whole answer read at its end: the deltas of ``calls`` ((name, arguments as JSON)),
        or with None, ``text`` as content (as it was written)."""
        if calls is None:
            return [{"content": text}] if text else []
        if self.plan.single_call:  # parallel_tool_calls false: the first call
            calls = calls[:1]
        return [self.call_delta(name, arguments) for name, arguments in calls]

    def call_delta(self, name: str, arguments: str) -> dict:
        """The delta of a new call (the next ``index``, a new ``id``)."""
        delta = {"tool_calls": [{"index": self.calls, "id": call_id(self.plan.parser), "type": "function",
                                 "function": {"name": name, "arguments": arguments}}]}
        self.calls += 1
        return delta

    def known_call(self, value: Any, argument_keys: tuple[str, ...]) -> tuple[str, str] | None:
        """``{"name": ..., <one of argument_keys>: {...}}`` -> (name, arguments as JSON), or
        None when it is not a call of one of the plan's functions (or a strict one's arguments
        do not match its schema)."""
        if not isinstance(value, dict) or len(value) != 2 or "name" not in value:
            return None
        key = next((k for k in argument_keys if k in value), None)
        name, arguments = value["name"], value.get(key)
        if key is None or name not in self.plan.names or not isinstance(arguments, dict):
            return None
        if name in self.plan.schemas and not _matches(self.plan.schemas[name], arguments):
            return None
        return name, json.dumps(arguments, ensure_ascii=False)

    def _argument_delta(self, text: str) -> dict:
        if self.calls == 0:
            return self.call_delta(self.plan.name, text)
        return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}


class HermesReader:
    """"auto" with ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
    blocks anywhere in the text; the rest is content (whitespace next to a call dropped)."""

    def __init__(self, stream: ToolCallStream) -> None:
        self.stream = stream
        self._held = ""  # text not yet decided
        self._in_call = False
        self._blank = ""  # whitespace held until it is known to be content

    def feed(self, text: str) -> list[dict]:
        self._held += text
        out: list[dict] = []
        while True:
            if self._in_call:
                end = self._held.find(CALL_CLOSE)
                if end < 0:
                    return out
                out += self._block(self._held[:end], closed=True)
                self._held, self._in_call = self._held[end + len(CALL_CLOSE):], False
                continue
            start = self._held.find(CALL_OPEN)
            if start >= 0:
                out += self._content(self._held[:start])
                self._held, self._in_call = self._held[start + len(CALL_OPEN):], True
                continue
            keep = partial_tag(self._held, CALL_OPEN)
            out += self._content(self._held[:len(self._held) - keep])
            self._held = self._held[len(self._held) - keep:]
            return out

    def finish(self, reason: str) -> list[dict]:
        out: list[dict] = []
        if self._in_call:  # an open block ends the answer: a call only if it stopped there
            out += self._block(self._held, closed=False, complete=reason == "stop")
        else:
            out += self._content(self._held)
        self._held, self._in_call = "", False
        if self._blank and not self.stream.calls:
            out.append({"content": self._blank})
        self._blank = ""
        return out

    def _content(self, text: str) -> list[dict]:
        """Content; whitespace at its end waits for what follows (before a call, and after the
        last one, it is dropped)."""
        body = text.rstrip()
        if not body:
            self._blank += text
            return []
        out, self._blank = self._blank + body, text[len(body):]
        return [{"content": out}]

    def _block(self, body: str, closed: bool, complete: bool = True) -> list[dict]:
        call = self.stream.known_call(_json_or_none(body), ("arguments",)) if complete else None
        if call is None:
            written = CALL_OPEN + body + (CALL_CLOSE if closed else "")
            text, self._blank = self._blank + written, ""
            return [{"content": text}]
        self._blank = ""
        return [self.stream.call_delta(*call)]


class JsonReader:
    """"auto" with ``llama3_json`` (Llama 3.x): an answer that begins, after whitespace and an
    optional ``<|python_tag|>``, with ``{`` is one or more ``{"name": ..., "parameters": {...}}``
    objects (or ``"arguments"``) separated by ``;``: calls if every one is a call of one of the
    tools, else the whole text is content. It is held to the end; any other answer is content
    as it streams."""

    TAG = "<|python_tag|>"

    def __init__(self, stream: ToolCallStream) -> None:
        self.stream = stream
        self._answer = HeldAnswer(stream, lambda text: decide_by_start(text, self.TAG, "{"),
                                  lambda text: _json_calls(text, stream))

    def feed(self, text: str) -> list[dict]:
        return self._answer.feed(text)

    def finish(self, reason: str) -> list[dict]:
        return self._answer.finish(reason)


def _json_calls(text: str, stream: ToolCallStream) -> list[tuple[str, str]] | None:
    """The calls of a Llama 3 JSON answer (see :class:`JsonReader`), or None."""
    text = text.strip()
    if text.startswith(JsonReader.TAG):
        text = text[len(JsonReader.TAG):]
    decoder, calls, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        call = stream.known_call(value, ("parameters", "arguments"))
        if call is None:
            return None
        calls.append(call)
        rest = text[at:].lstrip()
        if not rest:
            return calls
        if not rest.startswith(";"):
            return None
        at = len(text) - len(rest) + 1


READERS = {"hermes": HermesReader, "llama3_json": JsonReader, "pythonic": PythonicReader,
           "mistral": MistralReader}


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _required_calls(text: str) -> list[tuple[str, str]] | None:
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not all(isinstance(i, dict) and {"name", "parameters"} <= set(i)
                                              for i in items):
        return None
    return [(item["name"], json.dumps(item["parameters"], ensure_ascii=False)) for item in items]
