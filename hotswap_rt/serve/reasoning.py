"""Reasoning output on ``/v1/chat/completions``: a reasoning model's ``<think>...</think>``
block goes to ``message.reasoning`` (streamed: ``delta.reasoning``), the rest to ``content``
(vLLM's ``--reasoning-parser`` and field name).

Parsers (``ServeConfig.reasoning_parser``):

- ``deepseek_r1``: everything before ``</think>`` is reasoning (a ``<think>`` at the start is
  dropped: the chat template may already have opened the block, as DeepSeek-R1's and Qwen3
  2507's do); an answer that never closes it is all reasoning.
- ``qwen3``: an answer that opens with ``<think>`` reasons until ``</think>`` (never closed:
  all reasoning); any other answer is all content.

Whitespace after ``</think>`` is dropped. Tool calls (:mod:`.tools`) are read from the content
only. :class:`ReasoningStream` splits a choice's text as it streams; a whole answer is the
same stream fed at once, so the two never differ.

The prompt decides first (:func:`prompt_reasoning`): a chat template that ends its prompt
with ``<think>`` (DeepSeek-R1, Qwen3 2507 thinking) opened the block, so the answer reasons
until ``</think>`` whatever the parser; one that ends it with ``</think>`` (Qwen3 with
``enable_thinking: false``) closed it, so the answer is all content.

An answer a grammar constrains (structured output, a required or named tool choice) reasons
first, unconstrained: :func:`reasoning_pattern` is the regular expression of the reasoning the
parser reads, which the grammar is prefixed with (the constraint starts after ``</think>``, as
vLLM starts it after the reasoning ends).
"""

from __future__ import annotations

from typing import Literal

from ..engine.structured import regex_literal, regex_without
from .tags import partial_tag

REASONING_PARSERS = ("deepseek_r1", "qwen3")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
PromptReasoning = Literal["open", "closed"] | None
_WHITESPACE_AFTER = "[ \\t\\r\\n]{0,4}"  # a grammar's room between </think> and the answer


def prompt_reasoning(prompt: str) -> PromptReasoning:
    """``"open"``: the prompt ends with ``<think>`` (the template opened the block); ``"closed"``:
    with ``</think>`` (the template closed it: no reasoning); None: neither (trailing
    whitespace aside). Only the end counts: a tag in a message earlier is not the template's."""
    tail = prompt.rstrip()
    if tail.endswith(THINK_CLOSE):
        return "closed"
    return "open" if tail.endswith(THINK_OPEN) else None


def reasoning_pattern(parser: str, prompt: PromptReasoning) -> str | None:
    """The regular expression (outlines-core's dialect) of the reasoning ``parser`` reads at
    the start of an answer to a prompt in state ``prompt``, whitespace after it included:
    text without ``</think>``, then ``</think>``; for ``qwen3`` after a prompt that did not
    open the block, ``<think>`` first (Qwen3 opens it itself when it thinks, and writes an
    empty block when it does not; an optional block would cost outlines-core's index many
    times the answer's own). None: the answer has no reasoning (the prompt closed it)."""
    if prompt == "closed":
        return None
    block = regex_without(THINK_CLOSE) + regex_literal(THINK_CLOSE) + _WHITESPACE_AFTER
    return regex_literal(THINK_OPEN) + block if prompt is None and parser == "qwen3" else block


def reasoning_length(text: str, parser: str, prompt: PromptReasoning = None) -> int:
    """How many characters at the start of an answer ``text`` are its think block (its tags
    included): what :class:`ReasoningStream` reads as reasoning, whitespace after it aside."""
    if prompt == "closed" or (prompt is None and parser == "qwen3" and not text.startswith(THINK_OPEN)):
        return 0
    end = text.find(THINK_CLOSE)
    return len(text) if end < 0 else end + len(THINK_CLOSE)


class ReasoningStream:
    """One choice's text -> ``{"reasoning": ...}`` and ``{"content": ...}`` deltas.

    Args:
        parser: ``"deepseek_r1"`` or ``"qwen3"``.
        prompt: what the prompt's end did to the block (:func:`prompt_reasoning`): ``"open"``
            (the answer reasons from its first character), ``"closed"`` (all content) or None
            (the parser decides).
    """

    def __init__(self, parser: str, prompt: PromptReasoning = None) -> None:
        if parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning parser must be one of {REASONING_PARSERS}, got {parser!r}")
        self.parser = parser
        self._state: Literal["start", "reasoning", "after", "content"] = (
            "reasoning" if prompt == "open" else "content" if prompt == "closed" else "start")
        self._held = ""

    def feed(self, text: str) -> list[dict]:
        self._held += text
        out: list[dict] = []
        while True:
            state, held = self._state, self._held
            if state == "start":
                if held.startswith(THINK_OPEN):
                    self._held, self._state = held[len(THINK_OPEN):], "reasoning"
                elif THINK_OPEN.startswith(held):  # empty, or the tag's beginning: undecided
                    return out
                else:
                    self._state = "reasoning" if self.parser == "deepseek_r1" else "content"
                continue
            if state == "reasoning":
                end = held.find(THINK_CLOSE)
                if end >= 0:
                    out += _delta("reasoning", held[:end])
                    self._held, self._state = held[end + len(THINK_CLOSE):], "after"
                    continue
                keep = partial_tag(held, THINK_CLOSE)
                out += _delta("reasoning", held[:len(held) - keep])
                self._held = held[len(held) - keep:]
                return out
            if state == "after":  # whitespace after the block is dropped
                self._held = held.lstrip()
                if not self._held:
                    return out
                self._state = "content"
                continue
            self._held = ""
            return out + _delta("content", held)

    def finish(self) -> list[dict]:
        held, self._held = self._held, ""
        if self._state == "start":  # nothing, or only the beginning of "<think>", was written
            return _delta("content" if self.parser == "qwen3" else "reasoning", held)
        if self._state == "after":
            return []
        return _delta("reasoning" if self._state == "reasoning" else "content", held)


def _delta(kind: str, text: str) -> list[dict]:
    return [{kind: text}] if text else []
