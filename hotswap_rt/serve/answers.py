"""One chat choice's text -> OpenAI message deltas: the reasoning split off first
(:mod:`.reasoning`, with a reasoning parser), then tool calls read from the content
(:mod:`.tools`, with tools). :class:`AnswerStream` does it as the text streams;
:func:`answer_message` is the same stream fed a whole answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .protocol import ChatCompletionRequest
from .reasoning import PromptReasoning, ReasoningStream
from .tools import ToolCallStream, ToolPlan, tool_plan


class AnswerStream:
    """Deltas (``{"reasoning"}``, ``{"content"}``, ``{"tool_calls"}``) of one choice.

    Args:
        reasoning: the reasoning parser, or None (all text is content).
        tools: the request's tool plan, or None.
        include_reasoning: False drops the reasoning (vLLM's ``include_reasoning``).
        prompt: what the prompt's end did to the think block (:func:`.reasoning.prompt_reasoning`).
    """

    def __init__(self, reasoning: str | None, tools: ToolPlan | None, include_reasoning: bool = True,
                 prompt: PromptReasoning = None) -> None:
        self._reasoning = ReasoningStream(reasoning, prompt) if reasoning is not None else None
        self._tools = ToolCallStream(tools) if tools is not None else None
        self._include_reasoning = include_reasoning

    def feed(self, text: str) -> list[dict]:
        return self._route(self._reasoning.feed(text) if self._reasoning else [{"content": text}])

    def finish(self, reason: str) -> tuple[list[dict], str]:
        """The last deltas and the finish reason (``"tool_calls"`` when the tools made calls)."""
        out = self._route(self._reasoning.finish()) if self._reasoning else []
        if self._tools is not None:
            last, reason = self._tools.finish(reason)
            out += last
        return out, reason

    def _route(self, pieces: list[dict]) -> list[dict]:
        out: list[dict] = []
        for piece in pieces:
            if "reasoning" in piece:
                if self._include_reasoning:
                    out.append(piece)
            elif self._tools is not None:
                out += self._tools.feed(piece["content"])
            elif piece["content"]:
                out.append(piece)
        return out


def answer_message(text: str, reason: str, tools: ToolPlan | None = None, reasoning: str | None = None,
                   include_reasoning: bool = True,
                   prompt: PromptReasoning = None) -> tuple[dict[str, Any], str]:
    """A whole answer's ``message`` (``content``, and ``reasoning`` / ``tool_calls`` when there
    are) and finish reason: the deltas a stream of ``text`` gives, joined."""
    stream = AnswerStream(reasoning, tools, include_reasoning, prompt)
    deltas = stream.feed(text)
    last, reason = stream.finish(reason)
    content, thought, calls = "", "", []
    for delta in [*deltas, *last]:
        content += delta.get("content", "")
        thought += delta.get("reasoning", "")
        for call in delta.get("tool_calls", []):
            if "id" in call:
                calls.append({key: dict(value) if isinstance(value, dict) else value
                              for key, value in call.items() if key != "index"})
            else:
                calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if thought:
        message["reasoning"] = thought
    if calls:
        message["tool_calls"] = calls
    return message, reason


@dataclass(frozen=True)
class AnswerPlan:
    """How a chat request's answers are read: its reasoning parser (and what its prompt did to
    the think block) and tool plan."""

    reasoning: str | None
    tools: ToolPlan | None
    include_reasoning: bool = True
    prompt: PromptReasoning = None

    def stream(self) -> AnswerStream:
        return AnswerStream(self.reasoning, self.tools, self.include_reasoning, self.prompt)

    def message(self, text: str, reason: str) -> tuple[dict[str, Any], str]:
        return answer_message(text, reason, self.tools, self.reasoning, self.include_reasoning, self.prompt)


def answer_plan(body: ChatCompletionRequest, tool_parser: str | None, reasoning_parser: str | None,
                prompt: PromptReasoning = None) -> AnswerPlan | None:
    """The plan for ``body`` on a server with these parsers, its prompt ending as ``prompt``
    says (:func:`.reasoning.prompt_reasoning`); None: its answers are plain content. An answer
    a grammar constrains reasons first too (its grammar starts after the reasoning: see
    :func:`.reasoning.reasoning_pattern`). Raises ``ApiError`` 400 for bad tool fields."""
    tools = tool_plan(body, tool_parser)
    if tools is not None and tools.mode == "none":
        tools = None
    if tools is None and reasoning_parser is None:
        return None
    return AnswerPlan(reasoning_parser, tools, body.include_reasoning, prompt)
