"""One batched ``generate`` over rows that each have their own adapter, sampling and stop rules.

Every batch has the same shapes, so the compiled graphs are reused and nothing recompiles:
``[max_batch_size, max_prompt_tokens]`` prompts (left-padded; unused rows are one-token dummies
that are finished from the start) and ``max_new_tokens`` = the server's limit. Rows finish on
their own (end-of-sequence, their ``max_tokens``, a stop string, a cancelled request); the
``generate`` call ends when every row has finished.

Per-row sampling runs inside a greedy ``generate``: :class:`RowSampler` draws the token of each
sampling row (temperature, top-p, its own seeded generator) and leaves only that token
possible, so the greedy pick is the sampled token.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList


class Tokenizer(Protocol):
    pad_token_id: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def chat_prompt(self, messages: list[dict[str, str]]) -> str: ...


@dataclass
class Row:
    """One request's generation state. ``emit(kind, value)`` is called from the inference thread:
    ``("token", text_delta)`` for new text, then ``("finish", reason)`` once."""

    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int
    emit: Callable[[str, object], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    first_token_at: float | None = None
    generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.emit("finish", reason)

    def accept(self, token: int, tokenizer: Tokenizer) -> None:
        """Take the row's next token: emit the new text, then finish if a rule says so."""
        if self.cancelled.is_set():
            return self.finish("cancelled")
        if token == tokenizer.eos_token_id:
            return self.finish("stop")
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens.append(token)
        text = tokenizer.decode(self.tokens)
        stop_at = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if stop_at >= 0:
            self._emit_text(text[:stop_at])
            return self.finish("stop")
        if len(self.tokens) >= self.max_tokens:
            self._emit_text(text)
            return self.finish("length")
        # Hold back a trailing partial UTF-8 character and a possible stop-string prefix.
        visible = text.rstrip("\ufffd")
        hold = max((len(s) - 1 for s in self.stop), default=0)
        self._emit_text(visible[: max(len(self.text), len(visible) - hold)])

    def _emit_text(self, text: str) -> None:
        if len(text) > len(self.text) and text.startswith(self.text):
            self.emit("token", text[len(self.text):])
            self.text = text


class RowSampler(LogitsProcessor):
    """For sampling rows, draw the next token and mask every other one (see module doc)."""

    def __init__(self, rows: list[Row | None]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, row in enumerate(self.rows):
            if row is None or row.finished or row.temperature <= 0:
                continue
            probs = torch.softmax(scores[i].float() / row.temperature, dim=-1)
            if row.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                outside = sorted_probs.cumsum(0) - sorted_probs > row.top_p  # keeps the first
                probs = probs.scatter(0, order[outside], 0.0)
            token = int(torch.multinomial(probs, 1, generator=row.generator))
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores


class RowStepper(StoppingCriteria):
    """Called after every generated token: feeds each row its token, reports finished rows."""

    def __init__(self, rows: list[Row | None], tokenizer: Tokenizer) -> None:
        self.rows = rows
        self.tokenizer = tokenizer

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        newest = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, newest):
            if row is not None and not row.finished:
                row.accept(token, self.tokenizer)
        return torch.tensor([row is None or row.finished for row in self.rows], device=input_ids.device)


@dataclass(frozen=True)
class BatchShape:
    """The one shape every batch has (so the compiled graphs never change)."""

    rows: int  # max_batch_size
    prompt_tokens: int  # max_prompt_tokens: prompts are left-padded to this
    new_tokens: int  # max_new_tokens of every generate call (rows stop earlier on their own)


def build_inputs(rows: list[Row | None], shape: BatchShape, tokenizer: Tokenizer,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` ``[shape.rows, shape.prompt_tokens]``;
    an empty row holds one end-of-sequence token (attended, so its attention is well defined)."""
    pad = tokenizer.pad_token_id
    filler = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad
    ids = torch.full((shape.rows, shape.prompt_tokens), pad, dtype=torch.long)
    mask = torch.zeros((shape.rows, shape.prompt_tokens), dtype=torch.long)
    for i in range(shape.rows):
        row = rows[i] if i < len(rows) else None
        prompt = row.prompt_ids if row is not None else [filler]
        if len(prompt) > shape.prompt_tokens:
            raise ValueError(f"prompt of {len(prompt)} tokens > {shape.prompt_tokens}")
        ids[i, shape.prompt_tokens - len(prompt):] = torch.tensor(prompt)
        mask[i, shape.prompt_tokens - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def run_batch(model: torch.nn.Module, rows: list[Row | None], shape: BatchShape,
              tokenizer: Tokenizer, device: torch.device) -> None:
    """Generate for ``rows`` (padded with ``None`` to ``shape.rows``) until every row finishes.
    The caller has already selected each row's adapter (``rt.activate_rows``)."""
    rows = list(rows) + [None] * (shape.rows - len(rows))
    for row in rows:
        if row is not None and row.temperature > 0 and row.generator is None:
            row.generator = torch.Generator()
            if row.seed is not None:
                row.generator.manual_seed(row.seed)
            else:
                row.generator.seed()
    ids, mask = build_inputs(rows, shape, tokenizer, device)
    with torch.no_grad():
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=shape.new_tokens, do_sample=False,
            cache_implementation="static", pad_token_id=tokenizer.pad_token_id,
            logits_processor=LogitsProcessorList([RowSampler(rows)]),
            stopping_criteria=StoppingCriteriaList([RowStepper(rows, tokenizer)]),
        )
    for row in rows:  # generate hit max_new_tokens first (max_tokens > new_tokens cannot happen)
        if row is not None:
            row.finish("length")
