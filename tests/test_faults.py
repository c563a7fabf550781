"""Faults: an exception in the middle of staging or of a slot copy, files that vanish or change
under a prefetch, non-finite weights on request, and names that look like paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hotswap_rt import AdapterFormatError, HotswapError, HotswapRuntime, RuntimeConfig

from .conftest import ATTENTION_TARGETS, BaseModel, assert_unchanged, logits, snapshot_state

IDS = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(9))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = BaseModel("llama", seed=41)
    root = tmp_path_factory.mktemp("faults")
    good = base.make_adapter(root / "good", seed=1, r=4, lora_alpha=8)
    other = base.make_adapter(root / "other", seed=2, r=8, lora_alpha=8)
    return base, good, other


def _runtime(base: BaseModel, good: Path) -> HotswapRuntime:
    rt = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=8,
                                                    device_slots=2, host_slots=4))
    rt.load("good", good)
    rt.activate("good")
    return rt


def test_exception_in_the_middle_of_staging(env, monkeypatch) -> None:
    base, good, other = env
    rt = _runtime(base, good)
    before = snapshot_state(rt, IDS)
    calls = {"n": 0}
    real_cat = torch.cat

    def cat_that_fails(*args, **kwargs):  # the host row's rank blocks are written by one cat
        calls["n"] += 1
        raise RuntimeError("injected fault while staging")

    monkeypatch.setattr(torch, "cat", cat_that_fails)
    with pytest.raises(RuntimeError, match="injected fault"):
        rt.load("other", other)
    monkeypatch.undo()
    assert calls["n"] == 1 and torch.cat is real_cat
    assert_unchanged(before, snapshot_state(rt, IDS))
    rt.load("other", other)  # the next good load works
    rt.activate("other")
    assert not torch.equal(logits(rt.model, IDS), before["logits"])


def test_exception_in_the_middle_of_a_slot_copy_on_replace(env, monkeypatch) -> None:
    base, good, other = env
    rt = _runtime(base, good)
    rt.load("spare", other)  # both slots taken: replacing "good" must write its own slot
    before = logits(rt.model, IDS)
    real_write = rt.internals.arena.write_slot
    calls = {"n": 0}

    def write_that_fails_once(slot, staged, ordered=True):
        calls["n"] += 1
        if calls["n"] == 1:
            rt.internals.arena.arenas[torch.float32][slot].fill_(7.0)  # half-written garbage
            raise RuntimeError("injected fault while copying")
        return real_write(slot, staged, ordered)

    monkeypatch.setattr(rt.internals.arena, "write_slot", write_that_fails_once)
    rt.pin("spare")  # no shadow slot: the copy goes over the served slot
    with pytest.raises(RuntimeError, match="injected fault"):
        rt.load("good", other, replace=True)
    assert torch.equal(logits(rt.model, IDS), before)  # restored from the host row
    assert {i.name: i.version for i in rt.adapters()}["good"] == 1  # still the old version
    rt.load("good", other, replace=True)
    assert {i.name: i.version for i in rt.adapters()}["good"] == 2


def test_file_changing_under_a_prefetch_fails_cleanly(env, tmp_path, monkeypatch) -> None:
    from hotswap_rt import peft_format

    base, good, _ = env
    rt = _runtime(base, good)
    copy = tmp_path / "changing"
    shutil.copytree(good, copy)
    real = peft_format.read_safetensors

    def read_after_rewrite(path, empty=None, mapped=False):
        Path(path).write_bytes(b"\x00" * 64)  # rewritten by someone else mid-load
        return real(path, empty, mapped)

    monkeypatch.setattr(peft_format, "read_safetensors", read_after_rewrite)
    before = snapshot_state(rt, IDS)
    with pytest.raises(AdapterFormatError, match="not a valid safetensors"):
        rt.prefetch("changing", copy).result(timeout=30)
    assert_unchanged(before, snapshot_state(rt, IDS))


def test_nonfinite_weights_load_only_when_allowed(env, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    base, good, _ = env
    rt = _runtime(base, good)
    bad = tmp_path / "nan"
    shutil.copytree(good, bad)
    state = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in state if "lora_A" in k)
    state[key][0, 0] = float("nan")
    save_file(state, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterFormatError, match="allow_nonfinite=True"):
        rt.load("nan", bad)
    info = rt.load("nan", bad, allow_nonfinite=True)
    assert info.name == "nan"


def test_names_that_look_like_paths_never_escape_the_save_directory(env, tmp_path) -> None:
    base, good, _ = env
    rt = _runtime(base, good)
    rt.load("../../escape", good)
    out = tmp_path / "out" / "saved"
    written = Path(rt.save("../../escape", out))
    assert written == out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["saved"]
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()
    with pytest.raises(HotswapError, match="non-empty strings"):
        rt.load("", good)
