"""The generation engine on a compiled tiny Llama with three PEFT adapters.

References are independent of the engine: PEFT's own eager ``generate`` of each prompt alone
(greedy), and PEFT's logits for log-probabilities. One compiled engine is shared by the module;
its buckets (decode 1/2/4, prefill 1/2) all run in these tests and nothing may recompile.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hotswap_rt import HotswapError, HotswapRuntime, RuntimeConfig, UnknownAdapterError
from hotswap_rt.engine import (
    EngineConfig, FinishEvent, GenerationEngine, RequestError, SamplingParams, TokenEvent)

from .conftest import ATTENTION_TARGETS, VOCAB, BaseModel, IdTokenizer

pytestmark = pytest.mark.slow  # compiles four graphs once
MAX_LEN = 128  # the tiny Llama's context
GREEDY = dict(temperature=0.0, ignore_eos=True)  # the random model may say its EOS (2)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base, paths, reference = abc_scene(tmp_path_factory, "engine")
    engine = GenerationEngine(loaded_runtime(base, paths), IdTokenizer(), EngineConfig(
        max_seqs=4, max_prefill_seqs=2, prefill_chunk=8, decode_buckets=(1, 2, 4)))
    engine.start()
    yield engine, reference
    engine.stop()


def abc_scene(tmp_path_factory, name: str):
    """dynamo's cache emptied; the tiny Llama (seed 11), its adapters "a", "b", "c"
    (:func:`abc_adapters`) and PEFT's reference holding them: ``(base, paths, reference)``."""
    torch._dynamo.reset()
    base = BaseModel("llama", seed=11)
    paths = abc_adapters(base, tmp_path_factory.mktemp(name))
    return base, paths, base.peft_reference(paths)


def loaded_runtime(base: BaseModel, paths: dict) -> HotswapRuntime:
    """A runtime on a copy of ``base`` (its attention projections, max_rank 16, 3 device slots,
    batches of up to 4 rows) with the adapters ``paths`` (name -> dir) loaded."""
    rt = HotswapRuntime(base.clone(), RuntimeConfig(
        ATTENTION_TARGETS["llama"], max_rank=16, device_slots=3, max_batch_size=4))
    for name, path in paths.items():
        rt.load(name, path)
    return rt


def abc_adapters(base: BaseModel, root) -> dict:
    """Adapters "a", "b", "c" (ranks 4, 8, 12) of ``base``, written under ``root``: name -> dir."""
    return {name: base.make_adapter(root / name, seed=40 + i, r=4 * (i + 1), lora_alpha=8)
            for i, name in enumerate("abc")}


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_tokens(reference, adapter, ids: list[int], new: int) -> list[int]:
    """PEFT's greedy continuation of ``ids`` alone, with ``adapter`` (a name, a list summed, or
    None for the base model)."""
    with torch.no_grad():
        if adapter is None:
            with reference.disable_adapter():
                out = reference.generate(torch.tensor([ids]), max_new_tokens=new,
                                         min_new_tokens=new, do_sample=False)
        else:
            reference.base_model.set_adapter(adapter)
            out = reference.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False)
    return out[0, len(ids):].tolist()


def tokens_of(handle) -> tuple[list[int], FinishEvent]:
    text, finish = handle.text()
    return [int(t) for t in text.split()], finish


def test_rows_that_join_at_different_steps_equal_peft(env) -> None:
    engine, reference = env
    cases = [("a", prompt(1, 5), 12), (None, prompt(2, 19), 9), ("b", prompt(3, 3), 14),
             ({"a": 1.0, "c": 1.0}, prompt(4, 11), 10), ("c", prompt(5, 26), 8), ("a", prompt(6, 7), 6)]
    handles = []
    for adapter, ids, new in cases:  # staggered: each joins while earlier ones decode
        handles.append(engine.submit(ids, adapter, SamplingParams(max_tokens=new, **GREEDY)))
        time.sleep(0.02)
    for (adapter, ids, new), handle in zip(cases, handles):
        tokens, finish = tokens_of(handle)
        peft_adapter = sorted(adapter) if isinstance(adapter, dict) else adapter
        assert tokens == reference_tokens(reference, peft_adapter, ids, new), adapter
        assert finish.reason == "length" and finish.completion_tokens == new
        assert finish.prompt_tokens == len(ids)
    assert engine.rt.guard.recompiles == 0


