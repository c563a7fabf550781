"""Adapters saved against transformers 4's per-expert layout (``experts.<e>.gate_proj``, Mixtral's
``block_sparse_moe.experts.<e>.w1``), loaded onto transformers 5's fused experts.

The adapter files are written here in that layout (random factors, as an adapter trained on
transformers 4 would have saved them). References: PEFT loading the same directory (it converts
them itself), and the base model with each expert's ``scaling * B A`` added to its rows of the
fused parameters, computed from the files.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from hotswap_rt import AdapterFormatError, HotswapRuntime, RankTooLargeError, RuntimeConfig, enable_hotswap

from .conftest import VOCAB, assert_rows_equal_alone, assert_unchanged, logits, max_diff, snapshot_state

TOL = 1e-4
HIDDEN, INTER, EXPERTS = 64, 24, 4
QWEN = ("mlp", {"gate_proj": 0, "up_proj": 1, "down_proj": None})
MIXTRAL = ("block_sparse_moe", {"w1": 0, "w3": 1, "w2": None})


def tiny_qwen3_moe() -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, moe_intermediate_size=INTER,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=EXPERTS,
        num_experts_per_tok=2)).eval()


def tiny_mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=2)).eval()


def write_per_expert_adapter(directory: Path, layout: tuple[str, dict], seed: int, rank: int = 4,
                             experts: tuple[int, ...] = tuple(range(EXPERTS)),
                             projections: tuple[str, ...] = (), rank_pattern: dict | None = None,
                             alpha_pattern: dict | None = None) -> Path:
    """A LoRA adapter as PEFT saved it on a transformers 4 MoE model: per-expert projections
    (all of the layout's unless ``projections``) and ``q_proj``, alpha 8."""
    block, names = layout
    projections = projections or tuple(names)
    generator = torch.Generator().manual_seed(seed)
    state = {}

    def add(module: str, d_in: int, d_out: int) -> None:
        r = next((v for k, v in (rank_pattern or {}).items() if module.endswith(k)), rank)
        state[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, d_in, generator=generator) / 4
        state[f"base_model.model.{module}.lora_B.weight"] = torch.randn(d_out, r, generator=generator) / 4

    for layer in range(2):
        add(f"model.layers.{layer}.self_attn.q_proj", HIDDEN, HIDDEN)
        for expert in experts:
            for proj in projections:
                d_in, d_out = (HIDDEN, INTER) if names[proj] is not None else (INTER, HIDDEN)
                add(f"model.layers.{layer}.{block}.experts.{expert}.{proj}", d_in, d_out)
    directory.mkdir(parents=True)
    save_file(state, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 8,
        "target_modules": ["q_proj", *projections], "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {}}))
    return directory


def merged_from_files(base: torch.nn.Module, directory: Path, layout: tuple[str, dict]) -> torch.nn.Module:
    """``base`` with every module's ``alpha / r * B A`` added to its weight, per-expert modules
    to their expert's rows of ``gate_up_proj`` (gate first) / ``down_proj``."""
    block, names = layout
    config = json.loads((directory / "adapter_config.json").read_text())
    state = load_file(str(directory / "adapter_model.safetensors"))
    merged = copy.deepcopy(base)
    for key, lora_a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        alphas = config["alpha_pattern"].items()
        alpha = next((v for k, v in alphas if module.endswith(k)), config["lora_alpha"])
        delta = alpha / lora_a.shape[0] * state[key.replace("lora_A", "lora_B")] @ lora_a
        with torch.no_grad():
            if ".experts." not in module:
                merged.get_submodule(module).weight.add_(delta)
                continue
            owner, expert, proj = module.rsplit(".", 2)
            experts = merged.get_submodule(owner.replace(block, "mlp"))
            if names[proj] is None:
                experts.down_proj[int(expert)].add_(delta)
            else:
                experts.gate_up_proj[int(expert), names[proj] * INTER : (names[proj] + 1) * INTER].add_(delta)
    return merged


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    base = tiny_qwen3_moe()
    root = tmp_path_factory.mktemp("unfused")
    dirs = {
        "full": write_per_expert_adapter(root / "full", QWEN, seed=1),
        # experts 0 and 2 only, up_proj of expert 2 at rank 2 with its own alpha, no down_proj
        "partial": write_per_expert_adapter(root / "partial", QWEN, seed=2, experts=(0, 2),
                                            projections=("gate_proj", "up_proj"),
                                            rank_pattern={"experts.2.up_proj": 2},
                                            alpha_pattern={"up_proj": 3.0}),
    }
    lazy = RuntimeConfig(None, max_rank=8, device_slots=3, host_slots=4)
    rt = HotswapRuntime(copy.deepcopy(base), lazy)
    for name, path in dirs.items():
        rt.load(name, path)
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    rt.compile(input_ids=ids)
    return base, dirs, rt, ids


def test_per_expert_adapter_equals_peft_and_the_merged_weights(qwen) -> None:
    base, dirs, rt, ids = qwen
    rt.activate("full")
    ours = logits(rt.model, ids)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs["full"])).eval()  # PEFT converts it too
    assert max_diff(ours, logits(peft, ids)) <= TOL
    assert max_diff(ours, logits(merged_from_files(base, dirs["full"], QWEN), ids)) <= TOL
    assert max_diff(ours, logits(base, ids)) > 1e-2
    info = rt.info("full")
    assert "model.layers.0.mlp.experts.gate_up_proj" in info.targets
    assert not any(".experts.0." in target for target in info.targets)
    assert info.rank_pattern["model.layers.0.mlp.experts.gate_up_proj"] == 8  # gate + up ranks


