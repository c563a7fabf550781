"""More of vLLM's tool-call parsers for "auto" (:mod:`.tools` has ``hermes`` and
``llama3_json``): ``pythonic`` and ``mistral``.

- ``pythonic`` (Llama 3.2 / 4, vLLM's ``pythonic``): an answer that is a Python list of calls
  with keyword arguments, ``[get_weather(city="Paris"), add(a=1, b=2)]`` (optionally between
  ``<|python_start|>`` and ``<|python_end|>``), every value a Python literal. Held to the end:
  calls if it is such a list and every call is one of the tools, else content.
- ``mistral`` (Mistral's tokenizers, vLLM's ``mistral``): the text before ``[TOOL_CALLS]`` is
  content; after it, a JSON array of ``{"name", "arguments"}`` objects (tokenizers before v11)
  or ``name[ARGS]{...}`` calls, each after its own ``[TOOL_CALLS]`` (v11 and later; an optional
  ``[CALL_ID]id`` before ``[ARGS]``). Held from the marker to the end: calls if every one is a
  call of one of the tools, else the text as written. Mistral's chat templates take only
  9-character alphanumeric call ids: calls read by this parser get such ids.

Both are read whole at the end of the answer (like ``llama3_json``): with
``parallel_tool_calls: false`` the first of the calls read is kept.
"""

from __future__ import annotations

import ast
import json
from typing import TYPE_CHECKING, Any, Callable, Literal

from .tags import partial_tag

if TYPE_CHECKING:
    from .tools import ToolCallStream


Decision = Literal["undecided", "content", "calls"]


def decide_by_start(text: str, tag: str, opener: str) -> Decision:
    """Calls if ``text`` begins (after whitespace and an optional ``tag``) with ``opener``,
    content if with anything else, undecided while it is empty or may still be ``tag``."""
    head = text.lstrip()
    if head.startswith(tag):
        head = head[len(tag):].lstrip()
    elif tag.startswith(head):  # empty, or the tag's beginning
        return "undecided"
    if not head:
        return "undecided"
    return "calls" if head.startswith(opener) else "content"


class HeldAnswer:
    """An answer that is either all calls or all content (``llama3_json``, ``pythonic``):
    ``decide(text so far)`` says which from its beginning; content streams as it comes, calls
    are held to the end and read whole by ``read(text)`` (a list of (name, arguments as JSON),
    or None: the text is content after all)."""

    def __init__(self, stream: ToolCallStream, decide: Callable[[str], Decision],
                 read: Callable[[str], list[tuple[str, str]] | None]) -> None:
        self.stream, self._decide, self._read = stream, decide, read
        self._held = ""
        self._state: Decision = "undecided"

    def feed(self, text: str) -> list[dict]:
        if self._state == "content":
            return [{"content": text}] if text else []
        self._held += text
        if self._state == "undecided":
            self._state = self._decide(self._held)
            if self._state == "content":
                held, self._held = self._held, ""
                return [{"content": held}]
        return []

    def finish(self, reason: str) -> list[dict]:
        held, self._held = self._held, ""
        return self.stream.calls_or_content(
            self._read(held) if self._state == "calls" and reason == "stop" else None, held)


class PythonicReader:
    """"auto" with ``pythonic``: see the module doc."""

    START, END = "<|python_start|>", "<|python_end|>"

    def __init__(self, stream: ToolCallStream) -> None:
        self.stream = stream
        self._answer = HeldAnswer(stream, lambda text: decide_by_start(text, self.START, "["), self._calls)

    def feed(self, text: str) -> list[dict]:
        return self._answer.feed(text)

    def finish(self, reason: str) -> list[dict]:
        return self._answer.finish(reason)

    def _calls(self, text: str) -> list[tuple[str, str]] | None:
        text = text.strip()
        if text.startswith(self.START):
            text = text[len(self.START):]
        if text.endswith(self.END):
            text = text[:-len(self.END)]
        try:
            tree = ast.parse(text.strip(), mode="eval").body
        except SyntaxError:
            return None
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for node in tree.elts:
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args
                    and all(keyword.arg is not None for keyword in node.keywords)):
                return None
            try:
                arguments = {keyword.arg: _json_value(ast.literal_eval(keyword.value))
                             for keyword in node.keywords}
            except (ValueError, TypeError, SyntaxError):
                return None
            call = self.stream.known_call({"name": node.func.id, "arguments": arguments}, ("arguments",))
            if call is None:
                return None
            calls.append(call)
        return calls


def _json_value(value: Any) -> Any:
    """A Python literal as JSON's value (tuples as lists); TypeError for what JSON has not."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: _json_value(item) for key, item in value.items()}
    raise TypeError(f"not a JSON value: {value!r}")


class MistralReader:
    """"auto" with ``mistral``: see the module doc."""

    MARK, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"

    def __init__(self, stream: ToolCallStream) -> None:
        self.stream = stream
        self._held = ""
        self._in_calls = False

    def feed(self, text: str) -> list[dict]:
        self._held += text
        if self._in_calls:
            return []
        start = self._held.find(self.MARK)
        if start >= 0:
            content, self._held, self._in_calls = self._held[:start], self._held[start:], True
            return [{"content": content}] if content else []
        keep = partial_tag(self._held, self.MARK)
        content, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        return [{"content": content}] if content else []

    def finish(self, reason: str) -> list[dict]:
        held, self._held = self._held, ""
        return self.stream.calls_or_content(self._calls(held) if self._in_calls and reason == "stop" else None,
                                            held)

    def _calls(self, text: str) -> list[tuple[str, str]] | None:
        """``text`` begins with the marker."""
        body = text[len(self.MARK):].strip()
        if body.startswith("["):  # [{"name": ..., "arguments": {...}}, ...]
            try:
                value, end = json.JSONDecoder().raw_decode(body)
            except ValueError:
                return None
            if body[end:].strip() or not isinstance(value, list) or not value:
                return None
            found = [self.stream.known_call(item, ("arguments",)) for item in value]
        else:  # name[ARGS]{...}[TOOL_CALLS]name[ARGS]{...}
            found = [self._named(part) for part in text.split(self.MARK)[1:]]
        return None if any(call is None for call in found) else found

    def _named(self, part: str) -> tuple[str, str] | None:
        name, args, arguments = part.partition(self.ARGS)
        name = name.partition(self.CALL_ID)[0].strip()
        try:
            value = json.loads(arguments) if args else None
        except ValueError:
            return None
        return self.stream.known_call({"name": name, "arguments": value}, ("arguments",))