def test_a_short_request_arriving_during_a_long_one_finishes_first(env) -> None:
    engine, _ = env
    finished: list[str] = []
    started = threading.Event()

    def sink_for(name):
        def sink(event):
            if isinstance(event, TokenEvent):
                started.set()
            if isinstance(event, FinishEvent):
                finished.append(name)
        return sink

    long = engine.submit(prompt(7, 4), "a", SamplingParams(max_tokens=100, **GREEDY), sink=sink_for("long"))
    assert started.wait(60)
    engine.submit(prompt(8, 4), "b", SamplingParams(max_tokens=3, **GREEDY), sink=sink_for("short"))
    deadline = time.monotonic() + 60
    while len(finished) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert finished == ["short", "long"]
    assert long.cancelled.is_set() is False
    with pytest.raises(TypeError, match="streams to its sink"):
        iter(long)  # at once, not at the first next()


def test_cancel_mid_stream_frees_the_row_at_once(env) -> None:
    engine, _ = env
    handle = engine.submit(prompt(9, 6), "c", SamplingParams(max_tokens=120, **GREEDY))
    events = iter(handle)
    for _ in range(3):
        assert isinstance(next(events), TokenEvent)
    handle.cancel()
    rest = list(events)
    assert isinstance(rest[-1], FinishEvent) and rest[-1].reason == "cancelled"
    assert rest[-1].completion_tokens < 120
    deadline = time.monotonic() + 5
    while engine.load()["running"] and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.load()["running"] == 0
    # every row is usable again: a full batch runs
    handles = [engine.submit(prompt(10 + i, 5), "a", SamplingParams(max_tokens=4, **GREEDY))
               for i in range(4)]
    assert all(tokens_of(h)[1].reason == "length" for h in handles)


def test_bad_values_fail_alone_or_are_handled(env) -> None:
    engine, reference = env
    with pytest.raises(RequestError) as error:
        engine.submit(prompt(11, 4), "a", SamplingParams(max_tokens=5, top_p=0.0))
    assert error.value.param == "top_p"
    with pytest.raises(RequestError, match="max_tokens"):
        engine.submit(prompt(11, 4), "a", SamplingParams(max_tokens=MAX_LEN))
    with pytest.raises(RequestError, match="prompt"):
        engine.submit(prompt(11, MAX_LEN), None, SamplingParams(max_tokens=1))
    with pytest.raises(UnknownAdapterError):
        engine.submit(prompt(11, 4), "ghost", SamplingParams(max_tokens=5))
    with pytest.raises(RequestError, match="logit_bias"):
        engine.submit(prompt(11, 4), "a", SamplingParams(logit_bias={VOCAB + 5: 1.0}))
    # wrong types: RequestErrors naming the parameter (were AttributeError / TypeError / ValueError,
    # or accepted and failed later on the engine thread)
    for call, param in (
            (lambda: engine.submit(prompt(11, 4), "a", {"max_tokens": 2}), "sampling"),
            (lambda: engine.submit(prompt(11, 4), "a", sink=5), "sink"),
            (lambda: engine.submit(prompt(11, 4), "a", request_id=[1]), "request_id"),
            (lambda: engine.submit(5, "a"), "prompt"),
            (lambda: engine.submit("hello", "a"), "prompt"),
            (lambda: engine.submit([True, False], "a"), "prompt"),
            (lambda: SamplingParams(stop=5), "stop"),
            (lambda: SamplingParams(stop_token_ids=5), "stop_token_ids"),
            (lambda: SamplingParams(logit_bias="x"), "logit_bias")):
        with pytest.raises(RequestError) as error:
            call()
        assert error.value.param == param
    ids = prompt(12, 6)
    tiny_temperature = engine.submit(ids, "b", SamplingParams(max_tokens=8, temperature=1e-50,
                                                              ignore_eos=True))
    huge_seed = engine.submit(ids, "b", SamplingParams(max_tokens=8, temperature=1.0, seed=2**64 + 3))
    folded_seed = engine.submit(ids, "b", SamplingParams(max_tokens=8, temperature=1.0, seed=3))
    good = engine.submit(ids, "a", SamplingParams(max_tokens=8, **GREEDY))
    assert tokens_of(tiny_temperature)[0] == reference_tokens(reference, "b", ids, 8)  # greedy
    assert tokens_of(huge_seed)[0] == tokens_of(folded_seed)[0]  # seeds fold into 64 bits
    assert tokens_of(good)[0] == reference_tokens(reference, "a", ids, 8)