def test_missing_experts_and_mixed_ranks_and_alphas_convert_exactly(qwen) -> None:
    base, dirs, rt, ids = qwen
    rt.activate("partial")
    assert max_diff(logits(rt.model, ids), logits(merged_from_files(base, dirs["partial"], QWEN), ids)) <= TOL


def test_mixed_batch_rows_and_no_recompile(qwen) -> None:
    base, dirs, rt, ids = qwen
    rows = ["partial", None, "full"]
    rt.activate_rows(rows)
    references = {name: merged_from_files(base, path, QWEN) for name, path in dirs.items()}
    assert_rows_equal_alone(logits(rt.model, ids), ids, rows, references, base, TOL)
    assert rt.guard.recompiles == 0


def test_saved_in_the_fused_layout_that_peft_loads(qwen, tmp_path) -> None:
    base, _, rt, ids = qwen
    rt.activate("partial")
    ours = logits(rt.model, ids)
    rt.save("partial", tmp_path / "saved")
    state = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    assert not any(".experts.0." in key for key in state)
    # gate_up_proj: fused rank 4 (gate) + 4 (up, the largest) over 4 experts, nested as PEFT does
    assert state["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].shape == (8 * EXPERTS, HIDDEN)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "saved")).eval()
    assert max_diff(ours, logits(peft, ids)) <= TOL
    again = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(None, max_rank=8))  # and we read it back
    again.load("saved", tmp_path / "saved")
    again.activate("saved")
    assert max_diff(ours, logits(again.model, ids)) <= TOL


def test_mixtral_block_sparse_moe_w1_w3_w2(tmp_path) -> None:
    base = tiny_mixtral()
    directory = write_per_expert_adapter(tmp_path / "mixtral", MIXTRAL, seed=3)
    rt = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(
        ["q_proj"], max_rank=8, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    rt.load("a", directory)
    rt.activate("a")
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    ours = logits(rt.model, ids)
    assert max_diff(ours, logits(merged_from_files(base, directory, MIXTRAL), ids)) <= TOL
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()
    assert max_diff(ours, logits(peft, ids)) <= TOL


def test_transformers_load_adapter_converts_too(qwen) -> None:
    base, dirs, _, ids = qwen
    model = copy.deepcopy(base)
    rt = enable_hotswap(model, max_rank=8)
    model.load_adapter(str(dirs["full"]), adapter_name="full")
    assert "model.layers.1.mlp.experts.down_proj" in rt.targets
    assert max_diff(logits(model, ids), logits(merged_from_files(base, dirs["full"], QWEN), ids)) <= TOL


def _rewrite(directory: Path, rename: tuple[str, str] | None = None, shape_of: str | None = None) -> None:
    path = directory / "adapter_model.safetensors"
    state = load_file(str(path))
    if rename:
        state = {key.replace(*rename): value for key, value in state.items()}
        config = json.loads((directory / "adapter_config.json").read_text())
        config["target_modules"].append(rename[1].rsplit(".", 1)[-1] or "unused")
        (directory / "adapter_config.json").write_text(json.dumps(config))
    if shape_of:
        key = next(key for key in state if shape_of in key and "lora_A" in key)
        state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    save_file(state, str(path))


@pytest.mark.parametrize("change, message", [
    ({"rename": ("experts.1.up_proj", "experts.1.fc1")}, "not an expert projection"),
    ({"rename": ("experts.3.", "experts.7.")}, "has 4 experts"),
    ({"shape_of": "experts.2.down_proj"}, "do not fit an expert projection"),
])
def test_bad_per_expert_adapters_are_refused_with_nothing_changed(qwen, tmp_path, change, message) -> None:
    _, _, rt, ids = qwen
    directory = write_per_expert_adapter(tmp_path / "bad", QWEN, seed=5)
    _rewrite(directory, **change)
    rt.activate("full")
    before = snapshot_state(rt, ids)
    with pytest.raises(AdapterFormatError, match=message):
        rt.load("bad", directory)
    assert_unchanged(before, snapshot_state(rt, ids))


def test_fused_rank_over_max_rank_is_explained(qwen) -> None:
    base, dirs, _, _ = qwen
    rt = HotswapRuntime(copy.deepcopy(base), RuntimeConfig(None, max_rank=6))  # r=4 gate + r=4 up = 8
    with pytest.raises(RankTooLargeError, match="gate_up_proj' has rank 8 > max_rank=6 .*ranks summed"):
        rt.load("full", dirs["full"])
    assert rt.adapters() == [] and rt.targets == []
