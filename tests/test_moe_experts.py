"""LoRA on fused MoE experts (PEFT's ``target_parameters``) in the slots, against real PEFT.

A tiny Qwen3-MoE (4 experts, top-2, ``moe_intermediate_size`` 24 so that every expert projection
has distinct in/out sizes). Adapters are made with PEFT (``init_lora_weights=False``) and saved:
one on q_proj and both expert parameters, one on ``down_proj`` only (rank 2), one plain LoRA.
PEFT cannot run a mixed batch with ``target_parameters``, so each row is compared with PEFT
running that row's adapter alone.
"""

from __future__ import annotations

import copy
import shutil
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from hotswap_rt import HotswapRuntime, IncompatibleAdapterError, RuntimeConfig, TargetNotFoundError
from hotswap_rt.experts import LoraSlotExperts

from .conftest import (
    VOCAB, assert_rows_equal_alone, assert_unchanged, loaded_and_compiled, logits, max_diff, snapshot_state,
)

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TOL = 1e-4


def tiny_moe() -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                            num_experts_per_tok=2)
    return Qwen3MoeForCausalLM(config).eval()


def make_adapter(base: torch.nn.Module, directory: Path, seed: int, **lora: object) -> Path:
    torch.manual_seed(seed)
    lora.setdefault("target_modules", ["q_proj"])
    model = get_peft_model(copy.deepcopy(base), LoraConfig(lora_alpha=8, init_lora_weights=False, **lora))
    model.save_pretrained(str(directory))
    return directory


def peft_alone(base: torch.nn.Module, directory: Path) -> torch.nn.Module:
    return PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    base = tiny_moe()
    root = tmp_path_factory.mktemp("moe")
    dirs = {
        "both": make_adapter(base, root / "both", 1, r=4, target_parameters=EXPERT_PARAMS),
        "down": make_adapter(base, root / "down", 2, r=2, target_modules=[],
                             target_parameters=["mlp.experts.down_proj"]),
        "plain": make_adapter(base, root / "plain", 3, r=4, target_modules=["q_proj", "v_proj"]),
    }
    references = {name: peft_alone(base, path) for name, path in dirs.items()}
    ids = torch.randint(0, VOCAB, (4, 7), generator=torch.Generator().manual_seed(2))
    rt = loaded_and_compiled(copy.deepcopy(base), RuntimeConfig(
        ["q_proj", "v_proj"], max_rank=8, device_slots=3, host_slots=4, target_parameters=EXPERT_PARAMS),
        dirs, ids)
    return base, dirs, references, rt, ids