def test_seeded_sampling_is_the_same_alone_and_in_a_crowd(env) -> None:
    engine, _ = env
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
    alone = tokens_of(engine.submit(prompt(13, 5), "c", params))[0]
    crowd = [engine.submit(prompt(20 + i, 3 + i), "a", SamplingParams(max_tokens=12, temperature=1.0))
             for i in range(3)]
    again = tokens_of(engine.submit(prompt(13, 5), "c", params))[0]
    other = tokens_of(engine.submit(prompt(13, 5), "c", SamplingParams(
        max_tokens=10, temperature=0.9, top_p=0.9, seed=4321, ignore_eos=True)))[0]
    for handle in crowd:
        tokens_of(handle)
    assert alone == again and alone != other


def test_logprobs_are_the_models_log_softmax(env) -> None:
    engine, reference = env
    ids = prompt(14, 9)
    handle = engine.submit(ids, "b", SamplingParams(max_tokens=5, logprobs=3, **GREEDY))
    events = [e for e in handle if isinstance(e, TokenEvent)]
    generated = [e.token_id for e in events]
    reference.base_model.set_adapter("b")
    with torch.no_grad():
        logits = reference(torch.tensor([ids + generated])).logits[0, len(ids) - 1:-1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for step, event in enumerate(events):
        assert abs(event.logprob - expected[step, event.token_id].item()) <= 1e-4
        top_values, top_ids = expected[step].topk(3)
        assert [t for t, _ in event.top_logprobs] == top_ids.tolist()
        assert max(abs(lp - v) for (_, lp), v in zip(event.top_logprobs, top_values.tolist())) <= 1e-4


def test_max_tokens_defaults_to_the_rest_of_the_context(env) -> None:
    engine, _ = env
    ids = prompt(15, MAX_LEN - 7)  # several prefill chunks, then 7 tokens
    tokens, finish = tokens_of(engine.submit(ids, "a", SamplingParams(max_tokens=None, **GREEDY)))
    assert finish.reason == "length" and len(tokens) == 7


def test_stop_token_ids_end_the_output(env) -> None:
    engine, reference = env
    ids = prompt(16, 5)
    expected = reference_tokens(reference, "c", ids, 12)
    stop = expected[4]
    tokens, finish = tokens_of(engine.submit(ids, "c", SamplingParams(
        max_tokens=12, stop_token_ids=(stop,), **GREEDY)))
    cut = expected.index(stop)
    assert finish.reason == "stop" and tokens == expected[:cut]  # the stop token is not text
    assert finish.completion_tokens == cut + 1


def test_a_handle_hands_out_each_event_once_and_text_returns_the_whole_output(env) -> None:
    engine, reference = env
    ids = prompt(17, 6)
    expected = reference_tokens(reference, "b", ids, 9)
    handle = engine.submit(ids, "b", SamplingParams(max_tokens=9, **GREEDY))
    events = iter(handle)
    first = [next(events) for _ in range(3)]  # iterated in part, then the rest by text()
    assert [event.token_id for event in first] == expected[:3]
    text, finish = handle.text()
    assert [int(t) for t in text.split()] == expected and finish.reason == "length"
    assert handle.text() == (text, finish)  # again: the same, at once (it used to block forever)
    assert list(handle) == [] and list(events) == []  # nothing left to hand out


def test_dynamic_lengths_and_batch_are_validated() -> None:
    with pytest.raises(HotswapError, match="dynamic_batch"):
        EngineConfig(dynamic_batch="yes")
    with pytest.raises(HotswapError, match="dynamic_lengths"):
        EngineConfig(dynamic_lengths=1)


def test_every_bucket_ran_and_nothing_recompiled(env) -> None:
    engine, _ = env
    handles = [engine.submit(prompt(30 + i, 2 + 5 * i), [None, "a", "b", "c"][i],
                             SamplingParams(max_tokens=6, **GREEDY)) for i in range(4)]
    for handle in handles:
        assert tokens_of(handle)[1].reason == "length"
    # each graph twice: the per-row graph and the stacked one (RuntimeConfig's default); on
    # CPU the decode buckets share one graph with an unbacked batch (a single row included),
    # and the prefill buckets another
    assert engine.rt.config.per_row_auto
    assert engine.shapes.dynamic_batch and engine.shapes.decode_buckets == (1, 2, 4)
    assert engine.shapes.prefill_buckets == (1, 2)
    assert engine.rt.guard.compiles == 2 * 2, engine.rt.guard.report()
    assert engine.rt.guard.recompiles == 0, engine.rt.guard.report()
