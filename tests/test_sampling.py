"""The per-row sampler (:mod:`hotswap_rt.engine.sampling`) against distributions computed by
hand: greedy, temperature, top-k, top-p, min-p, penalties, logit bias, min-tokens bans, seeds,
log-probabilities, and parameter validation."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from hotswap_rt.engine.sampling import RequestError, RowSampling, Sampler, SamplingParams

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
