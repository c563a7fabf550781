"""hotswap_rt's outputs equal PEFT's on the same base weights and adapters (eager, three families)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from hotswap_rt import HotswapRuntime, RuntimeConfig

from .conftest import ATTENTION_TARGETS, BaseModel, logits, max_diff

TOL = 1e-4  # API.md: fp32 max abs diff on logits of a tiny model


@dataclass
class Setup:
    base: BaseModel
    adapters: dict[str, Path]
    reference: PeftModel
    rt: HotswapRuntime


def _adapter_specs(family: str) -> dict[str, dict]:
    attention = ATTENTION_TARGETS[family]
    first, last = attention[0], attention[-1]
    return {
        "a": dict(r=4, lora_alpha=8),
        "b": dict(r=8, lora_alpha=16, use_rslora=True),
        "c": dict(r=4, lora_alpha=8, rank_pattern={first: 8}, alpha_pattern={last: 32}),
        "d": dict(r=2, lora_alpha=4, target_modules=[first]),  # a subset of the injected layers
    }


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2"])
def setup(request, tmp_path_factory) -> Setup:
    family = request.param
    base = BaseModel(family)
    root = tmp_path_factory.mktemp(f"adapters-{family}")
    adapters = {
        name: base.make_adapter(root / name, seed=10 + i, **spec)
        for i, (name, spec) in enumerate(_adapter_specs(family).items())
    }
    rt = HotswapRuntime(
        base.clone(),
        RuntimeConfig(target_modules=ATTENTION_TARGETS[family], max_rank=16, device_slots=4),
    )
    for name, path in adapters.items():
        rt.load(name, path)
    return Setup(base, adapters, base.peft_reference(adapters), rt)


def test_injection_alone_keeps_base_outputs_exactly(setup: Setup, input_ids) -> None:
    fresh = HotswapRuntime(setup.base.clone(), RuntimeConfig(target_modules="all-linear"))
    assert torch.equal(logits(fresh.model, input_ids), logits(setup.base.model, input_ids))


@pytest.mark.parametrize("name", ["a", "b", "c", "d"])
def test_single_adapter_matches_peft(setup: Setup, input_ids, name: str) -> None:
    setup.reference.set_adapter(name)
    expected = logits(setup.reference, input_ids)
    setup.rt.activate(name)
    got = logits(setup.rt.model, input_ids)
    assert max_diff(got, expected) <= TOL
    assert max_diff(got, logits(setup.base.model, input_ids)) > 1e-3  # the adapter does something


def test_rank_and_alpha_patterns_are_per_module(setup: Setup) -> None:
    info = {i.name: i for i in setup.rt.adapters()}["c"]
    first, last = ATTENTION_TARGETS[setup.base.family][0], ATTENTION_TARGETS[setup.base.family][-1]
    assert info.rank_pattern == {first: 8} and info.alpha_pattern == {last: 32.0}


def test_weighted_pair_matches_explicit_peft_sum(setup: Setup, input_ids) -> None:
    # Reference: PEFT with both adapters active and b's lora_B scaled by 0.5, i.e.
    # W x + 1.0 * s_a B_a A_a x + 0.5 * s_b B_b A_b x.
    reference = setup.base.peft_reference({k: setup.adapters[k] for k in ("a", "b")})
    with torch.no_grad():
        for module in reference.modules():
            if hasattr(module, "lora_B") and "b" in module.lora_B:
                module.lora_B["b"].weight.mul_(0.5)
    reference.base_model.set_adapter(["a", "b"])
    setup.rt.activate({"a": 1.0, "b": 0.5})
    assert max_diff(logits(setup.rt.model, input_ids), logits(reference, input_ids)) <= TOL


def test_per_row_batch_matches_peft_adapter_names(setup: Setup, input_ids) -> None:
    rows = ["a", "c", None, "b"]
    expected = logits(
        setup.reference, input_ids, adapter_names=[r or "__base__" for r in rows]
    )
    setup.rt.activate_rows(rows)
    assert max_diff(logits(setup.rt.model, input_ids), expected) <= TOL


def test_disabled_equals_base_exactly_and_enable_restores(setup: Setup, input_ids) -> None:
    base_logits = logits(setup.base.model, input_ids)
    setup.rt.activate("a")
    with_a = logits(setup.rt.model, input_ids)
    setup.rt.disable()
    assert torch.equal(logits(setup.rt.model, input_ids), base_logits)
    setup.rt.enable()
    assert torch.equal(logits(setup.rt.model, input_ids), with_a)
    with setup.rt.disabled():
        assert torch.equal(logits(setup.rt.model, input_ids), base_logits)
    assert torch.equal(logits(setup.rt.model, input_ids), with_a)
    setup.rt.activate(None)
    assert torch.equal(logits(setup.rt.model, input_ids), base_logits)


def test_state_dict_and_config_source_matches_directory(setup: Setup, input_ids) -> None:
    from peft import LoraConfig
    from safetensors.torch import load_file

    path = setup.adapters["b"]
    config = LoraConfig.from_pretrained(str(path))
    state = load_file(str(path / "adapter_model.safetensors"))
    rt = HotswapRuntime(
        setup.base.clone(), RuntimeConfig(target_modules=ATTENTION_TARGETS[setup.base.family])
    )
    rt.load("b", state_dict=state, config=config)
    rt.activate("b")
    setup.rt.activate("b")
    assert torch.equal(logits(rt.model, input_ids), logits(setup.rt.model, input_ids))
