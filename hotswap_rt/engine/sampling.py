"""Per-row sampling on the device: one vectorized pass over the logits of every row of a step.

::

    logits [B, V] --raw logprobs (if asked)----------------------------------------> logprobs
                  --repetition / frequency / presence penalties, logit_bias, bans,
                    structured output (tokens its grammar does not allow next: -inf)
                  --greedy rows: argmax (argmax_rows)                            --> token [B]
                  --sampling rows: / temperature, top-k, top-p, min-p, then one
                    uniform draw through the running sum (draw_from; the draw from the
                    row's own generator where it is seeded)

Seeded rows draw their noise from their own ``torch.Generator``, so a seeded request gives the
same tokens whatever else shares its batch. Values that would overflow or divide by zero are
handled, not passed on: a temperature below 1e-5 is greedy (as vLLM does), any integer seed is
folded into 64 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..errors import HotswapError
from .device_values import device_values

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (vLLM's _SAMPLING_EPS)
MAX_LOGPROBS = 20


_BLOCK = 256  # argmax_rows: the width of the blocks a CPU reduces first
_ONE_LEVEL = 1 << 16  # draw_from: one running sum of at most this many values (512 KiB of float64)


def argmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """``scores [n, V]`` -> ``[n]`` int64: each row's index of its largest value, the first one
    where several are (``torch.argmax``'s answer, NaN counting as the largest).

    On a CPU ``torch.argmax`` over a row runs one element at a time (~1 ns each: 0.6 ms for 16
    rows of 32k, 2.3 ms of 128k, ad hoc), while ``amax`` is vectorized: the row's blocks of
    :data:`_BLOCK` values are reduced to their maxima first, then the argmax is taken of those
    and inside the first block that holds the largest (8x / 17x faster there). Elsewhere,
    and for rows narrower than two blocks, it is ``torch.argmax``."""
    n, width = scores.shape
    if scores.device.type != "cpu" or width < 2 * _BLOCK:
        return scores.argmax(dim=-1)
    scores, blocks = _whole_blocks(scores)
    count = blocks.shape[1]
    maxima = blocks.amax(dim=-1)  # [n, count]; NaN where a block holds one
    block = maxima.argmax(dim=-1)  # the first block with the largest (or a NaN)
    rows = torch.arange(n)
    index = block * _BLOCK + blocks[rows, block].argmax(dim=-1)
    if count * _BLOCK == width:
        return index
    tail = scores[:, count * _BLOCK:]  # fewer than _BLOCK values after the last whole block
    in_tail = tail.argmax(dim=-1)
    best, tail_best = maxima[rows, block], tail[rows, in_tail]
    later = (tail_best > best) | (tail_best.isnan() & ~best.isnan())  # ties: the earlier index
    return torch.where(later, in_tail + count * _BLOCK, index)


def _whole_blocks(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows [n, V]`` (made contiguous along V if they were not) and their whole blocks of
    :data:`_BLOCK` values as a view ``[n, V // _BLOCK, _BLOCK]`` (the values after the last
    whole block are left out)."""
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows, rows.as_strided((len(rows), rows.shape[1] // _BLOCK, _BLOCK), (rows.stride(0), _BLOCK, 1))


def nucleus(probs: torch.Tensor, top_p: torch.Tensor, ordered: bool = False) -> torch.Tensor:
    """``probs [m, V]`` with each row's top-p nucleus kept and the rest set to 0: the largest
    probabilities, largest first, while the sum of those before them is at most ``top_p[i]``
    (a row with ``top_p`` 1 keeps all; ties with the smallest kept one are kept too).

    ``ordered``: every row is already sorted, descending. Otherwise the smallest kept
    probability is looked for among each row's 64 largest, then 1024 (``topk``), and only the
    rows whose nucleus is wider are sorted whole: a language model's nucleus is mostly a few
    tokens, and sorting a 32k row costs ~1.3 ms on a CPU (ad hoc)."""
    top_p = top_p.to(torch.float64).unsqueeze(1)  # the sums in float64: a row's order of adding
    if ordered:                                     # (its length) then never moves the boundary
        outside = (probs.cumsum(-1, dtype=torch.float64) - probs > top_p) & (top_p < 1.0)  # 1: a sum
        return probs.masked_fill(outside, 0.0)  # rounded past 1 must not cut the row's tail
    if probs.device.type != "cpu":  # a sort is cheap there, and a loop would wait for the device
        smallest, _ = _smallest_kept(probs.sort(dim=-1, descending=True).values, top_p)
        return keep_at_least(probs, smallest.masked_fill(top_p >= 1.0, 0.0))
    width = probs.shape[1]
    smallest = torch.zeros_like(probs[:, :1])  # [m, 1]: the smallest probability each row keeps
    pending = (top_p[:, 0] < 1.0).nonzero().flatten()
    for count in (64, 1024, width):
        count = min(count, width)
        if len(pending) == 0:
            break
        largest = probs[pending]
        largest = largest.sort(dim=-1, descending=True).values if count == width else largest.topk(count).values
        found_smallest, inside = _smallest_kept(largest, top_p[pending])
        found = inside | (count == width)
        smallest[pending[found]] = found_smallest[found]
        pending = pending[~found]
    return keep_at_least(probs, smallest)


def keep_at_least(probs: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """``probs [m, V]`` (>= 0, not NaN) with the values below ``floor [m, 1]`` set to 0. On a
    CPU by arithmetic: ``p * min(sign(p - floor) + 1, 1)`` is ``p`` from the floor on and 0
    below it, exactly; a comparison into a bool tensor and ``masked_fill`` cost ~1.6 ms over 16
    rows of 32k there, against ~0.2 ms (ad hoc)."""
    if probs.device.type != "cpu":
        return probs.masked_fill(probs < floor, 0.0)
    return probs * (probs - floor).sign_().add_(1.0).clamp_(max=1.0)


def _smallest_kept(largest: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Of rows' largest probabilities ``[n, c]`` (descending): the smallest each nucleus keeps
    (``[n, 1]``), and whether the nucleus ends inside the ``c`` (``[n]`` bool)."""
    before = largest.cumsum(-1, dtype=torch.float64) - largest  # the mass of the larger ones
    kept = (before <= top_p).sum(-1, keepdim=True)  # >= 1: the largest is always kept
    return largest.gather(1, kept - 1), (kept < largest.shape[1]).squeeze(1)


def draw_from(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs [m, V]`` (not normalized, >= 0) with probability
    proportional to its value: where ``uniform [m]`` (float64 in [0, 1)) times the row's total
    falls in the running sum (float64), never a token of probability 0. One uniform per row,
    where the exponential race (``argmax(p / E)``) draws V: ``exponential_`` over 16 rows of 32k
    costs ~15 ms on a CPU (ad hoc).

    On a CPU the running sum is taken in two levels, of the sums of blocks of :data:`_BLOCK`
    values, then inside the block the draw falls in: a float64 running sum of the whole row is
    a fresh ``8 V``-byte tensor, and its pages cost 0.35-5 ms per 16 rows of 32k (ad hoc). Up to
    :data:`_ONE_LEVEL` values in all (a row of a small vocabulary, a few rows of a larger one)
    one running sum costs less than the two levels' dozen more ops."""
    width = probs.shape[1]
    if probs.device.type != "cpu" or width < 2 * _BLOCK or probs.numel() <= _ONE_LEVEL:
        running = probs.cumsum(-1, dtype=torch.float64)
        return _draw_in(running, uniform * running[:, -1])
    probs, blocks = _whole_blocks(probs)
    count = blocks.shape[1]
    sums = blocks.sum(-1)  # float32 (a float64 sum would copy the row to float64 first)
    if count * _BLOCK < width:  # the values after the last whole block: one more, narrower
        sums = torch.cat([sums, probs[:, count * _BLOCK:].sum(-1, keepdim=True)], dim=1)
    running = sums.cumsum(-1, dtype=torch.float64)
    target = uniform * running[:, -1]
    block = _draw_in(running, target)
    before = running.gather(1, (block - 1).clamp(min=0).unsqueeze(1)).squeeze(1).masked_fill(block == 0, 0.0)
    index = block.unsqueeze(1) * _BLOCK + torch.arange(_BLOCK)  # [m, _BLOCK]: the block's token ids
    values = probs.gather(1, index.clamp(max=width - 1)).masked_fill(index >= width, 0.0)
    inner = values.cumsum(-1, dtype=torch.float64)
    at = _draw_in(inner, target - before)
    return block * _BLOCK + at


def _draw_in(running: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Where ``target [m]`` falls in each row of a running sum ``[m, n]`` (float64): the first
    index whose sum is larger, never past the last that adds something (``argmax`` of the
    running sum: its first largest; a target rounded up to the total or past it)."""
    at = torch.searchsorted(running, target.unsqueeze(1), right=True).squeeze(1)
    return torch.minimum(at, argmax_rows(running))


class RequestError(HotswapError):
    """A request parameter is out of range; ``param`` names it (the HTTP layer's 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops (OpenAI / vLLM semantics).

    Args:
        max_tokens: tokens to generate at most; None: what remains of the context.
        temperature: 0 (or below 1e-5) is greedy.
        top_p, top_k, min_p: nucleus, top-k (0 or -1: off) and min-p filtering.
        seed: makes sampling reproducible (any int; folded into 64 bits).
        presence_penalty, frequency_penalty: OpenAI's, over generated tokens, in [-2, 2].
        repetition_penalty: vLLM/HF's (> 0; 1 = off), over prompt and generated tokens.
        logit_bias: token id -> bias in [-100, 100], added to the logits.
        stop: strings that end the output (not included in it).
        stop_token_ids: token ids that end the output.
        ignore_eos: keep going past the end-of-sequence token.
        min_tokens: end-of-sequence and stop tokens are banned before this many tokens.
        logprobs: None, or how many alternatives (0..20) to report next to each chosen
            token's log-probability (raw: the model's distribution before any processing).
        structured: a :class:`~hotswap_rt.engine.structured.StructuredOutput` the output must
            match (a JSON schema, any JSON object, a regex); not with ``ignore_eos`` or
            ``min_tokens`` (the output ends where the grammar does).
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    structured: Any = None  # StructuredOutput | None (see .structured)

    def __post_init__(self) -> None:
        if self.max_tokens is not None:
            _int_in("max_tokens", self.max_tokens, 1, None)
        _number_in("temperature", self.temperature, 0.0, None)
        _number_in("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _int_in("top_k", self.top_k, -1, None)
        _number_in("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _int_in("seed", self.seed, None, None)
        _number_in("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _number_in("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _number_in("repetition_penalty", self.repetition_penalty, 0.0, None, low_open=True)
        if not isinstance(self.logit_bias, Mapping):
            raise RequestError("logit_bias", f"must map token ids to biases, got {self.logit_bias!r}")
        bias = dict(self.logit_bias)
        for token, value in bias.items():
            _int_in("logit_bias", token, 0, None)
            _number_in("logit_bias", value, -100.0, 100.0)
        object.__setattr__(self, "logit_bias", bias)
        if not isinstance(self.stop, (str, list, tuple)):
            raise RequestError("stop", f"must be a string or a list of strings, got {self.stop!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)
        if not all(isinstance(s, str) for s in stop):
            raise RequestError("stop", f"must be strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise RequestError("stop_token_ids", f"must be a list of token ids, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for token in self.stop_token_ids:
            _int_in("stop_token_ids", token, 0, None)
        _int_in("min_tokens", self.min_tokens, 0, self.max_tokens)
        if self.logprobs is not None:
            _int_in("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.structured is not None:
            from .structured import StructuredOutput

            if not isinstance(self.structured, StructuredOutput):
                raise RequestError("response_format", f"must be a StructuredOutput, got {self.structured!r}")
            if self.ignore_eos or self.min_tokens:
                raise RequestError("response_format", "structured output ends where its grammar does: "
                                                      "not with ignore_eos or min_tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise :class:`RequestError` for token ids outside the vocabulary."""
        for param, tokens in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in tokens if t >= vocab_size]
            if bad:
                raise RequestError(param, f"token ids {bad} outside the vocabulary of {vocab_size}")


def _int_in(param: str, value: object, low: int | None, high: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(param, f"must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(param, f"must be in [{low}, {high}], got {value!r}")


def _number_in(param: str, value: object, low: float | None, high: float | None,
               low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(param, f"must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise RequestError(param, f"must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise RequestError(param, f"must be <= {high}, got {value!r}")


class RowSampling:
    """One sequence's sampling state: its parameters, generator and token counts."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int,
                 device: torch.device, banned_until_min: tuple[int, ...], grammar: Any = None) -> None:
        self.params = params
        self.grammar = grammar  # a RowGrammar for structured output, else None
        self.generator: torch.Generator | None = None
        if not params.greedy and params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed % 2**64)
        self.counts: torch.Tensor | None = None  # generated-token counts [V] (penalties only)
        self.prompt_mask: torch.Tensor | None = None  # 1.0 at the prompt's tokens [V] (repetition)
        if params.penalized:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            self.prompt_mask = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            self.prompt_mask[device_values(prompt_ids, device)] = 1.0
        self.banned_until_min = banned_until_min  # end-of-sequence and stop ids
        self.generated = 0

    def observe(self, token: int) -> None:
        """Count a generated token."""
        self.generated += 1
        if self.counts is not None:
            self.counts[token] += 1.0
        if self.grammar is not None:
            self.grammar.advance(token)


@dataclass(frozen=True)
class Sampled:
    """What one step sampled: a token per row, and logprobs where asked.

    ``logprobs[i]`` is None or ``(chosen token's logprob, [(token, logprob), ...] top-k)``."""

    tokens: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class Sampler:
    """Samples one token for every row of a step (see the module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generator = torch.Generator(device=device)
        self._generator.seed()
        self._scratches: dict[str, torch.Tensor] = {}  # _scratch's work tensors

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, rows: list[RowSampling]) -> Sampled:
        """``logits [B, V]`` (B >= len(rows); extra rows are padding) -> a token per row."""
        n = len(rows)
        raw = logits[:n].float()
        params = [row.params for row in rows]
        logprobs: torch.Tensor | None = None
        if any(p.logprobs is not None for p in params):
            logprobs = torch.log_softmax(raw, dim=-1)
        scores = self.process(raw, rows)
        sampling = [i for i, p in enumerate(params) if not p.greedy]
        if len(sampling) == n:
            tokens = self._draw(scores, rows)
        else:
            tokens = argmax_rows(scores)
            if sampling:
                index = device_values(sampling, self.device)
                tokens[index] = self._draw(scores[index], [rows[i] for i in sampling])
        token_list = tokens.tolist()
        for row, token in zip(rows, token_list):
            row.observe(token)
        return Sampled(token_list, self._logprobs(logprobs, params, token_list))

    def process(self, scores: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
        """Penalties, logit bias, min-tokens bans and grammars, applied to a copy of ``scores
        [n, V]``; ``scores`` itself where no row has any (nothing then writes to it)."""
        penalized = [i for i, row in enumerate(rows) if row.counts is not None]
        biased = [i for i, row in enumerate(rows) if row.params.logit_bias]
        banned = [i for i, row in enumerate(rows)  # min_tokens not reached yet
                  if row.generated < row.params.min_tokens and row.banned_until_min]
        structured = [i for i, row in enumerate(rows) if row.grammar is not None]
        if not (penalized or biased or banned or structured):
            return scores
        scores = scores.clone()
        if penalized:
            self._penalize(scores, [rows[i] for i in penalized], penalized)
        for i in biased:
            bias = rows[i].params.logit_bias
            ids = device_values(list(bias), self.device)
            scores[i, ids] += device_values(list(bias.values()), self.device)
        for i in banned:
            scores[i, device_values(rows[i].banned_until_min, self.device)] = float("-inf")
        if structured:  # the tokens a row's grammar does not allow next: -inf, every row at once
            from .structured import mask_scores

            mask_scores(scores, [rows[i].grammar for i in structured], structured)
        return scores

    def _penalize(self, scores: torch.Tensor, rows: list[RowSampling], at: list[int]) -> None:
        """The repetition, frequency and presence penalties of ``rows`` (in rows ``at`` of
        ``scores``), all rows at once and by arithmetic alone (a comparison into a bool tensor,
        ``where`` and ``masked_fill`` cost several times as much on a CPU): a seen token's
        score ``s`` times ``1 / penalty`` where ``s > 0`` and ``penalty`` where ``s < 0`` is
        ``s * (1 + seen * (a sign(s) + b - 1))`` with ``a, b = (1 / penalty -+ penalty) / 2``."""
        params = [row.params for row in rows]
        counts = torch.stack([row.counts for row in rows], out=self._scratch("counts", len(rows), scores))
        whole = at == list(range(len(scores)))
        part = scores if whole else scores[at]

        def column(values: list[float]) -> torch.Tensor:
            return device_values(values, self.device, scores.dtype).unsqueeze(1)

        if any(p.repetition_penalty != 1.0 for p in params):
            seen = torch.stack([row.prompt_mask for row in rows], out=self._scratch("seen", len(rows), scores))
            seen.add_(counts).clamp_(max=1.0)  # 1: seen
            penalty = column([p.repetition_penalty for p in params])
            half_gap, half_sum = (1.0 / penalty - penalty) / 2, (1.0 / penalty + penalty) / 2 - 1.0
            factor = torch.sign(part, out=self._scratch("factor", len(rows), scores))
            part.mul_(factor.mul_(half_gap).add_(half_sum).mul_(seen).add_(1.0))
        if any(p.frequency_penalty != 0.0 for p in params):
            part.sub_(torch.mul(counts, column([p.frequency_penalty for p in params]),
                                out=self._scratch("factor", len(rows), scores)))
        if any(p.presence_penalty != 0.0 for p in params):
            part.sub_(counts.clamp_(max=1.0).mul_(column([p.presence_penalty for p in params])))
        if not whole:
            scores[at] = part

    def _scratch(self, name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        """A ``[rows, V]`` work tensor kept from step to step (one engine thread samples with
        this sampler): a fresh one of that size costs its pages again on a CPU, ~0.6 ms for
        16 rows of 32k (ad hoc), more than the arithmetic done in it."""
        kept = self._scratches.get(name)
        if kept is None or kept.shape[0] < rows or kept.shape[1] != like.shape[1] or kept.dtype != like.dtype:
            kept = self._scratches[name] = torch.empty((max(rows, 16), like.shape[1]), dtype=like.dtype,
                                                       device=like.device)
        return kept[:rows]

    def _draw(self, scores: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
        """Sample from ``scores [m, V]`` of sampling rows: temperature, top-k, top-p, min-p,
        then one uniform draw per row through the kept probabilities' running sum
        (:func:`draw_from`). Where every row has a top-k, only the ``max(top_k)`` largest
        scores (``topk``, sorted) are carried past it."""
        params = [row.params for row in rows]
        width = scores.shape[1]
        if any(p.temperature != 1.0 for p in params):  # (a division by 1 changes nothing)
            temperature = device_values([p.temperature for p in params], self.device)
            scores = scores / temperature.unsqueeze(1)
        top_k = [p.top_k if 0 < p.top_k < width else width for p in params]
        ids: torch.Tensor | None = None  # the candidates' token ids, where only they are carried
        if max(top_k) < width:
            scores, ids = scores.topk(max(top_k), dim=-1)  # [m, k_max], descending
            rank = torch.arange(scores.shape[1], device=self.device)
            scores = scores.masked_fill(rank >= device_values(top_k, self.device).unsqueeze(1),
                                        float("-inf"))
        elif min(top_k) < width:
            kth = scores.topk(max(k for k in top_k if k < width), dim=-1).values  # descending
            index = device_values([min(k, kth.shape[1]) - 1 for k in top_k], self.device).unsqueeze(1)
            below = scores < kth.gather(1, index)
            below[device_values([k == width for k in top_k], self.device)] = False
            scores = scores.masked_fill(below, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        top_p = [p.top_p for p in params]
        if min(top_p) < 1.0:
            probs = nucleus(probs, device_values(top_p, self.device), ordered=ids is not None)
        if any(p.min_p > 0 for p in params):
            min_p = device_values([p.min_p for p in params], self.device).unsqueeze(1)
            probs = keep_at_least(probs, min_p * probs.amax(dim=-1, keepdim=True))
        # one uniform per row from the sampler's (randomly seeded) generator, then a seeded
        # row's own in its place: its draws depend on its seed alone, whatever shares the batch
        uniform = torch.rand(len(rows), dtype=torch.float64, device=self.device, generator=self._generator)
        for i, row in enumerate(rows):
            if row.generator is not None:
                uniform[i] = torch.rand(1, dtype=torch.float64, device=self.device, generator=row.generator)[0]
        token = draw_from(probs, uniform)
        return token if ids is None else ids.gather(1, token.unsqueeze(1)).squeeze(1)

    @staticmethod
    def _logprobs(logprobs: torch.Tensor | None, params: list[SamplingParams],
                  tokens: list[int]) -> list[tuple[float, list[tuple[int, float]]] | None]:
        if logprobs is None:
            return [None] * len(params)
        k = max(p.logprobs or 0 for p in params)
        chosen = logprobs.gather(1, device_values(tokens, logprobs.device).unsqueeze(1))
        chosen_list = chosen.squeeze(1).tolist()
        top_values, top_ids = (logprobs.topk(k, dim=-1) if k else (None, None))
        top_values = top_values.tolist() if k else None
        top_ids = top_ids.tolist() if k else None
        result: list[tuple[float, list[tuple[int, float]]] | None] = []
        for i, p in enumerate(params):
            if p.logprobs is None:
                result.append(None)
                continue
            alternatives = list(zip(top_ids[i][: p.logprobs], top_values[i][: p.logprobs])) if k else []
            result.append((chosen_list[i], alternatives))
        return result
