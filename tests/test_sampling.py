"""The per-row sampler (:mod:`hotswap_rt.engine.sampling`) against distributions computed by
hand: greedy, temperature, top-k, top-p, min-p, penalties, logit bias, min-tokens bans, seeds,
log-probabilities, and parameter validation."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from hotswap_rt.engine.sampling import (RequestError, RowSampling, Sampler, SamplingParams, argmax_rows,
                                        draw_from, keep_at_least, nucleus)

CPU = torch.device("cpu")
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def row(prompt: tuple[int, ...] = (), banned: tuple[int, ...] = (), **params) -> RowSampling:
    return RowSampling(SamplingParams(**params), list(prompt) or [0], 4, CPU, banned)


def draws(n: int = 2000, **params) -> Counter:
    sampler, counts = Sampler(CPU), Counter()
    rows = [row(temperature=1.0, **params) for _ in range(50)]
    for _ in range(n // 50):
        counts.update(sampler.sample(LOGITS.expand(50, 4).clone(), rows).tokens)
    return counts


def test_greedy_and_tiny_temperatures_take_the_argmax() -> None:
    sampler = Sampler(CPU)
    logits = torch.tensor([[0.1, 3.0, 0.2, 0.0], [5.0, 0.0, 0.0, 0.0]])
    out = sampler.sample(logits, [row(temperature=0.0), row(temperature=1e-50)])
    assert out.tokens == [1, 0]


@pytest.mark.parametrize("width", [1, 300, 511, 512, 513, 767, 768, 4096, 32000, 32001, 151936])
def test_the_blocked_argmax_is_torchs(width) -> None:
    """``argmax_rows`` (block maxima first on a CPU) gives ``torch.argmax``'s index for every
    row: random values, ties (the first wins), rows of -inf, NaN inside a block or in the tail,
    the largest in the tail, and a view whose rows are strided."""
    generator = torch.Generator().manual_seed(width)
    rows = [torch.randn(width, generator=generator),
            torch.randint(0, 3, (width,), generator=generator).float(),  # many ties
            torch.full((width,), float("-inf")),
            torch.randn(width, generator=generator), torch.randn(width, generator=generator),
            torch.randn(width, generator=generator)]
    rows[3][width // 3] = float("nan")
    rows[4][-1] = float("nan")
    rows[5][-1] = 100.0  # the largest after the last whole block (where there is a tail)
    if width > 1:
        rows[1][width // 2] = rows[1][width - 1] = 5.0  # tied: the first one is the answer
    scores = torch.stack(rows)
    assert torch.equal(argmax_rows(scores), scores.argmax(dim=-1))
    wide = torch.cat([scores, torch.randn(len(rows), 7, generator=generator)], dim=1)
    assert torch.equal(argmax_rows(wide[:, :width]), scores.argmax(dim=-1))  # rows 7 values apart


def test_sampling_follows_the_distribution() -> None:
    counts = draws(4000)
    for token, p in enumerate(PROBS.tolist()):
        assert abs(counts[token] / 4000 - p) < 0.04


@pytest.mark.parametrize("params, allowed", [
    ({"top_k": 2}, {0, 1}), ({"top_p": 0.7}, {0, 1}), ({"top_p": 0.85}, {0, 1, 2}),
    ({"top_p": 0.01}, {0}), ({"min_p": 0.5}, {0, 1}), ({"min_p": 1.0}, {0}),
])
def test_filters_keep_exactly_the_allowed_tokens(params, allowed) -> None:
    counts = draws(1500, **params)
    assert set(counts) == allowed


def test_rows_with_and_without_top_k_share_a_batch() -> None:
    """A row with a top-k next to one without: each keeps its own tokens (the batch then
    carries every token, not the top-k candidates alone)."""
    sampler, first, second = Sampler(CPU), Counter(), Counter()
    rows = [row(temperature=1.0, top_k=2), row(temperature=1.0),
            row(temperature=1.0, top_k=1, top_p=0.5)]
    for _ in range(600):
        tokens = sampler.sample(LOGITS.expand(3, 4).clone(), rows).tokens
        first[tokens[0]] += 1
        second[tokens[1]] += 1
        assert tokens[2] == 0
    assert set(first) == {0, 1} and set(second) == {0, 1, 2, 3}


def sorted_nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """The reference: sort, keep while the mass before is at most ``top_p``."""
    values, order = probs.sort(descending=True)
    return set(order[(values.cumsum(-1, dtype=torch.float64) - values) <= top_p].tolist())


@pytest.mark.parametrize("width", [10, 100, 5000, 40000])
def test_the_nucleus_is_the_sorted_one(width) -> None:
    """``nucleus`` (the 64 or 1024 largest first, a sort only where the nucleus is wider) keeps
    exactly what sorting the whole row keeps: peaked rows (a few tokens), flatter ones (hundreds,
    thousands), a flat one (nearly all), top_p 1 (all), and rows given already sorted."""
    generator = torch.Generator().manual_seed(width)
    spread = torch.tensor([[8.0], [4.0], [2.0], [1.0], [0.0], [3.0]])
    logits = torch.randn(6, width, generator=generator) * spread
    logits[4] += torch.rand(width, generator=generator)  # flat (ties at the boundary: unlikely)
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([0.9, 0.95, 0.8, 0.99, 0.5, 1.0])
    kept = nucleus(probs, top_p)
    for i in range(len(probs)):
        expected = sorted_nucleus(probs[i], float(top_p[i])) if top_p[i] < 1 else set(range(width))
        assert set(kept[i].nonzero().flatten().tolist()) == expected
        assert torch.equal(kept[i][kept[i] > 0], probs[i][kept[i] > 0])
    ordered = probs.sort(dim=-1, descending=True).values
    kept = nucleus(ordered, top_p, ordered=True)
    for i in range(len(probs)):
        expected = len(sorted_nucleus(probs[i], float(top_p[i]))) if top_p[i] < 1 else width
        assert int((kept[i] > 0).sum()) == expected


def test_keeping_values_from_a_floor_on_is_exact() -> None:
    """``keep_at_least`` (arithmetic on a CPU) is ``masked_fill(p < floor, 0)``: a value equal
    to the floor, or one float above or below it, on the right side; a floor of 0 keeps all."""
    probs = torch.rand(3, 1000, generator=torch.Generator().manual_seed(1))
    probs[:, :10] = 0.0
    floor = torch.tensor([[0.0], [0.5], [0.999]])
    probs[1, 20] = 0.5
    probs[1, 21] = torch.nextafter(torch.tensor(0.5), torch.tensor(0.0))
    probs[1, 22] = torch.nextafter(torch.tensor(0.5), torch.tensor(1.0))
    kept = keep_at_least(probs, floor)
    assert torch.equal(kept, probs.masked_fill(probs < floor, 0.0))
    assert kept[1, 20] == 0.5 and kept[1, 21] == 0.0 and kept[1, 22] > 0.5
    assert torch.equal(kept[0], probs[0])


def test_a_draw_follows_the_running_sum_and_never_picks_a_zero() -> None:
    """``draw_from``: a uniform of 0 picks the first token with probability, one just below 1
    the last (never a 0 after it); many draws follow the (unnormalized) probabilities."""
    probs = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    assert draw_from(probs, torch.tensor([0.0], dtype=torch.float64)).tolist() == [1]
    almost_one = torch.tensor([1.0 - 2.0**-53], dtype=torch.float64)
    assert draw_from(probs, almost_one).tolist() == [4]
    uniform = torch.rand(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    counts = Counter(draw_from(probs.expand(20000, 7), uniform).tolist())
    assert set(counts) == {1, 3, 4}
    assert abs(counts[1] / 20000 - 0.5) < 0.02 and abs(counts[3] / 20000 - 0.25) < 0.02


@pytest.mark.parametrize("width", [1000, 5000, 32000])
def test_a_draw_in_blocks_is_the_draw_through_the_whole_running_sum(width) -> None:
    """On a CPU ``draw_from`` sums blocks first, then runs through the block the draw falls in:
    the same token as through the running sum of the whole row, for the same uniforms (zeros
    in patches, at the start and in the last, narrower block); 0 and just below 1 give the
    first and the last token with probability."""
    generator = torch.Generator().manual_seed(width)
    probs = torch.rand(4, width, generator=generator) ** 4
    probs[:, :300] = 0.0
    probs[1, 600:900] = 0.0
    probs[2, width - 37:] = 0.0  # the last tokens (the tail block's) have none
    probs[3] = 0.0
    probs[3, 777] = probs[3, width - 1] = 1.0  # two tokens
    uniform = torch.rand(4, 500, dtype=torch.float64, generator=generator)
    uniform[:, 0], uniform[:, 1] = 0.0, 1.0 - 2.0**-53
    for column in range(uniform.shape[1]):
        got = draw_from(probs, uniform[:, column])
        running = probs.cumsum(-1, dtype=torch.float64)
        whole = torch.searchsorted(running, (uniform[:, column] * running[:, -1]).unsqueeze(1), right=True)
        assert torch.equal(got, torch.minimum(whole.squeeze(1), running.argmax(-1)))
        assert bool((probs.gather(1, got.unsqueeze(1)) > 0).all())
    first = draw_from(probs, uniform[:, 0])
    last = draw_from(probs, uniform[:, 1])
    assert first.tolist()[1:] == [300, 300, 777] and last.tolist()[2:] == [width - 38, width - 1]


def test_top_p_renormalizes_what_it_keeps() -> None:
    counts = draws(6000, top_p=0.7)  # keeps 0.5 and 0.3
    assert abs(counts[0] / 6000 - 0.5 / 0.8) < 0.04


def test_penalties_follow_their_formulas() -> None:
    sampler = Sampler(CPU)
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    state = row(prompt=(2,), temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5,
                presence_penalty=0.25)
    state.observe(3)
    state.observe(3)
    processed = sampler.process(logits, [state])[0]
    # token 2 is in the prompt (repetition only); token 3 was generated twice (all three)
    expected = torch.tensor([2.0, -1.0, 0.25, 1.0 / 2.0 - 0.5 * 2 - 0.25])
    assert torch.allclose(processed, expected)


def test_penalties_of_many_rows_at_once_are_each_rows_formula() -> None:
    """Penalized rows among unpenalized ones, each with its own penalties, prompt and generated
    tokens, negative and positive scores: the batch's arithmetic equals the formula row by row
    (a seen score over the penalty where positive, times it where negative; minus frequency
    times count; minus presence where generated)."""
    generator = torch.Generator().manual_seed(0)
    width = 700
    settings = [dict(repetition_penalty=1.3, frequency_penalty=0.2), {}, dict(presence_penalty=0.7),
                dict(repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=0.1), {}]
    rows = []
    for n, params in enumerate(settings):
        prompt = torch.randint(0, width, (30,), generator=generator).tolist()
        state = RowSampling(SamplingParams(temperature=0.0, **params), prompt, width, CPU, ())
        for token in torch.randint(0, width, (40,), generator=generator).tolist():
            state.observe(token)
        rows.append((state, prompt))
    logits = torch.randn(len(rows), width, generator=generator) * 3
    processed = Sampler(CPU).process(logits, [state for state, _ in rows])
    for i, (state, prompt) in enumerate(rows):
        params, expected = state.params, logits[i].clone()
        if state.counts is None:
            assert torch.equal(processed[i], logits[i])
            continue
        seen = (state.counts > 0) | torch.isin(torch.arange(width), torch.tensor(prompt))
        penalty = params.repetition_penalty
        scaled = torch.where(expected > 0, expected / penalty, expected * penalty)
        expected = torch.where(seen, scaled, expected) - params.frequency_penalty * state.counts
        expected -= params.presence_penalty * (state.counts > 0).float()
        assert torch.allclose(processed[i], expected, rtol=1e-6, atol=1e-6)


def test_logit_bias_and_min_tokens_bans() -> None:
    sampler = Sampler(CPU)
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    assert sampler.sample(logits.clone(), [row(temperature=0.0, logit_bias={2: 100.0})]).tokens == [2]
    banned = row(banned=(0,), temperature=0.0, min_tokens=2)
    assert sampler.sample(logits.clone(), [banned]).tokens != [0]
    assert sampler.sample(logits.clone(), [banned]).tokens != [0]
    assert sampler.sample(logits.clone(), [banned]).tokens == [0]  # two tokens generated: allowed


def test_seeded_rows_repeat_whatever_else_is_sampled() -> None:
    def run(seed: int, crowd: int) -> list[int]:
        """30 draws of a row seeded ``seed`` sampled next to ``crowd`` unseeded rows."""
        sampler = Sampler(CPU)
        rows = [row(temperature=1.0, seed=seed)] + [row(temperature=1.0) for _ in range(crowd)]
        return [sampler.sample(LOGITS.expand(len(rows), 4).clone(), rows).tokens[0] for _ in range(30)]

    assert run(7, 0) == run(7, 5)
    assert run(7, 0) != run(8, 0)
    assert run(2**64 + 7, 0) == run(7, 0)  # folded into 64 bits, never an overflow


def test_logprobs_are_raw_log_softmax_with_top_alternatives() -> None:
    sampler = Sampler(CPU)
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    out = sampler.sample(logits, [row(temperature=0.0, logprobs=2, repetition_penalty=5.0)])
    expected = torch.log_softmax(logits, -1)[0]
    chosen, top = out.logprobs[0]
    assert out.tokens == [2] and math.isclose(chosen, expected[2].item(), abs_tol=1e-6)
    assert [t for t, _ in top] == [2, 1] and math.isclose(top[1][1], expected[1].item(), abs_tol=1e-6)
    assert sampler.sample(logits, [row(temperature=0.0)]).logprobs == [None]


@pytest.mark.parametrize("params, name", [
    ({"temperature": -1}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"min_p": 2}, "min_p"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"logit_bias": {1: 500}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"), ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"), ({"logprobs": 21}, "logprobs"),
    ({"seed": 1.5}, "seed"), ({"stop_token_ids": (-1,)}, "stop_token_ids"),
])
def test_bad_parameters_name_themselves(params, name) -> None:
    with pytest.raises(RequestError) as error:
        SamplingParams(**params)
    assert error.value.param == name
    with pytest.raises(RequestError, match="vocabulary"):
        SamplingParams(logit_bias={10: 1.0}).check_vocab(4)


def test_device_values_on_a_cpu_are_torch_tensor() -> None:
    """The engine's per-step values on a CPU: what ``torch.tensor`` makes (dtype inferred or
    given), not pinned; on CUDA ``tests/test_cuda.py`` checks they are queued without waiting."""
    from hotswap_rt.engine.device_values import device_values

    for values, dtype in (([3, 1, 2], None), ([0.5, 2.0], None), ([True, False], None),
                          ([[1, 2], [3, 4]], torch.long), ([1, 2], torch.float32), (7, None)):
        got, expected = device_values(values, "cpu", dtype), torch.tensor(values, dtype=dtype)
        assert got.dtype == expected.dtype and torch.equal(got, expected) and not got.is_pinned()
