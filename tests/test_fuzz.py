"""Property: a randomly mutated adapter either loads and computes exactly what its files say,
or is refused with a HotswapError and changes nothing. Never another exception, never a crash.

Mutations: random byte edits anywhere in ``adapter_model.safetensors`` (header or data),
truncation, appended garbage, and random JSON values for the config's fields. The reference for
an adapter that loads is computed from the mutated files alone, independently of the runtime:
``base(x) + s * (x @ A.T) @ B.T`` per layer, with PEFT's scaling and pattern rules.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from hotswap_rt import HotswapError, HotswapRuntime, RuntimeConfig

from .conftest import BaseModel, assert_unchanged, snapshot_state

IDS = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(13))
CONFIG_KEYS = ["r", "lora_alpha", "use_rslora", "target_modules", "peft_type", "rank_pattern",
               "alpha_pattern", "bias", "use_dora"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8) | st.sampled_from(["q_proj", "v_proj", "LORA", "all-linear", ".*"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
mutation = st.one_of(
    st.tuples(st.just("bytes"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                         min_size=1, max_size=6)),
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("config"), st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values,
                                                 min_size=1, max_size=3)),
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = BaseModel("llama", seed=61)
    root = tmp_path_factory.mktemp("fuzz")
    good = base.make_adapter(root / "good", seed=1, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"])
    seed = base.make_adapter(root / "seed", seed=2, r=2, lora_alpha=4,
                             target_modules=["q_proj", "v_proj"])
    rt = HotswapRuntime(base.clone(), RuntimeConfig(["q_proj", "v_proj"], max_rank=8,
                                                    device_slots=2, host_slots=4))
    rt.load("good", good)
    rt.activate("good")
    return rt, seed


def _mutate(source: Path, target: Path, change: tuple) -> None:
    shutil.copytree(source, target)
    weights = target / "adapter_model.safetensors"
    kind, arg = change
    if kind == "bytes":
        data = bytearray(weights.read_bytes())
        for position, value in arg:
            data[position % len(data)] = value
        weights.write_bytes(bytes(data))
    elif kind == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: int(len(data) * arg)])
    elif kind == "append":
        weights.write_bytes(weights.read_bytes() + arg)
    else:
        config = json.loads((target / "adapter_config.json").read_text())
        config.update(arg)
        (target / "adapter_config.json").write_text(json.dumps(config))


def _pattern_value(pattern: dict, name: str, default: float) -> float:
    for key in pattern:  # PEFT's get_pattern_key: first key matching the end of the name
        if re.match(rf"(.*\.)?({key})$", name):
            return pattern[key]
    return default


def _check_against_files(rt: HotswapRuntime, directory: Path) -> None:
    """The loaded adapter computes, layer by layer, what its files say."""
    config = json.loads((directory / "adapter_config.json").read_text())
    state = load_file(str(directory / "adapter_model.safetensors"))
    rt.activate("fuzz")
    torch.manual_seed(0)
    for key, lora_A in state.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        lora_B = state[key.replace(".lora_A.", ".lora_B.")]
        rank = lora_A.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        layer = rt.internals.layers[name]
        x = torch.randn(2, 3, layer.in_features)
        with torch.no_grad():
            got = layer(x)
            expected = layer.base(x) + scaling * (x @ lora_A.float().T) @ lora_B.float().T
        if torch.isfinite(expected).all():
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(change=mutation)
def test_mutated_adapter_loads_correctly_or_changes_nothing(env, change) -> None:
    rt, seed = env
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "mutated"
        _mutate(seed, directory, change)
        before = snapshot_state(rt, IDS)
        try:
            rt.load("fuzz", directory)
        except HotswapError as exc:
            event(f"refused: {type(exc).__name__}")
            assert_unchanged(before, snapshot_state(rt, IDS))
            return
        event("loaded")
        try:
            _check_against_files(rt, directory)
        finally:
            rt.activate("good")
            rt.unload("fuzz")
        after = snapshot_state(rt, IDS)  # the freed slot keeps stale bytes; what is served is back
        assert torch.equal(after["logits"], before["logits"]) and after["rows"] == before["rows"]
