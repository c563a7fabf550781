"""What serving with hotswap_rt costs per forward, next to its floors and to PEFT (compiled, CPU).

Models: a 4-layer hidden-512 Llama in fp32, and (prefill and decode only) a 2-layer stack with
Llama-7B layer shapes (hidden 4096, MLP 11008, 32 heads) in bf16 where the CPU has bf16 matmuls;
attention adapters (q/k/v/o) of rank 16, ``no_grad``. PEFT keeps its adapter weights in fp32 on
a bf16 base (its default ``autocast_adapter_dtype=True``); hotswap_rt's slots take the layer's
dtype.

1. Prefill (batch 1 x 128 tokens), one adapter: the compiled model without injection, the same
   adapter merged into the weights (the physical floor for one adapter), hotswap_rt with one
   active position (``max_active_adapters=1``), and PEFT's compiled model.
2. Mixed batch (8 rows x 32 tokens): 4 different adapters via ``activate_rows`` vs one adapter
   for all rows (same runtime, same graph) vs PEFT's ``adapter_names=`` forward (eager: PEFT's
   mixed batch loops in Python).
3. Padding: a rank-4 adapter in a max_rank-64 runtime, with and without rank buckets, vs a
   max_rank-4 runtime.

4. Decode (batch 8, one token per step, static KV cache): per-token time from ``generate`` with
   N and 1 new tokens (N = 65 on the small model, 9 on the 7B shapes), for the uninjected,
   merged, hotswap_rt and PEFT models, each with its forward compiled.

Each group is timed interleaved.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from hotswap_rt import HotswapRuntime, RuntimeConfig

from .conftest import interleaved, note, note_ratios
from .test_swap_matrix import random_adapter_dir

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PREFILL = torch.randint(0, 1024, (1, 128), generator=torch.Generator().manual_seed(0))
MIXED = torch.randint(0, 1024, (8, 32), generator=torch.Generator().manual_seed(1))


SHAPES = {  # prefill and decode run on both; mixed batch and padding on the first
    "llama h512 x4, fp32": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                num_attention_heads=8, dtype=torch.float32),
    "llama-7B layer shapes x2, bf16": dict(hidden_size=4096, intermediate_size=11008,
                                           num_hidden_layers=2, num_attention_heads=32,
                                           dtype=torch.bfloat16),
}
BF16_OK = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _build(label: str, root):
    """The base model of shape ``label`` and five attention adapters (ranks 16 x4, then 4)."""
    settings = dict(SHAPES[label])
    dtype = settings.pop("dtype")
    if dtype == torch.bfloat16 and not BF16_OK:
        pytest.skip("this CPU has no bf16 matmul support")
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=1024, num_key_value_heads=settings["num_attention_heads"], **settings)).eval()
    base.to(dtype)
    paths = {f"a{i}": random_adapter_dir(base, TARGETS, rank, 10 + i, root / f"a{i}")
             for i, rank in enumerate([16, 16, 16, 16, 4])}
    return base, paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _build(next(iter(SHAPES)), tmp_path_factory.mktemp("forward"))


@pytest.fixture(scope="module", params=list(SHAPES))
def shaped(request, tmp_path_factory):
    label = request.param
    base, paths = _build(label, tmp_path_factory.mktemp("shaped"))
    return label, base, paths


def _runtime(base, paths, names, max_rank=16, active=1, rank_buckets=None) -> HotswapRuntime:
    rt = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(
        TARGETS, max_rank=max_rank, device_slots=max(active, 1), max_active_adapters=active,
        rank_buckets=rank_buckets))
    for name in names:
        rt.load(name, paths[name])
    return rt


def _one_adapter_models(base, paths):
    """Adapter "a0" merged into a copy of the weights, in a PEFT model, and in a runtime."""
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(paths["a0"])).merge_and_unload()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths["a0"])).eval()
    rt = _runtime(base, paths, ["a0"])
    rt.activate("a0")
    return merged, peft_model, rt


def _compiled_call(model, ids):
    compiled = torch.compile(model)
    with torch.no_grad():
        compiled(input_ids=ids)  # compile outside the timing
    return lambda: compiled(input_ids=ids)


def test_prefill_overhead(shaped) -> None:
    label, base, paths = shaped
    group = f"forward, prefill 1 x 128, one adapter, compiled, {label} (ratio to uninjected)"
    rounds = 40 if base.config.hidden_size <= 512 else 10
    merged, peft_model, rt = _one_adapter_models(base, paths)
    rt.compile(PREFILL, guard="raise")
    cases = {
        "uninjected model": _compiled_call(copy.deepcopy(base), PREFILL),
        "adapter merged into the weights": _compiled_call(merged, PREFILL),
        "hotswap_rt (1 active position)": lambda: rt.model(input_ids=PREFILL),
        "peft": _compiled_call(peft_model, PREFILL),
    }
    with torch.no_grad():
        medians = interleaved(cases, rounds=rounds)
    note_ratios(group, medians, "uninjected model", "")
    assert rt.guard.recompiles == 0


def test_mixed_batch(setup) -> None:
    base, paths = setup
    group = "mixed batch 8 x 32, 4 adapters (ratio to one adapter for all rows, same runtime)"
    names = ["a0", "a1", "a2", "a3"]
    rt = _runtime(base, paths, names, active=4)
    rt.compile(MIXED, guard="raise")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths["a0"]), adapter_name="a0")
    for name in names[1:]:
        peft_model.load_adapter(str(paths[name]), adapter_name=name)
    peft_model.eval()
    rows = [names[i % 4] for i in range(8)]

    def mixed():
        rt.activate_rows(rows)
        return rt.model(input_ids=MIXED)

    def single():
        rt.activate("a0")
        return rt.model(input_ids=MIXED)

    with torch.no_grad():
        medians = interleaved({
            "hotswap_rt one adapter (activate + forward)": single,
            "hotswap_rt 4 adapters per row (activate_rows + forward)": mixed,
            "peft adapter_names= forward (eager)": lambda: peft_model(
                input_ids=MIXED, adapter_names=rows),
        }, rounds=30)
    note_ratios(group, medians, "hotswap_rt one adapter (activate + forward)", "")
    assert rt.guard.recompiles == 0


def test_padding_cost(setup) -> None:
    base, paths = setup
    group = "padding: rank-4 adapter, prefill 1 x 128, compiled (ratio to a max_rank-4 runtime)"
    tight = _runtime(base, paths, ["a4"], max_rank=4)
    padded = _runtime(base, paths, ["a4"], max_rank=64)
    bucketed = _runtime(base, paths, ["a4"], max_rank=64, rank_buckets=(4, 16))
    for rt in (tight, padded, bucketed):
        rt.activate("a4")
        rt.compile(PREFILL, guard="raise")
    assert bucketed.internals.selection.rank_bucket == 4
    with torch.no_grad():
        medians = interleaved({
            "max_rank 4": lambda: tight.model(input_ids=PREFILL),
            "max_rank 64": lambda: padded.model(input_ids=PREFILL),
            "max_rank 64, rank_buckets (4, 16, 64)": lambda: bucketed.model(input_ids=PREFILL),
        }, rounds=40)
    assert bucketed.guard.recompiles == 0
    note_ratios(group, medians, "max_rank 4", "")
    note(group, f"slot row bytes: {tight.slot_nbytes} vs {padded.slot_nbytes}")


DECODE_PROMPT = torch.randint(0, 1024, (8, 16), generator=torch.Generator().manual_seed(2))


def _generate(model, new_tokens: int):
    return model.generate(input_ids=DECODE_PROMPT, max_new_tokens=new_tokens, do_sample=False,
                          cache_implementation="static", pad_token_id=0)


def _compile_forward(model, tokens: int, inner=None):
    """Compile the forward ``generate`` calls (``inner``: the module that holds the layers)."""
    target = inner if inner is not None else model
    target.forward = torch.compile(target.forward)
    with torch.no_grad():
        _generate(model, tokens)  # prefill + decode graphs, outside the timing
    return model


def test_decode_per_token(shaped) -> None:
    label, base, paths = shaped
    group = f"decode, batch 8, static KV cache, compiled, {label} (per-token ratio to uninjected)"
    tiny = base.config.hidden_size <= 512
    tokens, rounds = (65, 12) if tiny else (9, 4)
    merged, peft_model, rt = _one_adapter_models(base, paths)
    rt.compile(warmup=lambda m: _generate(m, tokens), guard="raise")
    models = {
        "uninjected model": _compile_forward(copy.deepcopy(base), tokens),
        "adapter merged into the weights": _compile_forward(merged, tokens),
        "hotswap_rt (1 active position)": rt.model,
        "peft": _compile_forward(peft_model, tokens, inner=peft_model.base_model.model),
    }
    cases = {}
    for name, model in models.items():
        cases[f"{name} {tokens}"] = lambda model=model: _generate(model, tokens)
        cases[f"{name} 1"] = lambda model=model: _generate(model, 1)
    with torch.no_grad():
        medians = interleaved(cases, rounds=rounds)
    per_token = {name: (medians[f"{name} {tokens}"] - medians[f"{name} 1"]) / (tokens - 1)
                 for name in models}
    note(group, f"per token = (generate {tokens} new tokens - generate 1) / {tokens - 1}, "
                f"medians of {rounds} interleaved rounds")
    note_ratios(group, per_token, "uninjected model", "")
    assert rt.guard.recompiles == 0
