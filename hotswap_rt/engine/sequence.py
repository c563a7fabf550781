"""One request inside the engine: its tokens, its place in the KV memory, its stop rules, and the
events it streams to whoever submitted it.

Events (from the engine thread, in order): one :class:`TokenEvent` per generated token (its text
delta may be empty while text is held back: a partial UTF-8 character, or what may be the start
of a stop string), then exactly one :class:`FinishEvent`.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from .sampling import RowSampling, SamplingParams


class Tokenizer(Protocol):
    """What the engine needs of a tokenizer."""

    eos_token_id: int | None

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class TokenEvent:
    """A generated token. ``text``: the output text it made visible (may be "")."""

    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(frozen=True)
class FinishEvent:
    """The end of a request. ``reason``: "stop", "length", "cancelled" or "error" (``error``
    says why). All of the output text has come with the token events before it.
    ``cached_tokens``: prompt tokens whose KV came from the prefix cache."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    cached_tokens: int = 0


Event = TokenEvent | FinishEvent


class RequestHandle:
    """What :meth:`GenerationEngine.submit` returns: cancel it, or iterate its events.

    With no ``sink`` the events queue up here and iterating blocks until the next one; with a
    ``sink`` (e.g. ``loop.call_soon_threadsafe`` into an asyncio queue) every event is passed to
    it on the engine thread instead, and the handle is not iterable.

    Each event is handed out once: a second loop over the handle goes on after the events
    the first one took (none once the finish was taken), and :meth:`text` returns the whole
    output however much of it was iterated before, again on every later call.
    """

    def __init__(self, request_id: str, sink: Callable[[Event], None] | None,
                 wake: Callable[[], None]) -> None:
        self.request_id = request_id
        self._queue: queue.SimpleQueue[Event] | None = None if sink is not None else queue.SimpleQueue()
        self.sink: Callable[[Event], None] = sink if sink is not None else self._queue.put
        self.cancelled = threading.Event()
        self._wake = wake
        self._text_taken: list[str] = []  # the text of the token events handed out so far
        self._finish: FinishEvent | None = None  # set once the finish event was handed out

    def cancel(self) -> None:
        """End the request at the next step: its KV row is freed, it finishes "cancelled"."""
        self.cancelled.set()
        self._wake()

    def __iter__(self) -> Iterator[Event]:
        """The events not handed out yet, blocking for each. Raises ``TypeError`` at once (at
        ``iter()``, not at the first ``next()``) for a request that streams to its sink."""
        if self._queue is None:
            raise TypeError("this request streams to its sink; it cannot be iterated")
        return self._events(self._queue)

    def _events(self, events: queue.SimpleQueue[Event]) -> Iterator[Event]:
        while self._finish is None:
            event = events.get()
            if isinstance(event, FinishEvent):
                self._finish = event
            else:
                self._text_taken.append(event.text)
            yield event

    def text(self) -> tuple[str, FinishEvent]:
        """Wait for the end; the whole output text and the finish event."""
        for _ in self:
            pass
        assert self._finish is not None
        return "".join(self._text_taken), self._finish


