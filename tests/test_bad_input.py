"""Bad input raises a HotswapError subclass naming the problem, and changes nothing.

Each case runs against one runtime holding a good adapter "good" (active, device slot) and "other"
(loaded), and compares slots, selection tensors, registry state and logits before and after.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save_file

from hotswap_rt import (
    AdapterFormatError,
    HotswapError,
    HotswapRuntime,
    IncompatibleAdapterError,
    RankTooLargeError,
    RuntimeConfig,
    SelectionError,
    UnknownAdapterError,
)

from .conftest import BaseModel, assert_unchanged, logits, snapshot_state

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
HIDDEN = 64


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = BaseModel("llama", seed=5)
    root = tmp_path_factory.mktemp("bad")
    good = base.make_adapter(root / "good", seed=1, r=4, lora_alpha=8)
    other = base.make_adapter(root / "other", seed=2, r=8, lora_alpha=8)
    rt = HotswapRuntime(base.clone(), RuntimeConfig(TARGETS, max_rank=16, device_slots=2, host_slots=4))
    rt.load("good", good)
    rt.load("other", other)
    rt.activate("good")
    return base, root, rt


def _write_dir(path: Path, config: dict | str | None, state: dict | bytes | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (path / "adapter_config.json").write_text(text)
    if isinstance(state, dict):
        save_file(state, str(path / "adapter_model.safetensors"))
    elif isinstance(state, bytes):
        (path / "adapter_model.safetensors").write_bytes(state)
    return path


def _lora_state(rank: int = 4, d_in: int = HIDDEN, d_out: int = HIDDEN, module: str = "q_proj",
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    prefix = f"base_model.model.model.layers.0.self_attn.{module}"
    return {
        f"{prefix}.lora_A.weight": torch.randn(rank, d_in).to(dtype),
        f"{prefix}.lora_B.weight": torch.randn(d_out, rank).to(dtype),
    }


GOOD_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}

# name -> (builder(base, root) -> load kwargs, expected error type, message fragment)
Case = tuple[Callable[[BaseModel, Path], dict[str, Any]], type, str]
CASES: dict[str, Case] = {
    "rank above max_rank": (
        lambda b, r: {"source": b.make_adapter(r / "rank32", seed=3, r=32, lora_alpha=8)},
        RankTooLargeError, "rank 32 > max_rank=16",
    ),
    "target not injected": (
        lambda b, r: {"source": b.make_adapter(r / "mlp", seed=3, r=4, target_modules=["gate_proj"])},
        IncompatibleAdapterError, "gate_proj' is not an injected layer",
    ),
    "shape mismatch": (
        lambda b, r: {"source": _write_dir(r / "shape", GOOD_CONFIG, _lora_state(d_in=32))},
        IncompatibleAdapterError, "do not fit the layer",
    ),
    "A/B rank mismatch": (
        lambda b, r: {"source": _write_dir(r / "abrank", GOOD_CONFIG, {
            **_lora_state(rank=4),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(HIDDEN, 3),
        })},
        AdapterFormatError, "rank 3",
    ),
    "missing safetensors": (
        lambda b, r: {"source": _write_dir(r / "noweights", GOOD_CONFIG, None)},
        AdapterFormatError, "adapter_model.safetensors: missing",
    ),
    "random-byte safetensors": (
        lambda b, r: {"source": _write_dir(r / "garbage", GOOD_CONFIG, bytes(range(256)) * 8)},
        AdapterFormatError, "not a valid safetensors file",
    ),
    "truncated safetensors": (
        lambda b, r: {"source": _truncated(b, r)},
        AdapterFormatError, "not a valid safetensors file",
    ),
    "missing config": (
        lambda b, r: {"source": _write_dir(r / "noconfig", None, _lora_state())},
        AdapterFormatError, "adapter_config.json: missing",
    ),
    "config not JSON": (
        lambda b, r: {"source": _write_dir(r / "notjson", "{r: 4,", _lora_state())},
        AdapterFormatError, "not valid JSON",
    ),
    "config without r": (
        lambda b, r: {"source": _write_dir(r / "nor", {"lora_alpha": 8}, _lora_state())},
        AdapterFormatError, "no 'r'",
    ),
    "r zero": (
        lambda b, r: {"source": _write_dir(r / "r0", {**GOOD_CONFIG, "r": 0}, _lora_state())},
        AdapterFormatError, "'r' must be a positive integer",
    ),
    "negative alpha": (
        lambda b, r: {"source": _write_dir(r / "neg", {**GOOD_CONFIG, "lora_alpha": -2}, _lora_state())},
        AdapterFormatError, "'lora_alpha' must be a positive number",
    ),
    "NaN alpha": (
        lambda b, r: {"source": _write_dir(r / "nan", {**GOOD_CONFIG, "lora_alpha": math.nan}, _lora_state())},
        AdapterFormatError, "lora_alpha",
    ),
    "unknown peft_type": (
        lambda b, r: {"source": _write_dir(r / "loha", {**GOOD_CONFIG, "peft_type": "LOHA"}, _lora_state())},
        AdapterFormatError, "peft_type 'LOHA'",
    ),
    "IA3 config on LoRA keys": (
        lambda b, r: {"source": _write_dir(r / "ia3", {**GOOD_CONFIG, "peft_type": "IA3"}, _lora_state())},
        AdapterFormatError, "holds only '<module>.ia3_l'",
    ),
    "IA3 vector not a column": (
        lambda b, r: {"source": _write_dir(r / "ia3shape", {"peft_type": "IA3", "target_modules": ["q_proj"]}, {
            "base_model.model.model.layers.0.self_attn.q_proj.ia3_l": torch.ones(1, HIDDEN)})},
        AdapterFormatError, "is [d_out, 1]",
    ),
    "IA3 vector of the wrong length": (
        lambda b, r: {"source": _write_dir(r / "ia3len", {"peft_type": "IA3", "target_modules": ["q_proj"]}, {
            "base_model.model.model.layers.0.self_attn.q_proj.ia3_l": torch.ones(HIDDEN - 1, 1)})},
        IncompatibleAdapterError, "its ia3_l has 63 values",
    ),
    "NaN weights": (
        lambda b, r: {"source": _write_dir(r / "nanw", GOOD_CONFIG, {
            k: v.fill_(math.nan) for k, v in _lora_state().items()})},
        AdapterFormatError, "NaN or Inf",
    ),
    "integer weights": (
        lambda b, r: {"source": _write_dir(r / "intw", GOOD_CONFIG, _lora_state(dtype=torch.int32))},
        AdapterFormatError, "must be floating point",
    ),
    "DoRA without magnitudes": (
        lambda b, r: {"source": _write_dir(r / "dora", {**GOOD_CONFIG, "use_dora": True}, _lora_state())},
        AdapterFormatError, "has no lora_magnitude_vector",
    ),
    "DoRA magnitude of the wrong length": (
        lambda b, r: {"source": _write_dir(r / "doralen", {**GOOD_CONFIG, "use_dora": True}, {
            **_lora_state(),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(HIDDEN + 1)})},
        AdapterFormatError, "its magnitude vector has shape (65,); lora_B's 64 output features make it (64,)",
    ),
    "DoRA with lora_bias": (
        lambda b, r: {"source": _write_dir(r / "dorabias", {**GOOD_CONFIG, "use_dora": True, "lora_bias": True},
                                           _lora_state())},
        AdapterFormatError, "DoRA together with lora_bias",
    ),
    "modules_to_save": (
        lambda b, r: {"source": b.make_adapter(r / "mts", seed=3, r=4, modules_to_save=["lm_head"])},
        IncompatibleAdapterError, "name it in RuntimeConfig.modules_to_save",
    ),
    "lora bias keys without the flag": (
        lambda b, r: {"source": _write_dir(r / "lbias", GOOD_CONFIG, {
            **_lora_state(),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.ones(HIDDEN)})},
        AdapterFormatError, "does not set lora_bias=true",
    ),
    "embedding target not injected": (
        lambda b, r: {"source": b.make_adapter(r / "emb", seed=3, r=4, target_modules=["embed_tokens"])},
        IncompatibleAdapterError, "embed_tokens' is not an injected layer",
    ),
    "not a directory or hub id": (
        lambda b, r: {"source": str(r / "does" / "not" / "exist")},
        AdapterFormatError, "neither a directory nor a Hub id",
    ),
    "state_dict without config": (
        lambda b, r: {"state_dict": _lora_state()},
        HotswapError, "needs config=",
    ),
    "config= not a dict": (  # was a TypeError / ValueError from dict()
        lambda b, r: {"state_dict": _lora_state(), "config": "r=4"},
        AdapterFormatError, "config= must be an adapter config",
    ),
    "config= with a non-string field": (
        lambda b, r: {"state_dict": _lora_state(), "config": {**GOOD_CONFIG, 4: "r"}},
        AdapterFormatError, "config= must be an adapter config",
    ),
    "meta tensors in state_dict": (  # was a NotImplementedError from the copy into the row
        lambda b, r: {"state_dict": {key: value.to("meta") for key, value in _lora_state().items()},
                      "config": GOOD_CONFIG},
        AdapterFormatError, "is a meta tensor (no values)",
    ),
    "sparse tensor in state_dict": (
        lambda b, r: {"state_dict": {key: value.to_sparse() if "lora_B" in key else value
                                     for key, value in _lora_state().items()}, "config": GOOD_CONFIG},
        AdapterFormatError, "torch.sparse_coo tensor",
    ),
    "empty safetensors": (
        lambda b, r: {"source": _write_dir(r / "empty", GOOD_CONFIG, b"")},
        AdapterFormatError, "not a valid safetensors file",
    ),
    "header lies about offsets": (
        lambda b, r: {"source": _write_dir(r / "lie", GOOD_CONFIG, _edited_header(
            lambda header: header[next(iter(header))].update(data_offsets=[0, 10**7])))},
        AdapterFormatError, "not a valid safetensors file",
    ),
    "header lies about shape": (
        lambda b, r: {"source": _write_dir(r / "lieshape", GOOD_CONFIG, _edited_header(
            lambda header: header[next(iter(header))].update(shape=[4, 65])))},
        AdapterFormatError, "not a valid safetensors file",
    ),
    "duplicate keys": (
        lambda b, r: {"source": _write_dir(r / "dup", GOOD_CONFIG, _edited_header(None, duplicate=True))},
        AdapterFormatError, "duplicate tensor name",
    ),
    "bool weights": (
        lambda b, r: {"source": _write_dir(r / "bool", GOOD_CONFIG, _lora_state(dtype=torch.bool))},
        AdapterFormatError, "must be floating point",
    ),
    "1-D weights": (
        lambda b, r: {"source": _write_dir(r / "oned", GOOD_CONFIG, {
            k: v.flatten() for k, v in _lora_state().items()})},
        AdapterFormatError, "expected a non-empty 2-D or 4-D tensor",
    ),
    "3-D weights": (
        lambda b, r: {"source": _write_dir(r / "threed", GOOD_CONFIG, {
            k: v.unsqueeze(0) for k, v in _lora_state().items()})},
        AdapterFormatError, "expected a non-empty 2-D or 4-D tensor",
    ),
    "Inf weights": (
        lambda b, r: {"source": _write_dir(r / "inf", GOOD_CONFIG, {
            k: v.fill_(math.inf) for k, v in _lora_state().items()})},
        AdapterFormatError, "NaN or Inf",
    ),
    "config r differs from weights": (
        lambda b, r: {"source": _write_dir(r / "rdiff", {**GOOD_CONFIG, "r": 8}, _lora_state())},
        AdapterFormatError, "declares r=8",
    ),
    "target_modules names no such layer": (
        lambda b, r: {"source": _write_dir(r / "tm", {**GOOD_CONFIG, "target_modules": ["nope"]},
                                           _lora_state())},
        AdapterFormatError, "names no such layer",
    ),
    "keys for a layer not injected": (
        lambda b, r: {"source": _write_dir(r / "notinj", {**GOOD_CONFIG, "target_modules": None},
                                           _lora_state(module="gate_proj"))},
        IncompatibleAdapterError, "not an injected layer",
    ),
}


def _edited_header(edit: Callable[[dict], None] | None, duplicate: bool = False) -> bytes:
    """A valid adapter file whose JSON header is edited (or has its first key duplicated)."""
    import io
    import struct

    from safetensors.torch import save

    raw = save(_lora_state())
    size = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8 : 8 + size]), raw[8 + size :]
    if edit is not None:
        edit(header)
    text = json.dumps(header)
    if duplicate:
        first = next(iter(header))
        text = text[:-1] + f", {json.dumps(first)}: {json.dumps(header[first])}}}"
    encoded = text.encode()
    buffer = io.BytesIO()
    buffer.write(struct.pack("<Q", len(encoded)) + encoded + data)
    return buffer.getvalue()


def _truncated(base: BaseModel, root: Path) -> Path:
    path = root / "truncated"
    if not path.exists():
        shutil.copytree(base.make_adapter(root / "full", seed=4, r=4), path)
        weights = path / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_adapter_refused_and_nothing_changes(env, input_ids, case: str) -> None:
    base, root, rt = env
    build, error, fragment = CASES[case]
    kwargs = build(base, root)
    before = snapshot_state(rt, input_ids)
    with pytest.raises(error) as info:
        rt.load("bad", **kwargs)
    assert fragment in str(info.value)
    assert "bad" not in rt.internals.registry.records
    assert_unchanged(before, snapshot_state(rt, input_ids))
    if "source" in kwargs:  # rt.check refuses the same source with the same message
        with pytest.raises(error, match=None) as checked:
            rt.check(kwargs["source"], **{k: v for k, v in kwargs.items() if k != "source"})
        assert fragment in str(checked.value)
        assert_unchanged(before, snapshot_state(rt, input_ids))


def test_check_describes_a_good_adapter_and_changes_nothing(env, input_ids) -> None:
    _, root, rt = env
    before = snapshot_state(rt, input_ids)
    info = rt.check(root / "other")
    assert (info.name, info.rank, info.tier) == ("other", 8, "disk")
    assert_unchanged(before, snapshot_state(rt, input_ids))


@pytest.mark.parametrize(
    "operation, error, fragment",
    [
        (lambda rt: rt.activate("nope"), UnknownAdapterError, "no adapter named 'nope'"),
        (lambda rt: rt.activate({"good": 1.0, "nope": 1.0}), UnknownAdapterError, "'nope'"),
        (lambda rt: rt.activate_rows(["good", "nope"]), UnknownAdapterError, "'nope'"),
        (lambda rt: rt.activate({"good": math.inf}), SelectionError, "finite"),
        (lambda rt: rt.activate(3), SelectionError, "an activation is"),
        (lambda rt: rt.activate_rows([]), SelectionError, "non-empty list"),
        (lambda rt: rt.activate_rows(["good"] * 65), SelectionError, "max_batch_size"),
        (lambda rt: rt.activate({"good": 1.0, "other": 1.0, "x": 1.0}), UnknownAdapterError, "'x'"),
        (lambda rt: rt.unload("nope"), UnknownAdapterError, "'nope'"),
        (lambda rt: rt.unload("good"), HotswapError, "is active"),
        (lambda rt: rt.save("nope", "/tmp/x"), UnknownAdapterError, "'nope'"),
        (lambda rt: rt.load("good", state_dict={}, config={}), HotswapError, "already loaded"),
        (lambda rt: rt.load("", state_dict={}, config={}), HotswapError, "non-empty strings"),
        (lambda rt: rt.load(7, state_dict={}, config={}), HotswapError, "non-empty strings"),
        (lambda rt: rt.pin(["good"]), UnknownAdapterError, "['good']"),  # was a TypeError (unhashable)
        (lambda rt: rt.lease(["good"]), UnknownAdapterError, "['good']"),
        (lambda rt: rt.info(["good"]), UnknownAdapterError, "['good']"),
        (lambda rt: rt.adapter_state_dict(["good"]), UnknownAdapterError, "['good']"),
        # wrong types: named errors (were TypeErrors / re.error, or a string flag read as True)
        (lambda rt: rt.load("new", 5), AdapterFormatError, "an adapter source is a directory"),
        (lambda rt: rt.load("new", b"/tmp"), AdapterFormatError, "an adapter source is a directory"),
        (lambda rt: rt.check(5), AdapterFormatError, "an adapter source is a directory"),
        (lambda rt: rt.load("new", state_dict=[1], config={"r": 2}), AdapterFormatError,
         "state_dict= must map PEFT keys to tensors"),
        (lambda rt: rt.load("new", state_dict={}, config={"r": 2}, trainable="no"), HotswapError,
         "load: trainable must be True or False, got 'no'"),
        (lambda rt: rt.prefetch("new", "x", replace="yes"), HotswapError, "prefetch: replace must be"),
        (lambda rt: rt.unload("good", force="yes"), HotswapError, "unload: force must be"),
        (lambda rt: rt.save("good", "/tmp/x", overwrite="no"), HotswapError, "save: overwrite must be"),
        (lambda rt: rt.add_adapter("new", 2, 4, targets=5), HotswapError, "add_adapter: targets must be"),
        (lambda rt: rt.add_adapter("new", 2, 4, targets="("), HotswapError, "is not a valid regex"),
        (lambda rt: rt.add_adapter("new", 2, 4, trainable="no"), HotswapError, "add_adapter: trainable"),
        # weights beyond float32 (the selection's dtype) were written as Inf: NaN logits
        (lambda rt: rt.activate({"good": 1e308}), SelectionError, "does not fit the float32"),
        (lambda rt: rt.activate({"good": 1.0, "other": -1e39}), SelectionError, "'other'"),
        (lambda rt: rt.activate_rows([{"good": 1e300}, None]), SelectionError, "does not fit the float32"),
        (lambda rt: rt.add_adapter("new", 2, 1e300), HotswapError, "alpha must be a positive finite"),
    ],
)
def test_bad_operation_refused_and_nothing_changes(env, input_ids, operation, error, fragment) -> None:
    _, _, rt = env
    before = snapshot_state(rt, input_ids)
    with pytest.raises(error) as info:
        operation(rt)
    assert fragment in str(info.value)
    assert_unchanged(before, snapshot_state(rt, input_ids))


def test_too_many_adapters_at_once(env, input_ids, tmp_path) -> None:
    base, _, _ = env
    rt = HotswapRuntime(base.clone(), RuntimeConfig(TARGETS, max_rank=16, device_slots=2))
    for i, name in enumerate("xyz"):
        rt.load(name, base.make_adapter(tmp_path / name, seed=20 + i, r=2))
    rt.activate("x")
    before = snapshot_state(rt, input_ids)
    with pytest.raises(SelectionError, match="max_active_adapters=2"):
        rt.activate_rows(["x", "y", "z", None])
    assert_unchanged(before, snapshot_state(rt, input_ids))


def test_batch_size_must_match_rows(env, input_ids) -> None:
    _, _, rt = env
    rt.activate_rows(["good", None])
    try:
        with pytest.raises(SelectionError, match="activate_rows set 2 rows but the batch has 4"):
            logits(rt.model, input_ids)
    finally:
        rt.activate("good")


def test_trainable_load_whose_scaling_overflows_float32_is_refused(env, input_ids) -> None:
    """A trainable adapter's scaling is its selection weight (float32): alpha = 1e300 would be
    written as Inf (an inference load folds it into B, where staging's check catches it)."""
    _, _, rt = env
    before = snapshot_state(rt, input_ids)
    config = {**GOOD_CONFIG, "lora_alpha": 1e300}
    with pytest.raises(IncompatibleAdapterError, match="does not fit a float32 selection weight"):
        rt.load("bad", state_dict=_lora_state(), config=config, trainable=True)
    assert "bad" not in rt.internals.registry.records
    assert_unchanged(before, snapshot_state(rt, input_ids))
