"""A tiny diffusers ``UNet2DConditionModel`` (built from a config) with PEFT LoRA adapters on its
attention Linear and ResNet Conv2d layers: lazy injection decides the targets, ``rt.compile`` takes
the UNet's own arguments, and hotswaps A -> B -> A into one name give PEFT's outputs with 0
recompiles. The reference is PEFT (``get_peft_model`` on the same UNet) running each adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hotswap_rt import HotswapRuntime, RuntimeConfig
from hotswap_rt.layers import LoraSlotConv2d, LoraSlotLinear

diffusers = pytest.importorskip("diffusers", reason="the diffusers test extra is not installed")

TARGETS_A = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
TARGETS_B = ["to_q", "to_v", "conv1", "conv2"]  # a subset: B leaves the others at zero
TOL = dict(atol=1e-4, rtol=1e-4)


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, norm_num_groups=4,
        attention_head_dim=2,
    ).eval()


@pytest.fixture(scope="module")
def unet_case(tmp_path_factory):
    base = tiny_unet()
    inputs = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 7]))
    hidden = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2))
    root = tmp_path_factory.mktemp("unet")
    paths, refs = {}, {}
    for name, seed, rank, targets in (("a", 1, 8, TARGETS_A), ("b", 2, 4, TARGETS_B)):
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)).eval()
        peft_model.save_pretrained(root / name)
        with torch.no_grad():
            refs[name] = peft_model(*inputs, encoder_hidden_states=hidden).sample
        paths[name] = root / name
    with torch.no_grad():
        refs[None] = base(*inputs, encoder_hidden_states=hidden).sample
    return {"base": base, "inputs": inputs, "hidden": hidden, "paths": paths, "refs": refs}


@pytest.mark.slow
def test_unet_hotswap_compiled_equals_peft(unet_case) -> None:
    refs, inputs, hidden = unet_case["refs"], unet_case["inputs"], unet_case["hidden"]
    assert not torch.allclose(refs["a"], refs[None], **TOL) and not torch.allclose(refs["b"], refs["a"], **TOL)
    # max_adapters_per_row=2: the stacked product only, one UNet graph to compile (per-row conv
    # layers are tested in test_layer_kinds)
    rt = HotswapRuntime(copy.deepcopy(unet_case["base"]), RuntimeConfig(
        target_modules=None, max_rank=8, device_slots=2, max_batch_size=2, max_adapters_per_row=2))
    rt.load("style", unet_case["paths"]["a"])
    kinds = {type(rt.model.get_submodule(name)) for name in rt.targets}
    assert kinds == {LoraSlotConv2d, LoraSlotLinear}
    assert len(rt.targets) == 48  # what A targets: the union decides, before compile
    rt.activate("style")
    with torch.no_grad():
        rt.compile(*inputs, encoder_hidden_states=hidden)
        for source in ("a", "b", "a"):
            rt.load("style", unet_case["paths"][source], replace=True)
            out = rt.model(*inputs, encoder_hidden_states=hidden).sample
            torch.testing.assert_close(out, refs[source], **TOL)
        rt.activate_rows(["style", None])
        out = rt.model(*inputs, encoder_hidden_states=hidden).sample
    torch.testing.assert_close(out[0], refs["a"][0], **TOL)
    torch.testing.assert_close(out[1], refs[None][1], **TOL)
    assert rt.guard.compiles >= 1 and rt.guard.recompiles == 0
