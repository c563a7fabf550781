"""Structured output: every generated token of a request constrained so that its output matches
a JSON schema, is a JSON object, matches a regular expression, or is one of given strings.

::

    StructuredOutput --regex--> Index (outlines-core: an automaton over the vocabulary's bytes,
                                       compiled once per spec and vocabulary, then cached)
    per request:     RowGrammar (the automaton's state)
    per step:        the tokens each structured row's state bans are set to -inf in its scores
                     (mask_scores): a state met before is kept on the device, as the ids it
                     bans where they are few, else as a bias (0 / -inf) added to the row; a new
                     state's mask is packed on the host (V / 8 bytes a row), copied, unpacked
                     by a byte table; the sampled token advances the state; end-of-sequence is
                     allowed where the output may end

Where the output may end is marked explicitly: every pattern is compiled followed by an end
character (:data:`END`, a private-use character no token of the vocabulary may hold) whose
token is synthetic (an id past the logits), and end-of-sequence is allowed in a state exactly
when that token leads to a final one. outlines-core (0.2) drops, from a state where the text
may end, every token that leads to one where it may not (``a(bc)?``: no ``b`` after ``a``
with one-character tokens): with the end marked, the only final state is after it.

The vocabulary is the tokenizer's: each token id's bytes (``token_bytes()``; special tokens
have none and are never allowed, end-of-sequence excepted). JSON schemas become regular
expressions (``outlines_core.json_schema``): objects, arrays, strings, numbers, booleans, null,
``enum``, ``const``, ``required``, ``anyOf`` ...; compact JSON (at most one space between
tokens of the syntax). Needs ``outlines-core`` (in the ``serve`` extra).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch

from .device_values import device_values
from .sampling import RequestError

KINDS = ("json_object", "json_schema", "regex")
_ANY_OBJECT = '{"type": "object"}'
_CACHED_INDEXES = 64
END = "\U0010fffd"  # marks where an output may end (see the module doc)
_END_LEAD = END.encode()[0]  # 0xF4: tokens holding it (plane 16 characters) are left out


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match. Build with :meth:`json_schema`,
    :meth:`json_object` or :meth:`regex`.

    Attributes:
        kind: "json_schema", "json_object" (any JSON object) or "regex".
        spec: the schema as JSON text, or the regular expression ("" for json_object).
    """

    kind: Literal["json_object", "json_schema", "regex"]
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RequestError("response_format", f"kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.spec, str) or (self.kind != "json_object" and not self.spec):
            raise RequestError("response_format", f"{self.kind} needs a non-empty spec, got {self.spec!r}")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> StructuredOutput:
        """Output matching ``schema`` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            text = schema
        elif isinstance(schema, Mapping):
            text = json.dumps(schema)  # its order kept: properties are generated in it
        else:
            raise RequestError("response_format", f"a JSON schema must be an object, got {schema!r}")
        return cls("json_schema", text)

    @classmethod
    def json_object(cls) -> StructuredOutput:
        """Output that is one JSON object (any keys and values)."""
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> StructuredOutput:
        """Output matching the regular expression ``pattern`` (whole)."""
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> StructuredOutput:
        """Output that is exactly one of ``options`` (non-empty strings)."""
        if isinstance(options, str) or not options or not all(isinstance(o, str) and o for o in options):
            raise RequestError("response_format", f"choices must be a non-empty list of non-empty "
                                                  f"strings, got {options!r}")
        return cls("regex", "(" + "|".join(regex_literal(o) for o in options) + ")")

    def after(self, prefix: str) -> StructuredOutput:
        """The output is ``prefix`` (a regular expression: a reasoning model's think block),
        then what this spec asks for."""
        return StructuredOutput("regex", f"{prefix}(?:{self.pattern()})")

    def pattern(self) -> str:
        """The regular expression the output must match.

        Raises:
            RequestError: a schema that is not JSON or that outlines-core cannot express.
        """
        if self.kind == "regex":
            return self.spec
        from outlines_core.json_schema import build_regex_from_schema

        text = _ANY_OBJECT if self.kind == "json_object" else self.spec
        try:
            json.loads(text)
            return build_regex_from_schema(text)
        except (ValueError, TypeError) as exc:
            raise RequestError("response_format", f"unsupported JSON schema: {exc}") from None


def regex_literal(text: str) -> str:
    """``text`` as a literal of outlines-core's regex dialect (Rust's ``regex``: its
    metacharacters escaped, nothing else: ``\\<`` would be a word boundary there)."""
    return "".join("\\" + c if c in _META else c for c in text)


_META = set("\\.+*?()|[]{}^$#&-~")


def regex_without(marker: str) -> str:
    """A regular expression of every text that does not contain ``marker``, whose first
    character appears nowhere else in it (so a partial match that fails never hides the start
    of another). Such a text is runs of other characters and attempts: the first character,
    then part of the rest; an attempt ends with a character that is neither the next one of
    ``marker`` nor its first, or is followed by another attempt, or ends the text."""
    first = marker[0]
    if len(marker) < 2 or first in marker[1:]:
        raise ValueError(f"{marker!r}: its first character must not appear again in it")
    mismatch = regex_other_than(first + marker[-1])  # after all but the last character
    for char in reversed(marker[1:-1]):  # after fewer: the next character, or a mismatch
        mismatch = f"{regex_other_than(first + char)}|{regex_literal(char)}(?:{mismatch})"
    partial = ""
    for char in reversed(marker[1:-1]):
        partial = f"(?:{regex_literal(char)}{partial})?"
    attempt, other = regex_literal(first) + partial, regex_other_than(first)
    # the trailing attempts are lazy: outlines-core's automaton keeps leftmost-first priorities,
    # and a text that may end in a partial match would otherwise cut off ``marker`` itself
    # where something after this pattern begins with it (a Hermes answer's next tool call)
    return f"{other}*(?:(?:{attempt})*{regex_literal(first)}(?:{mismatch}){other}*)*(?:{attempt})*?"


def _in_class(chars: str) -> str:
    """``chars`` written inside a character class."""
    return "".join("\\" + c if c in "\\]^-[&~" else c for c in chars)


def regex_other_than(chars: str) -> str:
    """A character class of any one character but those of ``chars``."""
    return f"[^{_in_class(chars)}]"


class Grammars:
    """Compiles :class:`StructuredOutput` specs over one vocabulary, and caches them (any thread).

    Args:
        token_bytes: each token id's bytes (None: a special token, never generated).
        eos_token_id: the end-of-sequence token, allowed once the output is complete.
        vocab_size: the width of the logits (ids past ``token_bytes`` are never allowed).

    Raises:
        RequestError: outlines-core is not installed.
    """

    def __init__(self, token_bytes: Sequence[bytes | None], eos_token_id: int, vocab_size: int) -> None:
        try:
            import outlines_core
        except ImportError:
            raise RequestError("response_format", "structured output needs outlines-core (pip install "
                                                  "'hotswap_rt[serve]')") from None
        self._outlines = outlines_core
        tokens: dict[bytes, list[int]] = {}
        for token, data in enumerate(token_bytes):
            if data and token != eos_token_id and _END_LEAD not in data:
                tokens.setdefault(bytes(data), []).append(token)
        self._end = max(vocab_size, len(token_bytes))  # the end's synthetic token: past every real id
        tokens[END.encode()] = [self._end]
        self._vocabulary = outlines_core.Vocabulary(eos_token_id, tokens)
        self.eos_token_id, self.vocab_size = eos_token_id, vocab_size
        self._indexes: OrderedDict[StructuredOutput, Any] = OrderedDict()
        self._numbers: dict[StructuredOutput, int] = {}
        self._lock = threading.Lock()
        self.masks = MaskCache()  # every row's packed masks, by state
        self.biases = MaskCache(256 << 20)  # their unpacked biases, by state and device

    def index(self, spec: StructuredOutput) -> Any:
        """``spec`` compiled over the vocabulary (cached; the least recently used go first).

        Raises:
            RequestError: the spec cannot be compiled (a bad schema or regex).
        """
        with self._lock:
            index = self._indexes.get(spec)
            if index is not None:
                self._indexes.move_to_end(spec)
                return index
        try:
            index = self._outlines.Index(f"(?:{spec.pattern()}){END}", self._vocabulary)
        except (ValueError, TypeError) as exc:
            raise RequestError("response_format", f"cannot constrain output to it: {exc}") from None
        with self._lock:
            self._indexes[spec] = index
            while len(self._indexes) > _CACHED_INDEXES:
                self._indexes.popitem(last=False)
        return index

    def row(self, spec: StructuredOutput, cache_masks: bool = True) -> RowGrammar:
        """A fresh state for one request; ``cache_masks``: its masks and their biases are kept
        by state and shared with the other rows (:class:`MaskCache`; False: written and
        unpacked every step)."""
        index = self.index(spec)
        with self._lock:  # a spec's number: what it keeps is looked up by it, step after step
            number = self._numbers.setdefault(spec, len(self._numbers))
        return RowGrammar(self._outlines.Guide(index), index, self.vocab_size, self.eos_token_id, self._end,
                          number, self.masks if cache_masks else None, self.biases if cache_masks else None)


class MaskCache:
    """Tensors by (spec's number, automaton state, ...), shared by the rows of one :class:`Grammars`
    (any thread): packed masks, and their biases on a device. A state's mask never changes,
    and outlines-core writes one in time that grows with the tokens it allows (~70 us at 32k
    tokens inside a JSON string or a reasoning block, against ~2 us to copy it); unpacking one
    into a bias costs about as much again: the rows of a batch are mostly in a few states, step
    after step. The least recently used go first past ``budget_bytes``."""

    def __init__(self, budget_bytes: int = 64 << 20) -> None:
        self.budget_bytes = budget_bytes
        self._masks: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._masks)

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            mask = self._masks.get(key)
            if mask is not None:
                self._masks.move_to_end(key)
            return mask

    def put(self, key: tuple, mask: torch.Tensor) -> None:
        size = mask.numel() * mask.element_size()
        with self._lock:
            if key in self._masks or size > self.budget_bytes:
                return
            self._masks[key] = mask
            self._bytes += size
            while self._bytes > self.budget_bytes:
                _, old = self._masks.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()


class RowGrammar:
    """One request's place in its grammar: which tokens may come next."""

    def __init__(self, guide: Any, index: Any, vocab_size: int, eos_token_id: int, end: int,
                 spec: int = -1, masks: MaskCache | None = None, biases: MaskCache | None = None) -> None:
        self._guide, self._index = guide, index
        self.vocab_size = vocab_size
        self._eos, self._end = eos_token_id, end  # end: the synthetic token of END
        self.words = end // 32 + 1  # the packed mask's width: 32 ids a word, the end's included
        self._spec, self._masks, self._biases = spec, masks, biases  # spec: its number in Grammars

    def kept(self, device: torch.device) -> tuple[torch.Tensor | None, tuple | None]:
        """What is kept on ``device`` for the state the row is in (its bias ``[V]`` float32, or
        the ids of the tokens it bans, int64; None: nothing yet), and the key it is kept under
        (None: this row keeps nothing)."""
        if self._biases is None:
            return None, None
        key = (self._spec, self._guide.get_state(), device)
        return self._biases.get(key), key

    def keep(self, key: tuple, value: torch.Tensor) -> None:
        self._biases.put(key, value)

    def write_mask(self, out: torch.Tensor) -> None:
        """The tokens that may come next, packed into ``out`` (``[words]`` int32, CPU,
        contiguous): bit ``k`` of word ``w`` is token ``32 w + k``. A state's mask is written
        once and copied after (:class:`MaskCache`)."""
        state, key = self._guide.get_state(), None
        if self._masks is not None:
            key = (self._spec, state)
            cached = self._masks.get(key)
            if cached is not None:
                out.copy_(cached)
                return
        out.zero_()
        self._guide.write_mask_into(out.data_ptr(), out.numel(), 4)
        words = out.numpy().view(np.uint32)
        words[self._end // 32] &= ~np.uint32(1 << self._end % 32)  # never sampled: past the logits
        after = self._index.get_next_state(state, self._end)
        if after is not None and self._index.is_final_state(after):  # the output may end here
            words[self._eos // 32] |= np.uint32(1 << self._eos % 32)
        if key is not None:
            self._masks.put(key, out.clone())

    def allowed(self) -> torch.Tensor:
        """``[V]`` bool (CPU): the tokens that may come next."""
        return grammar_bias([self], torch.device("cpu"))[0] == 0

    def advance(self, token: int) -> None:
        """Take the sampled ``token`` (end-of-sequence ends the output: nothing to advance)."""
        if token != self._eos:
            self._guide.advance(token)

    @property
    def finished(self) -> bool:
        """Nothing but the end may come next."""
        return self._guide.get_tokens() == [self._end]


_BYTE_BIAS: dict[torch.device, torch.Tensor] = {}
_NEG_INF: dict[torch.device, torch.Tensor] = {}
SPARSE_BELOW = 32  # a state that bans fewer than 1 / SPARSE_BELOW of the tokens is kept as their ids


def mask_scores(scores: torch.Tensor, grammars: Sequence[RowGrammar],
                rows: Sequence[int] | None = None) -> None:
    """Sets to -inf, in place, the tokens each row's grammar does not allow next: in row
    ``rows[i]`` of ``scores [n, V]`` (float32, contiguous) those of ``grammars[i]`` (``rows``
    None: row ``i``).

    What a state bans is kept on the device once built (:class:`MaskCache`,
    ``Grammars.biases``): the ids of the tokens it bans where they are few (inside a reasoning
    block all but a few hundred tokens are allowed: setting their scores costs a fraction of
    adding a bias of the vocabulary's width; from about 3% of the vocabulary on, the bias costs
    less on a CPU), else its bias (0 / -inf). The
    states met for the first time have their masks packed on the host (``V / 8`` bytes a row,
    pinned on an accelerator: one copy for all of them) and unpacked where the scores are by
    one gather from a table of every byte's 8 biases (``[256, 8]``): no bool tensor of the
    vocabulary's width is built or filled on the host. (Little-endian hosts: the words are read
    as bytes.)
    """
    if not grammars:
        return
    vocab_size, words = grammars[0].vocab_size, grammars[0].words
    if any(g.vocab_size != vocab_size or g.words != words for g in grammars):
        raise ValueError("mask_scores: the rows' grammars are over different vocabularies")
    if scores.shape[-1] != vocab_size:
        raise ValueError(f"mask_scores: scores are {scores.shape[-1]} wide, the grammars' vocabulary "
                         f"{vocab_size}")
    device = scores.device
    rows = range(len(grammars)) if rows is None else rows
    kept = [grammar.kept(device) for grammar in grammars]
    missing = [i for i, (value, _) in enumerate(kept) if value is None]
    if missing:
        for i, value in zip(missing, _build(grammars, missing, [kept[i][1] for i in missing], device)):
            kept[i] = (value, kept[i][1])
    dense: list[int] = []
    sparse: list[int] = []
    for i, (value, _) in enumerate(kept):
        (dense if value.is_floating_point() else sparse).append(i)
    if dense and device.type == "cpu":  # row by row: stacking them first costs a fresh [n, V] tensor
        for i in dense:
            scores[rows[i]].add_(kept[i][0])
    elif dense:  # one add for all of them (one kernel, not one per row)
        bias = torch.stack([kept[i][0] for i in dense])
        if len(dense) == len(scores) and all(rows[i] == i for i in dense):
            scores.add_(bias)
        else:
            scores.index_add_(0, device_values([rows[i] for i in dense], device), bias)
    if sparse:
        bans = [kept[i][0] for i in sparse]
        at = np.repeat(np.array([rows[i] for i in sparse], dtype=np.int64), [ban.shape[0] for ban in bans])
        at = torch.from_numpy(at).to(device)
        neg_inf = _NEG_INF.get(device)
        if neg_inf is None:
            neg_inf = _NEG_INF[device] = torch.tensor(float("-inf"), device=device)
        scores.index_put_((at, torch.cat(bans) if len(bans) > 1 else bans[0]), neg_inf)


def _build(grammars: Sequence[RowGrammar], missing: list[int], keys: list[tuple | None],
           device: torch.device) -> list[torch.Tensor]:
    """What ``grammars[i]`` bans for each ``i`` of ``missing``, on ``device`` (see
    :func:`mask_scores`), kept under its key where it has one."""
    vocab_size, words = grammars[0].vocab_size, grammars[0].words
    packed = torch.empty((len(missing), words), dtype=torch.int32, pin_memory=device.type == "cuda")
    for at, i in enumerate(missing):
        grammars[i].write_mask(packed[at])
    built: list[torch.Tensor | None] = [None] * len(missing)
    for at, key in enumerate(keys):
        if key is not None:  # kept: its bans alone where they are few
            bits = np.unpackbits(packed[at].numpy().view(np.uint8), bitorder="little")[:vocab_size]
            banned = np.flatnonzero(bits == 0)
            if len(banned) * SPARSE_BELOW < vocab_size:
                built[at] = torch.from_numpy(banned).to(device)
    dense = [at for at, value in enumerate(built) if value is None]
    if dense:
        table = _BYTE_BIAS.get(device)
        if table is None:
            bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1  # [256, 8]: byte -> its bits
            table = _BYTE_BIAS[device] = torch.where(bits.bool(), 0.0, float("-inf")).to(device)
        data = packed.to(device, non_blocking=True)
        if len(dense) < len(missing):
            data = data[device_values(dense, device)]
        biases = table.index_select(0, data.view(torch.uint8).flatten().long()).view(len(dense), -1)
        for at, bias in zip(dense, biases[:, :vocab_size]):
            built[at] = bias
    for at, key in enumerate(keys):
        if key is not None:
            if built[at].is_floating_point():
                built[at] = built[at].clone()  # not a view of the batch's biases
            grammars[missing[at]].keep(key, built[at])
    return built


def grammar_bias(grammars: Sequence[RowGrammar], device: torch.device) -> torch.Tensor:
    """``[G, V]`` float32 on ``device``: 0 for the tokens each row's grammar allows next,
    -inf for the others (:func:`mask_scores` on zeros)."""
    bias = torch.zeros((len(grammars), grammars[0].vocab_size), device=device)
    mask_scores(bias, grammars)
    return bias
