"""hotswap_rt.parse_cache: an adapter whose structure was parsed before is rebuilt from a recipe
that gives exactly what ``parse_adapter`` gives (and raises what it raises), around the new
adapter's own tensors; adapters whose modules are not the file's tensors as they are never get
one; and a runtime loading such adapters serves each one's own values (as PEFT does)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from hotswap_rt import HotswapRuntime, RuntimeConfig
from hotswap_rt import parse_cache as parse_cache_module
from hotswap_rt.errors import AdapterFormatError
from hotswap_rt.parse_cache import ParseCache
from hotswap_rt.peft_format import LoraModule, all_finite, parse_adapter, read_adapter_dir

from .conftest import BaseModel, logits, max_diff

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return BaseModel("llama")


@pytest.fixture(scope="module")
def adapters(base: BaseModel, tmp_path_factory) -> list[Path]:
    """Two adapters of one structure (same config, keys, shapes), other values."""
    root = tmp_path_factory.mktemp("same-structure")
    return [base.make_adapter(root / str(seed), seed, r=4, lora_alpha=8, target_modules=TARGETS)
            for seed in (1, 2)]


@pytest.fixture()
def parses(monkeypatch) -> list[str | None]:
    """The sources ``parse_adapter`` was called for through the cache."""
    calls: list[str | None] = []

    def counting(config, state_dict, source=None, **kwargs):
        calls.append(source)
        return parse_adapter(config, state_dict, source, **kwargs)

    monkeypatch.setattr(parse_cache_module, "parse_adapter", counting)
    return calls


def _same(ours, reference) -> None:
    """Every field equal; every factor the very tensor of the reference's state dict."""
    for field in dataclasses.fields(reference):
        if field.name != "modules":
            assert getattr(ours, field.name) == getattr(reference, field.name), field.name
    assert list(ours.modules) == list(reference.modules)
    for name, module in reference.modules.items():
        mine = ours.modules[name]
        assert type(mine) is LoraModule and mine == module
        for field in dataclasses.fields(module):
            value, expected = getattr(mine, field.name), getattr(module, field.name)
            if isinstance(expected, torch.Tensor):
                assert value is expected, (name, field.name)
            else:
                assert value == expected, (name, field.name)


def test_a_known_structure_is_rebuilt_from_its_recipe(adapters: list[Path], parses: list) -> None:
    cache = ParseCache()
    first_config, first_state = read_adapter_dir(adapters[0])
    config, state = read_adapter_dir(adapters[1])
    first = cache.parse(first_config, first_state, "first")
    second = cache.parse(config, state, "second")
    assert parses == ["first"]  # the second adapter was not parsed key by key
    cache.clear()
    cache.parse(config, state, "after clear")
    assert parses == ["first", "after clear"]
    _same(first, parse_adapter(first_config, first_state, "first"))
    _same(second, parse_adapter(config, state, "second"))
    assert not torch.equal(second.modules[next(iter(second.modules))].lora_A,
                           first.modules[next(iter(first.modules))].lora_A)


def test_recipe_modules_are_what_the_dataclass_builds() -> None:
    """A recipe fills a module's ``__dict__`` instead of calling the frozen dataclass's
    ``__init__``: that is only the same while ``LoraModule`` has no ``__post_init__``."""
    assert not hasattr(LoraModule, "__post_init__")
    a, b = torch.randn(2, 8), torch.randn(4, 2)
    fields = {"rank": 2, "alpha": 4.0, "scaling": 2.0, "kind": "linear", "kernel": (), "groups": 1,
              "magnitude": None, "bias": None, "ia3": None, "ia3_feedforward": False}
    built = parse_cache_module._module(fields, a, b)
    expected = LoraModule(lora_A=a, lora_B=b, **fields)
    assert built == expected and repr(built) == repr(expected) and hash(built) == hash(expected)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.rank = 3


def test_recipes_hand_out_their_own_dicts(adapters: list[Path]) -> None:
    cache = ParseCache()
    config, state = read_adapter_dir(adapters[0])
    cache.parse(config, state, "a")
    built = cache.parse(config, state, "a")
    built.rank_pattern["mutated"] = 99  # a caller's change stays in its own adapter
    assert "mutated" not in cache.parse(config, state, "a").rank_pattern


