"""The engine's fallback for a model whose forward branches on its batch size.

On CPU the engine traces each kind of step (decode, prefill) once with an unbacked batch
dimension, so one graph serves every bucket, a single row included. A forward that branches on
the batch size cannot be traced so: the engine must say so and compile those buckets as before
(a graph for one row, one dynamic graph for the others), and still generate what PEFT does.
The static per-bucket graphs (``dynamic_batch=False``, CUDA's default) are compiled here too.
"""

from __future__ import annotations

import logging

import pytest
from transformers import LlamaForCausalLM

from hotswap_rt import HotswapRuntime, RuntimeConfig
from hotswap_rt.engine import EngineConfig, GenerationEngine, SamplingParams
from hotswap_rt.engine.step import cache_argument

from .conftest import ATTENTION_TARGETS, BaseModel, IdTokenizer
from .test_engine import GREEDY, prompt, reference_tokens, tokens_of

pytestmark = pytest.mark.slow  # compiles four graphs in each engine test


class BatchBranchingLlama(LlamaForCausalLM):
    """A Llama whose forward asks whether it has one row (the answer changes nothing)."""

    def forward(self, input_ids=None, **kwargs):
        output = super().forward(input_ids=input_ids, **kwargs)
        if input_ids.shape[0] == 1:  # a branch on the batch size: unbacked, it cannot be traced
            output.logits = output.logits * 1.0
        return output


def _engine(model, path, dynamic_batch: bool | None) -> GenerationEngine:
    """An engine over ``model`` with adapter "a" at ``path``: decode buckets 1 and 2, prefill
    buckets 1 and 2, the stacked product only (a graph per shape)."""
    rt = HotswapRuntime(model.eval(), RuntimeConfig(
        ATTENTION_TARGETS["llama"], max_rank=4, device_slots=1, max_batch_size=2,
        max_adapters_per_row=1))
    rt.load("a", path)
    return GenerationEngine(rt, IdTokenizer(), EngineConfig(
        max_seqs=2, max_prefill_seqs=2, prefill_chunk=8, decode_buckets=(1, 2),
        dynamic_batch=dynamic_batch))


def _generates_what_peft_does(engine: GenerationEngine, reference) -> None:
    """Two prompts together (prefill and decode of 2 rows), then one alone (1 row): the tokens
    of PEFT's greedy ``generate`` of each prompt alone, and nothing recompiled."""
    # prompts whose greedy continuations hold no EOS (the reference's min_new_tokens masks it)
    ids = [prompt(89, 7), prompt(90, 3)]
    handles = [engine.submit(p, "a", SamplingParams(max_tokens=5, **GREEDY)) for p in ids]
    for p, handle in zip(ids, handles):
        assert tokens_of(handle)[0] == reference_tokens(reference, "a", p, 5)
    alone = engine.submit(ids[1], "a", SamplingParams(max_tokens=5, **GREEDY))  # one row
    assert tokens_of(alone)[0] == reference_tokens(reference, "a", ids[1], 5)
    assert engine.rt.guard.recompiles == 0, engine.rt.guard.report()


def test_a_forward_that_branches_on_the_batch_size_gets_a_graph_for_one_row(tmp_path, caplog) -> None:
    base = BaseModel("llama", seed=11)
    model = BatchBranchingLlama(base.model.config)
    model.load_state_dict(base.model.state_dict())
    path = base.make_adapter(tmp_path / "a", seed=40, r=4, lora_alpha=8)
    reference = base.peft_reference({"a": path})
    engine = _engine(model, path, dynamic_batch=None)  # the CPU default: unbacked, then the fallback
    with caplog.at_level(logging.WARNING, logger="hotswap_rt.engine.warmup"):
        engine.start()
    try:
        warned = [r.getMessage() for r in caplog.records if "needs to know the batch size" in r.getMessage()]
        assert len(warned) == 2 and "decode buckets" in warned[0] and "prefill buckets" in warned[1]
        assert engine.shapes.dynamic_batch and engine.shapes.prefill_buckets == (1, 2)
        # decode and prefill each: one row, and 2 rows with a dynamic batch
        assert engine.rt.guard.compiles == 4, engine.rt.guard.report()
        _generates_what_peft_does(engine, reference)
    finally:
        engine.stop()


def test_static_batch_buckets_each_compile_a_graph_and_generate_what_peft_does(tmp_path) -> None:
    """``dynamic_batch=False`` (the default on CUDA, where CUDA graphs are recorded per shape;
    run here without them): a graph per bucket."""
    base = BaseModel("llama", seed=11)
    path = base.make_adapter(tmp_path / "a", seed=40, r=4, lora_alpha=8)
    reference = base.peft_reference({"a": path})
    engine = _engine(base.clone(), path, dynamic_batch=False)
    engine.start()
    try:
        assert not engine.shapes.dynamic_batch and engine.shapes.prefill_buckets == (1, 2)
        assert engine.rt.guard.compiles == 4, engine.rt.guard.report()  # decode 1, 2; prefill 1, 2
        _generates_what_peft_does(engine, reference)
    finally:
        engine.stop()


def test_the_cache_keyword_is_found_up_the_model_classes() -> None:
    model = BatchBranchingLlama(BaseModel("llama", seed=11).model.config)
    # its forward takes **kwargs; LlamaForCausalLM's names the cache (transformers 5: "cache")
    assert cache_argument(model.forward, model) == "cache"
    assert cache_argument(LlamaForCausalLM.forward, model) == "cache"
