"""Guard overhead per forward: the same compiled forward called directly (unguarded), through
``rt.guard.call`` (the guard alone), and through ``rt.model(...)`` (the whole runtime path: kwargs,
un-viewing, lock, batch check, guard). Goal: guarded / unguarded <= 1.02.

Model: a 2-layer hidden-256 Llama, attention adapters of rank 16, one adapter active, batch 1 x
32 tokens under ``torch.no_grad()``. Timings are reported as ratios, never asserted.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hotswap_rt import HotswapRuntime, RuntimeConfig

from .conftest import figure, interleaved, note, note_ratios, record

GROUP = "guard overhead per compiled forward (ratio to the unguarded compiled forward)"


@pytest.fixture(scope="module")
def compiled_rt(tmp_path_factory):
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8)
    base = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("guard") / "a"
    get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])).save_pretrained(str(path))
    rt = HotswapRuntime(base, RuntimeConfig(["q_proj", "k_proj", "v_proj", "o_proj"], max_rank=16))
    rt.load("a", path)
    rt.activate("a")
    ids = torch.randint(0, 1024, (1, 32))
    rt.compile(ids, guard="raise")
    return rt, ids


def _bench(benchmark, fn) -> None:
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=300, iterations=5, warmup_rounds=20)


def test_unguarded_compiled_forward(benchmark, compiled_rt) -> None:
    rt, ids = compiled_rt
    impl = rt.internals.forward.impl  # rt.internals builds an object: not in the timed call
    _bench(benchmark, lambda: impl(input_ids=ids))
    record(GROUP, "unguarded: compiled forward called directly", benchmark, reference=True)


def test_guard_call_only(benchmark, compiled_rt) -> None:
    rt, ids = compiled_rt
    impl = rt.internals.forward.impl
    _bench(benchmark, lambda: rt.guard.call(impl, input_ids=ids))
    record(GROUP, "guarded: rt.guard.call(compiled forward)", benchmark)
    assert rt.guard.recompiles == 0


def test_full_runtime_forward(benchmark, compiled_rt) -> None:
    rt, ids = compiled_rt
    _bench(benchmark, lambda: rt.model(input_ids=ids))
    record(GROUP, "rt.model(...): whole runtime path incl. guard", benchmark)
    assert rt.guard.recompiles == 0


def test_paired_ratio(compiled_rt) -> None:
    """Sequential benchmarks drift with CPU frequency and caches by more than the guard costs, so
    also time the three paths interleaved, call by call, and compare medians."""
    rt, ids = compiled_rt
    impl = rt.internals.forward.impl  # rt.internals builds an object: not in the timed calls
    paths = {
        "unguarded": lambda: impl(input_ids=ids),
        "guard.call": lambda: rt.guard.call(impl, input_ids=ids),
        "rt.model": lambda: rt.model(input_ids=ids),
    }
    with torch.no_grad():
        medians = interleaved(paths, rounds=2000)
    note_ratios(GROUP + ", interleaved x2000", medians, "unguarded", "")
    noop = lambda: None  # noqa: E731 - the guard's own cost, without any model
    start = time.perf_counter()
    for _ in range(100_000):
        rt.guard.call(noop)
    per_call_us = (time.perf_counter() - start) * 10
    figure("guard_noop_us", per_call_us)
    note(GROUP + ", interleaved x2000", f"guard.call on a no-op: {per_call_us:.2f} us per call")
    assert rt.guard.recompiles == 0
