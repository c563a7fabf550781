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
"""

from __future__ import annotations

from typing import Literal

from .tags import partial_tag

REASONING_PARSERS = ("deepseek_r1", "qwen3")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ReasoningStream:
    """One choice's text -> ``{"reasoning": ...}`` and ``{"content": ...}`` deltas."""

    def __init__(self, parser: str) -> None:
        if parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning parser must be one of {REASONING_PARSERS}, got {parser!r}")
        self.parser = parser
        self._state: Literal["start", "reasoning", "after", "content"] = "start"
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
