"""IA3, DoRA and LoRA with ``lora_bias`` in the same slots as plain LoRA, against real PEFT.

The model is a tiny Qwen2 (its q/k/v projections have biases, so DoRA's bias handling is
exercised). Adapters are made with PEFT and their vectors randomised (PEFT initialises IA3 to 1
and DoRA's magnitude to the weight norm, both of which would hide mistakes), then saved with
``save_pretrained``: exactly what users load. The reference for every row is PEFT running that
row's adapter alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from hotswap_rt import HotswapRuntime, IncompatibleAdapterError, RuntimeConfig

from .conftest import BaseModel, assert_rows_equal_alone, assert_unchanged, logits, max_diff, snapshot_state

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
TOL = 1e-4


def _save(peft_model: torch.nn.Module, directory: Path, seed: int) -> Path:
    """Randomise the adapter's vectors (seeded), save it, return the directory."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=generator))
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.randn(param.shape, generator=generator))
            elif "lora_B" in name and name.endswith("bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(str(directory))
    return directory


def make_adapter(base: BaseModel, directory: Path, kind: str, seed: int) -> Path:
    torch.manual_seed(seed)
    if kind == "ia3":
        config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    else:
        extra = {"use_dora": kind == "dora", "lora_bias": kind == "bias"}
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False, **extra)
    return _save(get_peft_model(base.clone(), config), directory, seed)


def peft_alone(base: BaseModel, directory: Path) -> torch.nn.Module:
    return PeftModel.from_pretrained(base.clone(), str(directory)).eval()


KINDS = ["lora", "dora", "ia3", "bias"]


def qwen2_with_biases() -> BaseModel:
    """Tiny Qwen2 whose q/k/v biases are non-zero (transformers initialises them to zero)."""
    base = BaseModel("qwen2", seed=3)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in base.model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=generator))
    return base


@pytest.fixture(scope="module")
def types(tmp_path_factory):
    """The base model, one adapter of each kind (+ a second IA3 and DoRA), PEFT references,
    and a compiled runtime holding all of them (scale vectors added at the first IA3 load)."""
    base = qwen2_with_biases()
    root = tmp_path_factory.mktemp("types")
    dirs = {kind: make_adapter(base, root / kind, kind, seed=10 + i) for i, kind in enumerate(KINDS)}
    dirs["ia3_2"] = make_adapter(base, root / "ia3_2", "ia3", seed=20)
    dirs["dora_2"] = make_adapter(base, root / "dora_2", "dora", seed=21)
    references = {name: peft_alone(base, path) for name, path in dirs.items()}
    rt = HotswapRuntime(base.clone(), RuntimeConfig(TARGETS, max_rank=8, device_slots=6, host_slots=8,
                                                    max_batch_size=8))
    assert not rt.internals.arena.vectors
    for name, path in dirs.items():
        rt.load(name, path)
    assert rt.internals.arena.vectors  # added before compiling, when IA3/DoRA arrived
    ids = torch.randint(0, 128, (5, 10), generator=torch.Generator().manual_seed(4))
    rt.compile(input_ids=ids)
    return base, dirs, references, rt, ids