def test_files_are_peft_expert_lora(moe) -> None:
    _, dirs, _, rt, _ = moe
    state = load_file(str(dirs["both"] / "adapter_model.safetensors"))
    # PEFT nests the second wrapped parameter outside the first: gate_up_proj sits under base_layer
    assert state["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (16, 64)
    assert state["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].shape == (16, 24)
    assert isinstance(rt.model.model.layers[0].mlp.experts, LoraSlotExperts)
    assert "model.layers.1.mlp.experts.down_proj" in rt.targets


def test_uninjected_experts_compute_the_base(moe) -> None:
    base, _, _, rt, ids = moe
    rt.activate(None)
    assert max_diff(logits(rt.model, ids), logits(base, ids)) <= 1e-5


@pytest.mark.parametrize("name", ["both", "down", "plain"])
def test_each_alone_equals_peft(moe, name) -> None:
    base, _, references, rt, ids = moe
    rt.activate(name)
    ours = logits(rt.model, ids)
    assert max_diff(ours, logits(references[name], ids)) <= TOL
    assert max_diff(ours, logits(base, ids)) > 1e-2


def test_mixed_batch_each_row_equals_peft_alone(moe) -> None:
    base, _, references, rt, ids = moe
    rows = ["down", None, "both", "plain"]
    rt.activate_rows(rows)
    ours = logits(rt.model, ids)
    assert_rows_equal_alone(ours, ids, rows, references, base, TOL)
    assert rt.guard.recompiles == 0


def _merged(base: torch.nn.Module, dirs: dict[str, Path], weights: dict[str, float]) -> torch.nn.Module:
    """The base with ``sum_i w_i * scaling_i * B_e A_e`` added to every expert weight (and
    ``w_i * scaling_i * B A`` to every linear target), computed from the files (PEFT's expert
    layout: A ``[r*E, in]`` expert-major, B ``[out, r*E]`` column ``j*E + e``)."""
    merged = copy.deepcopy(base)
    for name, weight in weights.items():
        state = load_file(str(dirs[name] / "adapter_model.safetensors"))
        config = json.loads((dirs[name] / "adapter_config.json").read_text())
        scaling, rank = config["lora_alpha"] / config["r"], config["r"]
        for key, lora_a in state.items():
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            if key.endswith(".lora_A.weight") and ".experts" not in key:
                lora_b = state[key.replace("lora_A", "lora_B")]
                with torch.no_grad():
                    merged.get_submodule(module).weight.add_(weight * scaling * lora_b @ lora_a)
        for layer, block in enumerate(merged.model.layers):
            experts = block.mlp.experts
            prefix = f"base_model.model.model.layers.{layer}.mlp.experts"
            held = sorted(p.rsplit(".", 1)[-1] for p in config["target_parameters"])  # down_proj, gate_up_proj
            params = [p for p in ("gate_up_proj", "down_proj") if p in held]
            for depth, param in enumerate(reversed(params)):
                key = prefix + ".base_layer" * depth
                lora_a = state[f"{key}.lora_A.weight"].view(4, rank, -1)  # [E, r, in]
                lora_b = state[f"{key}.lora_B.weight"].view(-1, rank, 4)  # [out, r, E]
                delta = torch.einsum("ore,eri->eoi", lora_b, lora_a) * scaling  # [E, out, in]
                with torch.no_grad():
                    getattr(experts, param).add_(weight * delta)
    return merged


def test_weighted_mix_equals_merged_weights(moe) -> None:
    base, dirs, _, rt, ids = moe
    weights = {"both": 0.5, "down": -0.75}
    rt.activate(weights)
    assert max_diff(logits(rt.model, ids), logits(_merged(base, dirs, weights), ids)) <= TOL


def test_per_row_mode_equals_peft(moe) -> None:
    base, dirs, references, _, ids = moe
    config = RuntimeConfig(["q_proj", "v_proj"], max_rank=8, device_slots=3, max_adapters_per_row=1,
                           target_parameters=EXPERT_PARAMS)
    rt = HotswapRuntime(copy.deepcopy(base), config)
    for name, path in dirs.items():
        rt.load(name, path)
    rows = ["both", "plain", "down", None]
    rt.activate_rows(rows)
    ours = logits(rt.model, ids)
    assert_rows_equal_alone(ours, ids, rows, references, base, TOL)


@pytest.mark.parametrize("name", ["both", "down"])
def test_save_loads_in_peft(moe, tmp_path, name) -> None:
    base, _, references, rt, ids = moe
    out = Path(rt.save(name, tmp_path / name))
    assert json.loads((out / "adapter_config.json").read_text())["target_parameters"]
    assert max_diff(logits(peft_alone(base, out), ids), logits(references[name], ids)) <= TOL


def test_lazy_runtime_injects_expert_parameters(moe) -> None:
    base, dirs, references, _, ids = moe
    rt = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(None, max_rank=8, device_slots=2))
    rt.load("down", dirs["down"])  # wraps the experts with down_proj only
    rt.load("both", dirs["both"])  # adds gate_up_proj to the same wrappers
    assert "model.layers.0.mlp.experts.gate_up_proj" in rt.targets
    for name in ("down", "both"):
        rt.activate(name)
        assert max_diff(logits(rt.model, ids), logits(references[name], ids)) <= TOL
    rt.eject()
    assert type(rt.model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"


def test_runtime_without_expert_slots_refuses_and_changes_nothing(moe) -> None:
    base, dirs, _, _, ids = moe
    rt = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(["q_proj", "v_proj"], max_rank=8, device_slots=2))
    rt.load("plain", dirs["plain"])
    rt.activate("plain")
    before = snapshot_state(rt, ids)
    with pytest.raises(IncompatibleAdapterError, match="down_proj' is not an injected.*target_parameters"):
        rt.load("down", dirs["down"])
    assert_unchanged(before, snapshot_state(rt, ids))
    rt = HotswapRuntime(copy.deepcopy(base),
                        RuntimeConfig(["q_proj"], max_rank=8, target_parameters=EXPERT_PARAMS))
    with pytest.raises(IncompatibleAdapterError, match="cannot be trained"):
        rt.load("both", dirs["both"], trainable=True)
    assert not rt.adapters()


def test_target_parameters_must_match(moe) -> None:
    base, _, _, _, _ = moe
    with pytest.raises(TargetNotFoundError, match="matches no expert parameter"):
        HotswapRuntime(copy.deepcopy(base), RuntimeConfig(["q_proj"], target_parameters=["mlp.experts.nope"]))


def test_one_batch_with_every_adapter_type(moe, tmp_path) -> None:
    """Rows carrying IA3, DoRA, MoE-expert LoRA, plain LoRA and nothing, in one compiled batch on
    the MoE model: each row equals PEFT running its adapter alone."""
    from peft import IA3Config

    base, dirs, references, _, ids = moe
    ia3_config = IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[])
    ia3 = get_peft_model(copy.deepcopy(base), ia3_config)
    dora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             use_dora=True)
    dora = get_peft_model(copy.deepcopy(base), dora_config)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for model in (ia3, dora):
            for key, param in model.named_parameters():
                if "ia3_l" in key or "lora_magnitude_vector" in key:
                    param.mul_(1 + 0.3 * torch.randn(param.shape, generator=generator))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    dora.save_pretrained(str(tmp_path / "dora"))
    paths = {**dirs, "ia3": tmp_path / "ia3", "dora": tmp_path / "dora"}
    refs = {**references, "ia3": peft_alone(base, paths["ia3"]), "dora": peft_alone(base, paths["dora"])}
    rt = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(["q_proj", "k_proj", "v_proj"], max_rank=8,
                                                           device_slots=4, max_batch_size=8,
                                                           target_parameters=EXPERT_PARAMS))
    for name in ("ia3", "dora", "both", "plain"):
        rt.load(name, paths[name])
    batch = torch.cat([ids, ids[:1]])  # 5 rows
    rt.compile(input_ids=batch)
    rows = ["ia3", "dora", "both", "plain", None]
    rt.activate_rows(rows)
    ours = logits(rt.model, batch)
    assert_rows_equal_alone(ours, batch, rows, refs, base, TOL)
    assert rt.guard.recompiles == 0


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_grouped_and_batched_expert_paths_equal_peft(moe, implementation) -> None:
    """The base projections grouped by expert (prefill-sized shapes, unless the model is set to
    ``batched_mm``) or gathered per pair (few pairs per expert): both equal PEFT."""
    base, dirs, references, _, ids = moe
    model = copy.deepcopy(base)
    model.config._experts_implementation = implementation
    rt = HotswapRuntime(model, RuntimeConfig(["q_proj"], max_rank=8, target_parameters=EXPERT_PARAMS))
    rt.load("both", dirs["both"])
    rt.activate("both")
    experts = rt.model.model.layers[0].mlp.experts
    assert experts._grouped(ids.numel() * 2) is (implementation == "grouped_mm")
    assert not experts._grouped(2)  # one token, two pairs over 4 experts: the batched gather
    for batch in (ids, ids[:1, :1]):
        assert max_diff(logits(rt.model, batch), logits(references["both"], batch)) <= TOL


