"""What each adapter type costs (issue 18): IA3, DoRA, LoRA with ``lora_bias`` and a
``modules_to_save`` ``lm_head`` next to plain LoRA, on a 4-layer hidden-512 Llama in fp32,
compiled, targets q/k/v/o/down_proj (IA3: k/v/down_proj, down_proj feed-forward), rank 16.

1. Forward, prefill 1 x 128 and one-token batch 8 (no KV cache): the uninjected compiled model,
   a LoRA-only runtime (no scale vectors), and one runtime with scale vectors and a per-slot
   ``lm_head`` serving each type in turn (same graph). Ratios to the uninjected model.
2. Swap: ``write_slot`` of each type's staged row into its own slot vs a ``copy_`` of the same
   bytes between preallocated tensors (the memcpy floor).

Each group is timed interleaved.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hotswap_rt import HotswapRuntime, RuntimeConfig

from .conftest import interleaved, note, note_ratios

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
PREFILL = torch.randint(0, 1024, (1, 128), generator=torch.Generator().manual_seed(0))
DECODE = torch.randint(0, 1024, (8, 1), generator=torch.Generator().manual_seed(1))
CONFIGS = {
    "lora": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False),
    "dora": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False,
                               use_dora=True),
    "lora_bias": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False,
                                    lora_bias=True),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                             feedforward_modules=["down_proj"]),
    "lm_head": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False,
                                  modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="module")
def typed(tmp_path_factory):
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024,
                                        num_hidden_layers=4, num_attention_heads=8,
                                        num_key_value_heads=8)).eval()
    root = tmp_path_factory.mktemp("types")
    paths = {}
    for i, (name, make) in enumerate(CONFIGS.items()):
        torch.manual_seed(10 + i)
        model = get_peft_model(copy.deepcopy(base), make())
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "ia3_l" in key or "lora_magnitude_vector" in key:
                    param.mul_(1 + 0.1 * torch.randn_like(param))
        model.save_pretrained(str(root / name))
        paths[name] = root / name
    plain = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(TARGETS, max_rank=16, device_slots=1))
    plain.load("lora", paths["lora"])
    plain.activate("lora")
    vectors = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(
        TARGETS, max_rank=16, device_slots=4, max_active_adapters=1, scale_vectors=True))
    for name in ("lora", "dora", "lora_bias", "ia3"):
        vectors.load(name, paths[name])
    head = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(
        TARGETS, max_rank=16, device_slots=2, max_active_adapters=1, modules_to_save=["lm_head"]))
    for name in ("lora", "lm_head"):
        head.load(name, paths[name])
    uninjected = torch.compile(copy.deepcopy(base))
    for ids in (PREFILL, DECODE):
        with torch.no_grad():
            uninjected(input_ids=ids)
    for rt in (plain, vectors, head):
        rt.activate("lora")
        rt.compile(PREFILL, warmup_inputs=[{"input_ids": DECODE}], guard="raise")
    return uninjected, {"plain": plain, "vectors": vectors, "head": head}, paths


def _forward_group(typed, ids: torch.Tensor, label: str) -> None:
    uninjected, runtimes, _ = typed
    group = f"adapter types, {label}, compiled, llama h512 x4 fp32 (ratio to uninjected)"

    def serve(rt, name):
        def call():
            rt.activate(name)
            return rt.model(input_ids=ids)
        return call

    cases = {"uninjected model": lambda: uninjected(input_ids=ids),
             "lora, runtime without scale vectors": serve(runtimes["plain"], "lora")}
    for name in ("lora", "dora", "lora_bias", "ia3"):
        cases[f"{name}, runtime with scale vectors"] = serve(runtimes["vectors"], name)
    cases["lora + lm_head (modules_to_save), runtime with lm_head slots"] = serve(runtimes["head"], "lm_head")
    with torch.no_grad():
        medians = interleaved(cases, rounds=30)
    note_ratios(group, medians, "uninjected model", "")
    assert all(rt.guard.recompiles == 0 for rt in runtimes.values())


def test_prefill_per_type(typed) -> None:
    _forward_group(typed, PREFILL, "prefill 1 x 128")


def test_decode_step_per_type(typed) -> None:
    _forward_group(typed, DECODE, "one-token forward, batch 8 (no KV cache)")


def test_swap_per_type(typed) -> None:
    _, runtimes, paths = typed
    for name in paths:
        rt = runtimes["head" if name == "lm_head" else "vectors"]
        arena, record = rt.internals.arena, rt.internals.registry.records[name]
        rows = record.staged.rows
        floors = {dtype: (torch.empty_like(row), row) for dtype, row in rows.items()}

        def memcpy():
            for target, row in floors.values():
                target.copy_(row)

        group = f"adapter types, swap {name}: write_slot of its staged row (ratio to copy_ of the bytes)"
        medians = interleaved({"copy_ of the same bytes": memcpy,
                               "write_slot": lambda: arena.write_slot(record.slot, rows)}, rounds=200)
        note_ratios(group, medians, "copy_ of the same bytes", "")
        note(group, f"{record.staged.nbytes / 1e6:.2f} MB")


MOE_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A 4-layer hidden-512 Qwen3-MoE (8 experts, top-2, expert width 256), fp32; an adapter on
    q/v_proj and both expert parameters (rank 16); the uninjected model compiled (transformers'
    grouped_mm experts) and a runtime serving the adapter (batched experts with slot LoRA)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch._dynamo.reset()
    torch.manual_seed(0)
    base = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, num_experts=8,
        num_experts_per_tok=2)).eval()
    path = tmp_path_factory.mktemp("moe") / "experts"
    get_peft_model(copy.deepcopy(base), LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], target_parameters=MOE_EXPERTS,
        init_lora_weights=False)).save_pretrained(str(path))
    attention = ["q_proj", "v_proj"]
    plain = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(attention, max_rank=16, device_slots=1))
    rt = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(attention, max_rank=16, device_slots=1,
                                                           target_parameters=MOE_EXPERTS))
    rt.load("experts", path)
    rt.activate("experts")
    uninjected = torch.compile(copy.deepcopy(base))
    for ids in (PREFILL, PREFILL_LONG, DECODE):
        with torch.no_grad():
            uninjected(input_ids=ids)
    for runtime in (plain, rt):
        runtime.compile(PREFILL, warmup_inputs=[{"input_ids": DECODE}, {"input_ids": PREFILL_LONG}],
                        guard="raise")
    return uninjected, plain, rt


PREFILL_LONG = torch.randint(0, 1024, (1, 512), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("ids, label", [(PREFILL, "prefill 1 x 128"), (PREFILL_LONG, "prefill 1 x 512"),
                                        (DECODE, "one-token forward, batch 8 (no KV cache)")])
def test_moe_experts_forward(moe, ids, label) -> None:
    uninjected, plain, rt = moe
    group = f"MoE expert LoRA, {label}, compiled, qwen3-moe h512 x4, 8 experts top-2 (ratio to uninjected)"
    with torch.no_grad():
        medians = interleaved({
            "uninjected model (transformers grouped_mm experts)": lambda: uninjected(input_ids=ids),
            "runtime without expert slots (experts untouched, no adapter)": lambda: plain.model(input_ids=ids),
            "runtime with expert slots, adapter on q/v + experts": lambda: rt.model(input_ids=ids),
        }, rounds=20)
    note_ratios(group, medians, "uninjected model (transformers grouped_mm experts)", "")
    assert rt.guard.recompiles == 0


def test_moe_experts_swap(moe) -> None:
    _, _, rt = moe
    internals = rt.internals  # it builds an object: not in the timed call
    record, arena = internals.registry.records["experts"], internals.arena
    rows = record.staged.rows
    floors = [(torch.empty_like(row), row) for row in rows.values()]

    def memcpy():
        for target, row in floors:
            target.copy_(row)

    group = "MoE expert LoRA, swap: write_slot of the staged row (ratio to copy_ of the bytes)"
    medians = interleaved({"copy_ of the same bytes": memcpy,
                           "write_slot": lambda: arena.write_slot(record.slot, rows)},
                          rounds=100)
    note_ratios(group, medians, "copy_ of the same bytes", "")
    note(group, f"{record.staged.nbytes / 1e6:.2f} MB")
