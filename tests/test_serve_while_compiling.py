"""``EngineConfig(serve_while_compiling=True)``: the engine answers at once with the eager
forward while its buckets compile on a thread of their own, then with the compiled graphs.

Its own file: dynamo's cache is reset first, so the compile is a real one (another runtime of
the same model class compiled in this process would hand its graphs over in an instant). Every
output is compared with PEFT's greedy ``generate`` of the prompt alone.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hotswap_rt import HotswapError, HotswapRuntime, RuntimeConfig
from hotswap_rt.engine import EngineConfig, GenerationEngine, SamplingParams

from .conftest import ATTENTION_TARGETS, IdTokenizer
from .test_engine import GREEDY, abc_scene, prompt, reference_tokens, tokens_of

pytestmark = pytest.mark.slow  # compiles two graphs, on a thread of its own


def _meanwhile_runtime(base_model: torch.nn.Module, paths, **config) -> HotswapRuntime:
    """A runtime for serve_while_compiling: the stacked product only (one graph per shape)."""
    rt = HotswapRuntime(base_model, RuntimeConfig(
        ATTENTION_TARGETS["llama"], max_rank=16, device_slots=3, max_batch_size=4,
        max_adapters_per_row=3, **config))
    for name, path in paths.items():
        rt.load(name, path)
    return rt


@pytest.fixture(scope="module")
def meanwhile_parts(tmp_path_factory):
    """The base model, three adapters, PEFT's reference; dynamo's cache emptied."""
    return abc_scene(tmp_path_factory, "meanwhile")


MEANWHILE_CONFIG = dict(max_seqs=4, max_prefill_seqs=2, prefill_chunk=8, decode_buckets=(1, 2, 4),
                        serve_while_compiling=True)
MEANWHILE_CASES = [("a", prompt(61, 5), 10), (None, prompt(62, 19), 9),
                   ({"a": 1.0, "c": 1.0}, prompt(63, 11), 8), ("b", prompt(64, 3), 12)]


def _run_cases(engine) -> list[list[int]]:
    handles = [engine.submit(ids, adapter, SamplingParams(max_tokens=new, **GREEDY))
               for adapter, ids, new in MEANWHILE_CASES]
    return [tokens_of(handle)[0] for handle in handles]


def _peft_cases(reference) -> list[list[int]]:
    return [reference_tokens(reference, sorted(a) if isinstance(a, dict) else a, ids, new)
            for a, ids, new in MEANWHILE_CASES]


def test_serve_while_compiling_answers_eagerly_at_once_then_compiled(meanwhile_parts) -> None:
    base, paths, reference = meanwhile_parts
    rt = _meanwhile_runtime(base.clone(), paths)
    step_states: list[str] = []  # the compile's state at each step
    engine = GenerationEngine(rt, IdTokenizer(), EngineConfig(**MEANWHILE_CONFIG),
                              on_step=lambda *_: step_states.append(engine.compile_state))
    ran_at: list[str] = []
    before: list[tuple[str, int, bool]] = []  # before_compile: the state, compiles, which thread
    expected = _peft_cases(reference)
    try:
        engine.start(before_compile=lambda: before.append(
            (engine.compile_state, rt.guard.compiles, threading.current_thread().name)))
        assert engine.compile_state == "compiling" and not rt.compiled  # start did not wait
        held = engine.call(lambda rt: ran_at.append(engine.compile_state))  # an adapter command
        while engine.compile_state == "compiling":  # requests answered meanwhile
            assert _run_cases(engine) == expected
            assert engine.compile_state != "compiling" or not held.done()  # commands wait
        eager_steps = step_states.count("compiling")
        assert eager_steps >= 1, step_states  # steps ran before the graphs were ready
        assert engine.compile_state == "compiled" and engine.compile_error is None
        print(f"{eager_steps} steps ran eagerly during a {engine.compile_seconds:.1f} s compile")
        held.result(timeout=30)
        assert ran_at == ["compiled"]
        assert before == [("compiling", 0, "hotswap-engine-compile")]
        assert _run_cases(engine) == expected  # the compiled graphs now
        assert step_states[-1] == "compiled"
        assert rt.compiled and rt.guard.armed
        # one decode graph and one prefill graph (dynamic batch), none recompiled by steps
        assert rt.guard.compiles == 2 and rt.guard.recompiles == 0, rt.guard.report()
    finally:
        engine.stop()


def test_serve_while_compiling_keeps_serving_eagerly_when_the_compile_fails(meanwhile_parts,
                                                                          monkeypatch) -> None:
    import hotswap_rt.engine.warmup as warmup

    def fails(*args, **kwargs):
        raise RuntimeError("the compiler broke")

    monkeypatch.setattr(warmup, "_padding_forward", fails)
    base, paths, reference = meanwhile_parts
    rt = _meanwhile_runtime(base.clone(), paths)
    engine = GenerationEngine(rt, IdTokenizer(), EngineConfig(**MEANWHILE_CONFIG))
    try:
        engine.start()
        deadline = time.monotonic() + 60
        while engine.compile_state == "compiling" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.compile_state == "failed" and "the compiler broke" in str(engine.compile_error)
        assert not rt.compiled and rt.internals.forward.impl is rt.internals.forward.eager
        assert _run_cases(engine) == _peft_cases(reference)  # eager, as before
        assert engine.call(lambda rt: "ran").result(timeout=30) == "ran"  # commands run again
    finally:
        engine.stop()


def test_serve_while_compiling_refuses_what_it_cannot_do(meanwhile_parts) -> None:
    base, paths, _ = meanwhile_parts
    with pytest.raises(HotswapError, match="needs compile=True"):
        EngineConfig(serve_while_compiling=True, compile=False)
    with pytest.raises(HotswapError, match="serve_while_compiling must be a bool"):
        EngineConfig(serve_while_compiling="yes")
    two_graphs = HotswapRuntime(base.clone(), RuntimeConfig(  # per-row + stacked: 2 per shape
        ATTENTION_TARGETS["llama"], max_rank=16, device_slots=3, max_batch_size=4))
    assert two_graphs.graphs_per_shape == 2
    with pytest.raises(HotswapError, match="one graph per input shape; this runtime compiles 2"):
        GenerationEngine(two_graphs, IdTokenizer(), EngineConfig(**MEANWHILE_CONFIG))
    buckets = _meanwhile_runtime(base.clone(), {}, rank_buckets=(4,))
    assert buckets.graphs_per_shape == 2
    with pytest.raises(HotswapError, match="compiles 2"):
        buckets.compile(torch.ones(1, 4, dtype=torch.long), eager_meanwhile=True)
    rt = _meanwhile_runtime(base.clone(), {})
    assert rt.graphs_per_shape == 1
    with pytest.raises(HotswapError, match="CUDA graphs"):
        GenerationEngine(rt, IdTokenizer(), EngineConfig(**MEANWHILE_CONFIG, compile_mode="reduce-overhead"))
    with pytest.raises(HotswapError, match="eager_meanwhile must be a bool"):
        rt.compile(torch.ones(1, 4, dtype=torch.long), eager_meanwhile=1)
    blocking = GenerationEngine(rt, IdTokenizer(),
                                EngineConfig(**{**MEANWHILE_CONFIG, "serve_while_compiling": False}))
    with pytest.raises(HotswapError, match="before_compile runs only with EngineConfig.serve_while_compiling"):
        blocking.start(before_compile=lambda: None)
    assert not rt.compiled and not buckets.compiled and rt.guard.compiles == 0