@pytest.mark.parametrize("how", ["nan", "inf"])
def test_nonfinite_values_are_refused_as_parse_adapter_refuses_them(adapters: list[Path], how: str) -> None:
    cache = ParseCache()
    config, state = read_adapter_dir(adapters[0])
    cache.parse(config, state, "first")
    bad = {key: tensor.clone() for key, tensor in state.items()}
    key = list(bad)[3]
    bad[key][0, 0] = float("nan") if how == "nan" else float("inf")
    with pytest.raises(AdapterFormatError) as expected:
        parse_adapter(config, bad, "bad")
    with pytest.raises(AdapterFormatError) as raised:
        cache.parse(config, bad, "bad")
    assert str(raised.value) == str(expected.value) and key in str(raised.value)
    assert cache.parse(config, bad, "bad", allow_nonfinite=True).modules  # then accepted
    assert cache.parse(config, bad, "bad", check_finite=False).modules  # the caller checks later


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_finds_every_nan_and_inf_and_only_them(dtype: torch.dtype) -> None:
    """The finite check sums first: a NaN or +-Inf anywhere (both infinities together sum to
    NaN) is found; finite values whose sum overflows the dtype are still finite."""
    big = torch.finfo(dtype).max / 2
    assert all_finite(torch.full((4, 3), big, dtype=dtype))  # sums to Inf: a second pass
    assert all_finite(torch.randn(5, 7).to(dtype)) and all_finite(torch.empty(0, 3, dtype=dtype))
    for values in ([math.nan], [math.inf], [-math.inf], [math.inf, -math.inf], [big, big, math.nan]):
        tensor = torch.randn(6, 9).to(dtype)
        tensor.view(-1)[torch.tensor([5, 17, 40])[: len(values)]] = torch.tensor(values, dtype=dtype)
        assert not all_finite(tensor), values
        assert not all_finite(tensor.t()), values  # a strided view


def test_another_config_or_shape_is_parsed_again(adapters: list[Path], parses: list) -> None:
    cache = ParseCache()
    config, state = read_adapter_dir(adapters[0])
    cache.parse(config, state, "a")
    other_alpha = cache.parse({**config, "lora_alpha": 16}, state, "alpha")
    assert parses == ["a", "alpha"]
    assert all(module.scaling == 4.0 for module in other_alpha.modules.values())
    with pytest.raises(AdapterFormatError, match="rank"):  # a rank the config does not declare
        cache.parse(config, {key: tensor[:2] if "lora_A" in key else tensor[:, :2]
                             for key, tensor in state.items()}, "shape")
    assert parses == ["a", "alpha", "shape"]


def test_adapters_not_held_as_read_never_get_a_recipe(base: BaseModel, tmp_path: Path, parses: list) -> None:
    dora = base.make_adapter(tmp_path / "dora", 3, r=4, target_modules=TARGETS, use_dora=True)
    saved = base.make_adapter(tmp_path / "saved", 4, r=4, target_modules=TARGETS,
                              modules_to_save=["lm_head"])
    cache = ParseCache()
    for directory in (dora, saved):
        config, state = read_adapter_dir(directory)
        for _ in range(2):
            _same(cache.parse(config, state, str(directory)), parse_adapter(config, state, str(directory)))
    assert parses == [str(dora), str(dora), str(saved), str(saved)]


def test_a_config_that_is_not_plain_json_is_parsed_every_time(adapters: list[Path], parses: list) -> None:
    config, state = read_adapter_dir(adapters[0])
    config = {**config, "lora_alpha": 8.0, "layers_pattern": None, "exotic": {1, 2}}  # a set
    with pytest.raises(TypeError):
        json.dumps(config)
    cache = ParseCache()
    for _ in range(2):
        cache.parse(config, state, "a")
    assert parses == ["a", "a"]


def test_a_runtime_serves_each_same_structure_adapter_its_own_values(
        base: BaseModel, adapters: list[Path], input_ids: torch.Tensor, parses: list) -> None:
    rt = HotswapRuntime(base.clone(), RuntimeConfig(TARGETS, max_rank=8, device_slots=2))
    for i, directory in enumerate(adapters):
        rt.load(f"a{i}", directory)
    assert len(parses) == 1  # the second adapter came from the recipe
    reference = base.peft_reference({f"a{i}": directory for i, directory in enumerate(adapters)})
    for name in ("a0", "a1"):
        rt.activate(name)
        reference.set_adapter(name)
        assert max_diff(logits(rt.model, input_ids), logits(reference, input_ids)) < 1e-5