def test_an_unselected_expert_adapter_whose_product_overflows_changes_no_row(moe, tmp_path) -> None:
    """Expert factors read at weight 0 (the other slots, read in place) whose product with x
    overflows float32 add exactly nothing (inf * 0 would be NaN in every row)."""
    base, dirs, _, _, ids = moe
    huge = tmp_path / "huge"
    shutil.copytree(dirs["both"], huge)
    state = load_file(str(huge / "adapter_model.safetensors"))
    save_file({key: torch.full_like(t, 3e38) if "lora_A" in key else t for key, t in state.items()},
              str(huge / "adapter_model.safetensors"))
    config = RuntimeConfig(["q_proj", "v_proj"], max_rank=8, device_slots=3, host_slots=4,
                           target_parameters=EXPERT_PARAMS)
    clean = HotswapRuntime(copy.deepcopy(base), config)
    clean.load("down", dirs["down"])
    clean.activate_rows(["down", None, "down", None])
    expected = logits(clean.model, ids)
    rt = HotswapRuntime(copy.deepcopy(base), config)
    rt.load("huge", huge)
    rt.activate("huge")
    assert not torch.isfinite(logits(rt.model, ids)).all()  # it does overflow when selected
    rt.load("down", dirs["down"])
    rt.activate_rows(["down", None, "down", None])
    ours = logits(rt.model, ids)
    assert torch.isfinite(ours).all() and max_diff(ours, expected) <= 1e-5