def test_files_are_what_peft_saves(types) -> None:
    _, dirs, _, _, _ = types
    ia3 = load_file(str(dirs["ia3"] / "adapter_model.safetensors"))
    assert ia3["base_model.model.model.layers.0.mlp.down_proj.ia3_l"].shape == (1, 128)  # input scale
    assert ia3["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].shape == (32, 1)  # output
    dora = load_file(str(dirs["dora"] / "adapter_model.safetensors"))
    assert dora["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"].shape == (64,)
    bias = load_file(str(dirs["bias"] / "adapter_model.safetensors"))
    assert bias["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"].shape == (64,)


@pytest.mark.parametrize("name", KINDS + ["ia3_2", "dora_2"])
def test_each_adapter_alone_equals_peft(types, name) -> None:
    _, _, references, rt, ids = types
    rt.activate(name)
    ours = logits(rt.model, ids)
    reference = logits(references[name], ids)
    assert max_diff(ours, reference) <= TOL
    rt.activate(None)
    assert max_diff(ours, logits(rt.model, ids)) > 1e-2  # the adapter changed the output


def test_mixed_batch_each_row_equals_peft_alone(types) -> None:
    """One batch: IA3, DoRA, LoRA, LoRA+bias and no adapter, each row as PEFT runs it alone."""
    base, _, references, rt, ids = types
    rows = ["ia3", "dora", "lora", "bias", None]
    rt.activate_rows(rows)
    ours = logits(rt.model, ids)
    assert_rows_equal_alone(ours, ids, rows, references, base.model, TOL)
    assert rt.guard.recompiles == 0


def test_weighted_ia3_equals_peft_weighted_merge(types) -> None:
    """IA3 weights w (summing to 1) act as PEFT's ``add_weighted_adapter``: ``l = sum w_i l_i``."""
    base, dirs, _, rt, ids = types
    reference = PeftModel.from_pretrained(base.clone(), str(dirs["ia3"]), adapter_name="a")
    reference.load_adapter(str(dirs["ia3_2"]), adapter_name="b")
    reference.add_weighted_adapter(["a", "b"], [0.3, 0.7], "mix")
    reference.set_adapter("mix")
    rt.activate({"ia3": 0.3, "ia3_2": 0.7})
    ours = logits(rt.model, ids)
    assert max_diff(ours, logits(reference.eval(), ids)) <= TOL


def _layer_formula(base: BaseModel, dirs: dict[str, Path], weights: dict[str, float], layer: str,
                   x: torch.Tensor) -> torch.Tensor:
    """The slot layer's defined output, from the files and the base weight:
    ``base(x) + sum_i w_i delta_i(x)`` with DoRA's ``delta = (s - 1) W x + s * scaling * B A x``
    and LoRA-bias's ``delta = scaling * (B A x + b)``."""
    module = base.model.get_submodule(layer)
    out = module(x)
    for name, weight in weights.items():
        state = load_file(str(dirs[name] / "adapter_model.safetensors"))
        config = json.loads((dirs[name] / "adapter_config.json").read_text())
        scaling = config["lora_alpha"] / config["r"]
        key = f"base_model.model.{layer}"
        lora_a, lora_b = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
        lora = x @ lora_a.T @ lora_b.T * scaling
        if config.get("use_dora"):
            norm = torch.linalg.norm(module.weight + scaling * lora_b @ lora_a, dim=1)
            s = state[f"{key}.lora_magnitude_vector"] / norm
            delta = (s - 1) * (x @ module.weight.T) + s * lora
        else:
            delta = lora + scaling * state.get(f"{key}.lora_B.bias", torch.zeros(()))
        out = out + weight * delta
    return out


def test_weighted_dora_and_bias_at_a_layer_equal_the_formula(types) -> None:
    base, dirs, _, rt, _ = types
    layer = "model.layers.1.self_attn.q_proj"
    weights = {"dora": 0.6, "dora_2": -0.4, "bias": 0.5}
    rt.activate(weights)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = rt.model.get_submodule(layer)(x)
        expected = _layer_formula(base, dirs, weights, layer, x)
    assert max_diff(ours, expected) <= 1e-5


def test_per_row_mode_equals_peft(types, tmp_path) -> None:
    """``max_adapters_per_row=1``: each row gathers its own slot's vectors."""
    base, dirs, references, _, ids = types
    rt = HotswapRuntime(base.clone(), RuntimeConfig(TARGETS, max_rank=8, device_slots=4, host_slots=6,
                                                    max_adapters_per_row=1, scale_vectors=True))
    for name in KINDS:
        rt.load(name, dirs[name])
    rows = ["bias", None, "ia3", "dora", "lora"]
    rt.activate_rows(rows)
    ours = logits(rt.model, ids)
    assert_rows_equal_alone(ours, ids, rows, references, base.model, TOL)


@pytest.mark.parametrize("name", ["ia3", "dora", "bias"])
def test_save_loads_in_peft(types, tmp_path, name) -> None:
    base, _, references, rt, ids = types
    out = Path(rt.save(name, tmp_path / name))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == ("IA3" if name == "ia3" else "LORA")
    reloaded = peft_alone(base, out)
    assert max_diff(logits(reloaded, ids), logits(references[name], ids)) <= TOL


def test_compiled_runtime_without_vectors_refuses_and_changes_nothing(types, input_ids) -> None:
    base, dirs, references, _, _ = types
    rt = HotswapRuntime(base.clone(), RuntimeConfig(TARGETS, max_rank=8, device_slots=2, host_slots=4))
    rt.load("lora", dirs["lora"])
    rt.activate("lora")
    rt.compile(input_ids=input_ids)
    before = snapshot_state(rt, input_ids)
    for name in ("ia3", "dora", "bias"):
        with pytest.raises(IncompatibleAdapterError, match="scale_vectors=True"):
            rt.load(name, dirs[name])
        with pytest.raises(IncompatibleAdapterError, match="scale_vectors=True"):
            rt.check(dirs[name])
    assert_unchanged(before, snapshot_state(rt, input_ids))
    assert not rt.internals.arena.vectors


def test_scale_vectors_reserved_hotswap_after_compile(types, input_ids) -> None:
    """``scale_vectors=True``: a compiled runtime serving LoRA takes IA3 and DoRA later, 0 recompiles."""
    base, dirs, references, _, _ = types
    rt = HotswapRuntime(base.clone(), RuntimeConfig(TARGETS, max_rank=8, device_slots=2, host_slots=4,
                                                    scale_vectors=True))
    rt.load("lora", dirs["lora"])
    rt.activate("lora")
    rt.compile(input_ids=input_ids)
    for name in ("ia3", "dora", "bias"):  # two device slots: each load evicts one
        rt.load(name, dirs[name])
        rt.activate(name)
        assert max_diff(logits(rt.model, input_ids), logits(references[name], input_ids)) <= TOL
    assert rt.guard.recompiles == 0


def test_lazy_runtime_injects_ia3_targets(types) -> None:
    base, dirs, references, _, ids = types
    rt = HotswapRuntime(base.clone(), RuntimeConfig(None, max_rank=8, device_slots=2, host_slots=4))
    rt.load("lora", dirs["lora"])
    rt.load("ia3", dirs["ia3"])  # adds k_proj and scale vectors; the staged LoRA is re-laid
    assert "model.layers.0.self_attn.k_proj" in rt.targets and rt.internals.arena.vectors
    for name in ("lora", "ia3"):
        rt.activate(name)
        assert max_diff(logits(rt.model, ids), logits(references[name], ids)) <= TOL


def test_vector_adapters_are_not_trainable(types) -> None:
    _, dirs, _, _, _ = types
    rt = HotswapRuntime(qwen2_with_biases().clone(), RuntimeConfig(TARGETS, max_rank=8))
    for name in ("ia3", "dora"):
        with pytest.raises(IncompatibleAdapterError, match="cannot be trained"):
            rt.load(name, dirs[name], trainable=True)
    assert not rt.internals.arena.vectors and not rt.adapters()
