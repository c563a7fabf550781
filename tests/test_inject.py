"""Target matching follows PEFT's rules; injection never touches base weights; eject undoes it."""

from __future__ import annotations

import pytest
import torch

from hotswap_rt import HotswapError, HotswapRuntime, RuntimeConfig, TargetNotFoundError
from hotswap_rt.inject import find_targets
from hotswap_rt.layers import LoraSlotLinear

from .conftest import BaseModel, logits


@pytest.fixture(scope="module")
def llama() -> BaseModel:
    return BaseModel("llama")


def test_suffix_and_exact_names(llama: BaseModel) -> None:
    names = find_targets(llama.model, ["q_proj", "model.layers.1.mlp.down_proj"])
    assert names == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_suffix_needs_a_dot_boundary(llama: BaseModel) -> None:
    with pytest.raises(TargetNotFoundError, match="matches no"):
        find_targets(llama.model, ["proj"])  # "q_proj" ends with "proj" but not ".proj"


def test_regex_is_fullmatch(llama: BaseModel) -> None:
    names = find_targets(llama.model, r".*layers\.0\.self_attn\.(q|v)_proj")
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_all_linear_excludes_output_head(llama: BaseModel) -> None:
    names = find_targets(llama.model, "all-linear")
    assert "lm_head" not in names and len(names) == 2 * 7


def test_exclude_modules(llama: BaseModel) -> None:
    names = find_targets(llama.model, "all-linear", exclude_modules=["o_proj", "mlp.up_proj"])
    assert not any(n.endswith(("o_proj", "up_proj")) for n in names) and len(names) == 2 * 5


def test_exclude_modules_as_a_regex_string_as_peft_reads_it(llama: BaseModel) -> None:
    """A string is one regex over the whole name (PEFT's rule); it used to be split into its
    characters (``tuple("down_proj")``), excluding nothing, silently. A setting that excludes
    nothing is refused (PEFT warns)."""
    names = find_targets(llama.model, "all-linear", exclude_modules=r".*\.mlp\..*")
    assert len(names) == 2 * 4 and not any(".mlp." in n for n in names)
    config = RuntimeConfig("all-linear", exclude_modules=r".*down_proj")
    assert config.exclude_modules == r".*down_proj"
    runtime = HotswapRuntime(llama.clone(), config)
    assert len(runtime.targets) == 2 * 6 and not any(n.endswith("down_proj") for n in runtime.targets)
    with pytest.raises(TargetNotFoundError, match="a string is a regex matched against the whole"):
        find_targets(llama.model, "all-linear", exclude_modules="down_proj")
    with pytest.raises(TargetNotFoundError, match="matches no module"):
        find_targets(llama.model, "all-linear", exclude_modules=["no_such_layer"])
    for bad in (5, "[", [""], ["o_proj", 3]):
        with pytest.raises(HotswapError, match="exclude_modules"):
            RuntimeConfig("all-linear", exclude_modules=bad)
    for bad in (123, "(", []):
        with pytest.raises(HotswapError, match="target_modules"):
            RuntimeConfig(bad)


def test_unsupported_target_is_refused(llama: BaseModel) -> None:
    with pytest.raises(TargetNotFoundError, match="not nn.Linear/Conv1D/Conv2d/Embedding"):
        find_targets(llama.model, ["input_layernorm"])


def test_embedding_is_a_named_target_but_not_all_linear(llama: BaseModel) -> None:
    assert find_targets(llama.model, ["embed_tokens"]) == ["model.embed_tokens"]
    assert "model.embed_tokens" not in find_targets(llama.model, "all-linear")


def test_gpt2_conv1d_layers_are_targets() -> None:
    gpt2 = BaseModel("gpt2")
    rt = HotswapRuntime(gpt2.clone(), RuntimeConfig(target_modules=["c_attn", "c_fc"]))
    layer = rt.model.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(layer, LoraSlotLinear) and (layer.in_features, layer.out_features) == (64, 192)


def test_injection_keeps_base_weights_and_eject_restores(llama: BaseModel, input_ids) -> None:
    model = llama.clone()
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    base_logits = logits(model, input_ids)
    rt = HotswapRuntime(model, RuntimeConfig(target_modules="all-linear", max_rank=8))
    injected = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}
    assert injected.keys() == originals.keys()  # slots are not in the state dict
    assert all(torch.equal(originals[k], injected[k]) for k in originals)
    assert torch.equal(logits(model, input_ids), base_logits)
    rt.eject()
    assert not any(isinstance(m, LoraSlotLinear) for m in model.modules())
    assert "forward" not in model.__dict__
    assert torch.equal(logits(model, input_ids), base_logits)


def test_an_ejected_runtime_refuses_changes_and_still_reports(llama: BaseModel, input_ids, tmp_path) -> None:
    """After ``eject`` the model no longer reads the slots: every change is refused (it used to
    be accepted and do nothing visible: ``compile`` compiled a forward no one called), reports
    and ``save`` still work, and ejecting again returns the model without undoing twice."""
    model = llama.clone()
    adapter = llama.make_adapter(tmp_path / "a", seed=1, r=4, lora_alpha=8)
    rt = HotswapRuntime(model, RuntimeConfig(target_modules="all-linear", max_rank=8))
    rt.load("a", adapter)
    rt.activate("a")
    assert rt.eject() is model and rt.eject() is model
    base_logits = logits(llama.model, input_ids)
    assert torch.equal(logits(model, input_ids), base_logits)
    for change in (lambda: rt.activate("a"), lambda: rt.load("b", adapter), lambda: rt.unload("a"),
                   lambda: rt.pin("a"), lambda: rt.compile(input_ids), lambda: rt.disable(),
                   lambda: rt.add_adapter("n", 2, 4, trainable=False), lambda: rt.prefetch("c", adapter)):
        with pytest.raises(HotswapError, match="this runtime was ejected"):
            change()
    assert [info.name for info in rt.adapters()] == ["a"] and rt.info("a").rank == 4
    saved = rt.save("a", tmp_path / "saved")
    assert (tmp_path / "saved" / "adapter_model.safetensors").is_file() and saved.endswith("saved")
    assert torch.equal(logits(model, input_ids), base_logits)