class Detokenizer:
    """Incremental decoding: text grows by the delta of a short window of recent tokens, so
    each token costs O(1) however long the output, and a multi-token character (partial UTF-8,
    ``U+FFFD``) is only emitted once complete."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window (context for the next delta)
        self._read = 0  # tokens whose text is already in self.text
        self.text = ""

    def push(self, token: int) -> None:
        self._ids.append(token)
        before = self._tokenizer.decode(self._ids[self._prefix:self._read])
        after = self._tokenizer.decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)

    def flush(self) -> None:
        """At the end: make the held-back tail visible (an incomplete character as U+FFFD)."""
        before = self._tokenizer.decode(self._ids[self._prefix:self._read])
        self.text += self._tokenizer.decode(self._ids[self._prefix:])[len(before):]
        self._prefix = self._read = len(self._ids)


class Sequence:
    """A request's generation state (engine thread only, except ``handle.cancel``).

    Attributes:
        prompt_ids: the prompt's token ids.
        adapter: its activation (a name, ``{name: weight}`` or None).
        cached: tokens of this sequence written to its KV row.
        output_ids: generated tokens; the last one is not yet in the KV row while decoding.
        cache_salt: only requests with the same salt share prefix-cache KV (None: no salt).
        weights_key: its cache salt and what its KV is computed with (the prefix cache's key;
            None: not cached).
        cached_prompt_tokens: prompt tokens whose KV the prefix cache gave.
    """

    def __init__(self, handle: RequestHandle, prompt_ids: list[int], adapter: object,
                 params: SamplingParams, sampling: RowSampling, tokenizer: Tokenizer,
                 eos_ids: frozenset[int], max_len: int, cache_salt: str | None = None) -> None:
        self.handle = handle
        self.prompt_ids = prompt_ids
        self.adapter = adapter
        self.params = params
        self.sampling = sampling
        self.eos_ids = eos_ids
        self.max_len = max_len
        self.cached = 0
        self.output_ids: list[int] = []
        self.cache_salt = cache_salt
        self.weights_key: tuple | None = None
        self.cached_prompt_tokens = 0
        self.finish_reason: str | None = None
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self._detokenizer = Detokenizer(tokenizer)
        self._emitted = 0  # characters of detokenizer text already sent
        self._hold = max((len(s) - 1 for s in params.stop), default=0)

    @property
    def adapter_names(self) -> list[str]:
        if self.adapter is None:
            return []
        if isinstance(self.adapter, str):
            return [self.adapter]
        return [name for name, weight in self.adapter.items() if weight != 0.0]

    @property
    def prefill_done(self) -> bool:
        return self.cached >= len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def computed_ids(self) -> list[int]:
        """The tokens whose KV its row holds (positions ``0 .. cached - 1``)."""
        return (self.prompt_ids + self.output_ids)[:self.cached]

    def next_chunk(self, size: int) -> list[int]:
        """The next prompt tokens to prefill (at positions ``cached ..``)."""
        return self.prompt_ids[self.cached:self.cached + size]

    def accept(self, token: int, logprobs: tuple[float, list[tuple[int, float]]] | None) -> None:
        """Take the sampled ``token``: stream it, then finish if a rule says so."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.output_ids.append(token)
        logprob, top = logprobs if logprobs is not None else (None, None)
        params, generated = self.params, len(self.output_ids)
        stops = generated >= params.min_tokens  # no stop rule applies before min_tokens
        if (stops and token in params.stop_token_ids) or (
                stops and not params.ignore_eos and token in self.eos_ids):
            self._detokenizer.flush()  # the end token itself adds no text
            return self._finish_with(token, logprob, top, "stop", visible=len(self._detokenizer.text))
        self._detokenizer.push(token)
        text = self._detokenizer.text
        if stops and params.stop:
            start = max(0, self._emitted - self._hold)
            cuts = [i for i in (text.find(s, start) for s in params.stop) if i >= 0]
            if cuts:
                return self._finish_with(token, logprob, top, "stop", visible=min(cuts))
        if generated >= params.max_tokens or len(self.prompt_ids) + generated >= self.max_len:
            self._detokenizer.flush()
            return self._finish_with(token, logprob, top, "length", visible=len(self._detokenizer.text))
        visible = max(self._emitted, len(text) - self._hold)
        self.handle.sink(TokenEvent(token, text[self._emitted:visible], logprob, top))
        self._emitted = visible

    def _finish_with(self, token: int, logprob: float | None, top: list | None, reason: str,
                     visible: int) -> None:
        """Stream the last token with the text up to ``visible``, then finish."""
        text = self._detokenizer.text
        self.handle.sink(TokenEvent(token, text[self._emitted:max(visible, self._emitted)], logprob, top))
        self._emitted = max(visible, self._emitted)
        self.finish(reason)

    def finish(self, reason: str, error: str | None = None) -> None:
        """End the request (once): the finish event with the usage."""
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        self.handle.sink(FinishEvent(reason, len(self.prompt_ids), len(self.output_ids), error,
                                     self.cached_prompt_tokens))
