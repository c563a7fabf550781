"""Loading from the Hugging Face cache, saving in PEFT's format, and prefetching."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from hotswap_rt import AdapterFormatError, HotswapError, HotswapRuntime, RuntimeConfig
from hotswap_rt.errors import AdapterChangedError
from hotswap_rt.peft_format import adapter_files_stamp, parse_adapter, read_adapter_dir, with_tensors_copied

from .conftest import (ATTENTION_TARGETS, CAN_LEASE, CAN_SEE_MAPS, BaseModel, file_is_mapped, logits, max_diff,
                       start_writer)


@pytest.fixture(scope="module")
def llama_and_adapter(tmp_path_factory):
    base = BaseModel("llama", seed=11)
    path = base.make_adapter(tmp_path_factory.mktemp("src") / "a", seed=3, r=4, lora_alpha=16,
                             rank_pattern={"v_proj": 8})
    return base, path


def _fake_hub_cache(cache: Path, repo_id: str, adapter_dir: Path) -> None:
    """Lay out ``adapter_dir`` as huggingface_hub's cache does for a downloaded model repo."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(adapter_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_resolves_through_local_cache_offline(llama_and_adapter, tmp_path, monkeypatch,
                                                     input_ids) -> None:
    base, path = llama_and_adapter
    _fake_hub_cache(tmp_path / "hub", "someone/tiny-lora", path)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    rt = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=8))
    info = rt.load("hub", "someone/tiny-lora")
    assert info.source and "models--someone--tiny-lora" in info.source
    rt.load("dir", path)
    rt.activate("hub")
    from_hub = logits(rt.model, input_ids)
    rt.activate("dir")
    assert torch.equal(from_hub, logits(rt.model, input_ids))
    with pytest.raises(AdapterFormatError, match="could not be resolved as a Hugging Face Hub id"):
        rt.load("missing", "someone/not-in-cache")


def test_save_round_trips_through_peft(llama_and_adapter, tmp_path, input_ids) -> None:
    base, path = llama_and_adapter
    rt = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=16))
    rt.load("a", path)
    out = Path(rt.save("a", tmp_path / "saved"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {"v_proj": 8}  # true ranks, not max_rank
    reloaded = PeftModel.from_pretrained(base.clone(), str(out)).eval()
    original = PeftModel.from_pretrained(base.clone(), str(path)).eval()
    assert max_diff(logits(reloaded, input_ids), logits(original, input_ids)) == 0.0
    rt.activate("a")
    assert max_diff(logits(rt.model, input_ids), logits(original, input_ids)) <= 1e-4
    with pytest.raises(AdapterFormatError, match="exists and is not empty"):
        rt.save("a", out)
    rt.save("a", out, overwrite=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["saved"]  # no temp dir left


def test_overwrite_replaces_only_an_adapter_directory(llama_and_adapter, tmp_path) -> None:
    """``overwrite=True`` deletes the target directory: never one holding anything but an
    adapter's files (a mistyped path to a project or home directory)."""
    base, path = llama_and_adapter
    rt = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=16))
    rt.load("a", path)
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("keep me")
    (project / "adapter_config.json").write_text("{}")
    for target in (project, project / "notes.txt"):
        with pytest.raises(AdapterFormatError, match="more than an adapter's files"):
            rt.save("a", target, overwrite=True)
    assert (project / "notes.txt").read_text() == "keep me" and (project / "src").is_dir()
    assert sorted(p.name for p in project.iterdir()) == ["adapter_config.json", "notes.txt", "src"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no temp dir left
    saved = Path(rt.save("a", tmp_path / "saved"))
    (saved / "README.md").write_text("model card")
    rt.save("a", saved, overwrite=True)  # an adapter directory (PEFT writes a README too): replaced
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_prefetch_stages_on_host_then_activate_copies(llama_and_adapter, input_ids) -> None:
    base, path = llama_and_adapter
    rt = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=8))
    info = rt.prefetch("p", path).result(timeout=60)
    assert info.tier == "host" and rt.stats()["swaps"] == 0
    rt.activate("p")
    assert rt.adapters()[0].tier == "device" and rt.stats()["hits"]["host"] == 1
    rt.load("d", path)
    rt.activate("d")
    assert torch.equal(logits(rt.model, input_ids), logits(rt.model, input_ids))
    failed = rt.prefetch("bad", path.parent / "nope")
    with pytest.raises(AdapterFormatError):
        failed.result(timeout=60)
    assert "bad" not in {i.name for i in rt.adapters()}


def test_lru_eviction_across_tiers(llama_and_adapter, tmp_path, input_ids) -> None:
    from hotswap_rt import SlotsBusyError

    base, path = llama_and_adapter
    rt = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=8,
                                                    device_slots=2, host_slots=3))
    for name in "abc":
        rt.load(name, path)
    tiers = {i.name: i.tier for i in rt.adapters()}
    assert tiers == {"a": "device", "b": "device", "c": "host"}
    rt.activate("a")
    expected = logits(rt.model, input_ids)
    rt.activate("c")  # evicts b (least recently used, not selected)
    tiers = {i.name: i.tier for i in rt.adapters()}
    assert tiers == {"a": "device", "b": "host", "c": "device"} and rt.stats()["evictions"] == 1
    rt.load("d", path)  # the host ring is full: b (host-only, least recently used) drops to disk
    tiers = {i.name: i.tier for i in rt.adapters()}
    assert tiers == {"a": "device", "b": "disk", "c": "device", "d": "host"}
    assert rt.stats()["host_evictions"] == 1
    rt.activate("b")  # read again from its directory, validated, staged, copied
    stats = rt.stats()
    assert rt.adapters()[-1].tier == "device" and stats["hits"]["disk"] == 1
    assert stats["swap_latency_ms"]["disk"]["p50"] > 0
    assert torch.equal(logits(rt.model, input_ids), expected)  # same weights as "a"
    assert {i.name: i.tier for i in rt.adapters()}["d"] == "disk"  # made room for b
    # Adapters without a file cannot drop to disk: a ring full of them refuses a new load.
    rt2 = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=8,
                                                     device_slots=1, host_slots=2))
    state = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 64),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(64, 2)}
    rt2.load("s1", state_dict=state, config={"r": 2, "lora_alpha": 2})
    rt2.load("s2", state_dict=state, config={"r": 2, "lora_alpha": 2})
    with pytest.raises(SlotsBusyError, match="host_slots=2"):
        rt2.load("d", path)
    rt2.unload("s2")
    rt2.load("d", path)
    assert {i.name for i in rt2.adapters()} == {"s1", "d"}


def test_failed_slot_copy_keeps_serving_previous_adapter(llama_and_adapter, tmp_path, input_ids,
                                                        monkeypatch) -> None:
    base, path = llama_and_adapter
    other = base.make_adapter(tmp_path / "other", seed=9, r=4)
    rt = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=8,
                                                    device_slots=2, host_slots=3))
    rt.load("a", path)
    rt.activate("a")
    rt.load("b", other)
    rt.load("c", other)  # host only: both slots are taken
    serving = logits(rt.model, input_ids)

    def broken_copy(slot, staged, ordered=True):
        rt.internals.arena.arenas[torch.float32][slot].fill_(1e3)  # a half-done copy
        raise RuntimeError("device fault")

    monkeypatch.setattr(rt.internals.arena, "write_slot", broken_copy)
    with pytest.raises(RuntimeError, match="device fault"):
        rt.activate("c")  # evicts b's slot, copy fails
    assert torch.equal(logits(rt.model, input_ids), serving)
    assert rt.active == [{"a": 1.0}]
    assert {i.name: i.tier for i in rt.adapters()}["b"] == "host"  # its slot is no longer b
    monkeypatch.undo()
    rt.activate("b")  # copied again from the host
    reference = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=8))
    reference.load("b", other)
    reference.activate("b")
    assert torch.equal(logits(rt.model, input_ids), logits(reference.model, input_ids))


def test_failed_copy_over_the_served_slot_restores_it(llama_and_adapter, tmp_path, input_ids,
                                                      monkeypatch) -> None:
    base, path = llama_and_adapter
    other = base.make_adapter(tmp_path / "other", seed=9, r=4)
    rt = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=8,
                                                    device_slots=1, host_slots=2))
    rt.load("a", path)
    rt.load("b", other)
    rt.activate("a")
    serving = logits(rt.model, input_ids)
    real_write = rt.internals.arena.write_slot
    b_staged = rt.internals.registry.records["b"].staged

    def fails_for_b(slot, rows, ordered=True):
        if rows is b_staged.rows:
            rt.internals.arena.arenas[torch.float32][slot].fill_(1e3)  # a half-done copy
            raise RuntimeError("device fault")
        return real_write(slot, rows, ordered)

    monkeypatch.setattr(rt.internals.arena, "write_slot", fails_for_b)
    with pytest.raises(RuntimeError, match="device fault"):
        rt.activate("b")  # the only slot is a's: copy fails, a is copied back
    assert torch.equal(logits(rt.model, input_ids), serving)
    assert rt.active == [{"a": 1.0}]


def _factors_from_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_the_ring_keeps_rows_only_and_save_reads_the_files_again(llama_and_adapter, tmp_path) -> None:
    """Default: a directory-loaded adapter's host entry is its staged rows (AdapterInfo.bytes),
    not also its factors as read; save / adapter_state_dict read its files again, and refuse
    once the files changed (they would no longer be what is served)."""
    from hotswap_rt import AdapterChangedError

    base, path = llama_and_adapter
    source = tmp_path / "source"
    shutil.copytree(path, source)
    rt = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=16))
    rt.load("a", source)
    staged = rt.internals.registry.records["a"].staged
    assert staged.adapter is None and staged.nbytes == rt.info("a").bytes
    expected = _factors_from_file(source)
    state = rt.adapter_state_dict("a")
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in expected)
    rt.save("a", tmp_path / "saved")
    saved = _factors_from_file(tmp_path / "saved")
    assert all(torch.equal(saved[key], expected[key]) for key in expected)
    rewritten = {key: value * 2 for key, value in expected.items()}
    from safetensors.torch import save_file

    save_file(rewritten, str(source / "adapter_model.safetensors"))
    with pytest.raises(AdapterChangedError, match="adapter_model.safetensors"):
        rt.save("a", tmp_path / "saved_after_change")
    assert not (tmp_path / "saved_after_change").exists()
    with pytest.raises(AdapterChangedError):
        rt.adapter_state_dict("a")


def test_keep_factors_saves_without_the_files(llama_and_adapter, tmp_path, input_ids) -> None:
    base, path = llama_and_adapter
    source = tmp_path / "source"
    shutil.copytree(path, source)
    expected = _factors_from_file(source)
    rt = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=16, keep_factors=True))
    rt.load("a", source)
    assert rt.internals.registry.records["a"].staged.adapter is not None
    shutil.rmtree(source)
    state = rt.adapter_state_dict("a")
    assert all(torch.equal(state[key], expected[key]) for key in expected)
    saved = _factors_from_file(Path(rt.save("a", tmp_path / "saved")))
    assert all(torch.equal(saved[key], expected[key]) for key in expected)
    with pytest.raises(HotswapError, match="keep_factors must be True or False"):
        RuntimeConfig(ATTENTION_TARGETS["llama"], keep_factors="yes")


@pytest.mark.skipif(not CAN_SEE_MAPS, reason="reads /proc/self/maps (Linux)")
def test_loads_stage_from_a_mapped_file_only_when_its_factors_are_dropped(llama_and_adapter, tmp_path,
                                                                        mapped_reads) -> None:
    """RuntimeConfig.map_adapter_files: load, prefetch and a disk-tier adapter read again stage
    from a memory map of the file, unmapped once staged, with the same rows as a file read into
    memory; nothing is mapped when the factors are kept (keep_factors, trainable) or with
    ``map_adapter_files=False``; save reads into memory (its factors go to the caller)."""
    import gc

    base, path = llama_and_adapter
    weights = path / "adapter_model.safetensors"
    maps = mapped_reads

    def runtime(**options) -> HotswapRuntime:
        return HotswapRuntime(base.clone(), RuntimeConfig(
            ATTENTION_TARGETS["llama"], max_rank=16, device_slots=1, host_slots=2, **options))

    mapping, reading = runtime(), runtime(map_adapter_files=False)
    mapping.load("a", path)
    gc.collect()
    assert maps == [weights] and not file_is_mapped(weights)
    assert mapping.internals.registry.records["a"].staged.adapter is None
    reading.load("a", path)
    assert len(maps) == 1
    rows = mapping.internals.registry.records["a"].staged.rows
    assert rows.keys() == reading.internals.registry.records["a"].staged.rows.keys()
    assert all(torch.equal(row, reading.internals.registry.records["a"].staged.rows[dtype])
               for dtype, row in rows.items())

    mapping.prefetch("b", path).result(timeout=60)
    mapping.load("c", path)  # the host ring is full: "b" drops to the disk tier
    assert len(maps) == 3 and mapping.info("b").tier == "disk"
    mapping.activate("b")  # read again, mapped
    assert len(maps) == 4 and mapping.info("b").tier == "device"
    gc.collect()
    assert not file_is_mapped(weights)
    saved = _factors_from_file(Path(mapping.save("a", tmp_path / "saved")))
    assert len(maps) == 4  # save read the file into memory
    assert all(torch.equal(saved[key], value) for key, value in _factors_from_file(path).items())

    runtime(keep_factors=True).load("a", path)
    uniform = base.make_adapter(tmp_path / "uniform", seed=5, r=4, lora_alpha=8)  # trainable: one scaling
    runtime().load("t", uniform, trainable=True)
    assert len(maps) == 4
    with pytest.raises(HotswapError, match="map_adapter_files must be True or False"):
        RuntimeConfig(ATTENTION_TARGETS["llama"], map_adapter_files=1)


def _rewriting_after(step, path: Path):
    """``step`` that, once done, writes ``path``'s first byte back over itself: the same bytes,
    a new change time (what any in-place rewrite leaves, whatever it writes)."""

    def rewriting(*args, **kwargs):
        result = step(*args, **kwargs)
        with open(path, "r+b") as file:
            first = file.read(1)
            file.seek(0)
            file.write(first)
        return result

    return rewriting


def _map_without_a_lease(monkeypatch) -> None:
    """Map files as if no lease kept writers out (where the kernel revoked one after its
    lease-break-time): a rewrite in place during a mapped load is then possible, from this
    thread too (under a lease this thread's open for writing would wait for the load)."""
    from hotswap_rt import file_lease

    monkeypatch.setattr(file_lease, "take_read_lease", lambda fd: True)


@pytest.mark.parametrize("maps", [True, False], ids=["mapped", "read into memory"])
def test_files_rewritten_in_place_while_read_are_refused(llama_and_adapter, tmp_path, monkeypatch,
                                                         maps) -> None:
    """Stamped before the read and checked once nothing more is read from them (after staging
    when mapped, after the read otherwise): a rewrite in between (which could leave old and new
    bytes mixed in the adapter) refuses the load and the prefetch, changing nothing; the same
    files load once left alone. (Mapped: with the lease left out, which keeps other writers
    out, see the next test.)"""
    base, source = llama_and_adapter
    path = tmp_path / "a"
    shutil.copytree(source, path)
    if maps:
        _map_without_a_lease(monkeypatch)
    rt = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=16, device_slots=1,
                                                    host_slots=2, map_adapter_files=maps))
    stager = rt.internals.stager
    rt.load("old", source)
    before = (rt.adapters(), rt.active, rt.stats()["swaps"])
    hooked = "stage" if maps else "read"  # the last step that reads the files
    real = getattr(stager, hooked)
    monkeypatch.setattr(stager, hooked, _rewriting_after(real, path / "adapter_model.safetensors"))
    with pytest.raises(AdapterChangedError, match=r"adapter_model.safetensors.*while the adapter was read"):
        rt.load("a", path)
    with pytest.raises(AdapterChangedError, match="while the adapter was read"):
        rt.prefetch("b", path).result(timeout=60)
    with pytest.raises(AdapterChangedError):
        rt.load("old", path, replace=True)
    assert (rt.adapters(), rt.active, rt.stats()["swaps"]) == before
    monkeypatch.setattr(stager, hooked, real)
    rt.load("a", path)  # a copy of "old"'s files
    records = rt.internals.registry.records
    rows, expected = records["a"].staged.rows, records["old"].staged.rows
    assert rows.keys() == expected.keys() and all(torch.equal(rows[d], expected[d]) for d in rows)
    assert records["a"].origin.stamp == adapter_files_stamp(path)


@pytest.mark.skipif(not CAN_LEASE, reason="no read leases here (not Linux, or the temp dir's file system)")
def test_a_writer_waits_for_a_mapped_load_to_be_staged(llama_and_adapter, tmp_path, monkeypatch) -> None:
    """A trainer saving into the directory (``open(path, "wb")`` truncates the file, as PEFT's
    ``save_pretrained`` does) while a mapped load stages it: the lease keeps the writer out
    until the load has staged and dropped its map (a truncated page read would be ``SIGBUS``,
    the end of the process), so the load stages the old file whole, and then the writer
    writes."""
    base, source = llama_and_adapter
    path = tmp_path / "a"
    shutil.copytree(source, path)
    weights = path / "adapter_model.safetensors"
    rt = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=16, device_slots=1,
                                                    host_slots=2))
    stager = rt.internals.stager
    real, writers = stager.stage, []

    def stage_while_a_writer_waits(*args, **kwargs):
        writers.append(start_writer(weights, b"not a safetensors file"))
        assert writers[0].poll() is None  # kept out (without the lease: truncated by now)
        return real(*args, **kwargs)

    monkeypatch.setattr(stager, "stage", stage_while_a_writer_waits)
    rt.load("a", path)
    assert writers[0].wait(timeout=30) == 0 and weights.read_bytes() == b"not a safetensors file"
    monkeypatch.setattr(stager, "stage", real)
    rt.load("reference", source)
    records = rt.internals.registry.records
    rows, expected = records["a"].staged.rows, records["reference"].staged.rows
    assert rows.keys() == expected.keys() and all(torch.equal(rows[d], expected[d]) for d in rows)


@pytest.mark.skipif(not CAN_LEASE or not CAN_SEE_MAPS, reason="no read leases here, or no /proc/self/maps")
def test_a_failed_mapped_load_kept_as_an_exception_holds_no_map(llama_and_adapter, tmp_path) -> None:
    """A mapped load that fails after mapping its file (a NaN found while staging, a corrupt
    header, a rank over max_rank; also ``check`` and ``prefetch``), its exception kept (as
    pytest, a notebook's last traceback or a log keeps one): the file is not mapped and not
    leased, so this process, or a trainer, can rewrite it at once (not after the kernel's
    45 s lease-break time)."""
    from safetensors.torch import load_file, save_file

    base, source = llama_and_adapter
    nan, header, wide = (tmp_path / name for name in ("nan", "header", "wide"))
    for path in (nan, header):
        shutil.copytree(source, path)
    state = {key: value.clone() for key, value in load_file(str(nan / "adapter_model.safetensors")).items()}
    state[next(key for key in state if "lora_A" in key)][0, 0] = float("nan")
    save_file(state, str(nan / "adapter_model.safetensors"))
    weights = header / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:8] + b"[" + weights.read_bytes()[9:])  # not a JSON object
    base.make_adapter(wide, seed=3, r=32)
    rt = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=16, device_slots=1,
                                                    host_slots=2))
    attempts = [(nan, lambda p: rt.load("a", p)), (header, lambda p: rt.load("a", p)),
                (wide, lambda p: rt.load("a", p)), (nan, rt.check),
                (nan, lambda p: rt.prefetch("b", p).result(timeout=60))]
    kept = []
    for path, attempt in attempts:
        with pytest.raises(HotswapError) as failure:
            attempt(path)
        kept.append(failure)
        assert not file_is_mapped(path / "adapter_model.safetensors"), (path.name, failure.value)
        os.close(os.open(path / "adapter_model.safetensors", os.O_WRONLY | os.O_NONBLOCK))  # no lease
    assert [type(f.value).__name__ for f in kept] == ["AdapterFormatError", "AdapterFormatError",
                                                      "RankTooLargeError", "AdapterFormatError",
                                                      "AdapterFormatError"]


@pytest.mark.parametrize("maps", [True, False], ids=["mapped", "read into memory"])
def test_a_load_that_injects_layers_is_checked_before_it_injects_them(llama_and_adapter, tmp_path,
                                                                      monkeypatch, maps) -> None:
    """A lazy runtime injects layers for an adapter before staging it: a mapped one is copied
    out of its map first, so that the rewrite check comes before any injection (a rewrite
    during staging no longer matters); refused, nothing is injected; then it loads."""
    base, source = llama_and_adapter
    path = tmp_path / "a"
    shutil.copytree(source, path)
    if maps:
        _map_without_a_lease(monkeypatch)
    rt = HotswapRuntime(base.clone(), RuntimeConfig(None, max_rank=16, device_slots=2, host_slots=4,
                                                    map_adapter_files=maps))
    stager = rt.internals.stager
    real = stager.read
    monkeypatch.setattr(stager, "read", _rewriting_after(real, path / "adapter_model.safetensors"))
    with pytest.raises(AdapterChangedError, match="while the adapter was read"):
        rt.load("a", path)
    assert rt.targets == [] and rt.adapters() == []
    monkeypatch.setattr(stager, "read", real)
    rt.load("a", path)
    assert rt.targets and rt.info("a").tier == "device"


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_with_tensors_copied_owns_every_tensor(llama_and_adapter, tmp_path, kind) -> None:
    base, path = llama_and_adapter
    if kind == "dora":
        path = base.make_adapter(tmp_path / "dora", seed=5, r=4, use_dora=True)
    adapter = parse_adapter(*read_adapter_dir(path, mapped=True), str(path))
    copied = with_tensors_copied(adapter)
    assert list(copied.modules) == list(adapter.modules) and copied.rank == adapter.rank
    held = 0
    for name, module in adapter.modules.items():
        assert copied.modules[name].scaling == module.scaling
        for field in ("lora_A", "lora_B", "magnitude", "bias", "ia3"):
            mine, theirs = getattr(copied.modules[name], field), getattr(module, field)
            if theirs is None:
                assert mine is None
                continue
            held += 1
            assert torch.equal(mine, theirs)
            assert mine.untyped_storage().data_ptr() != theirs.untyped_storage().data_ptr()
    assert held == len(adapter.modules) * (3 if kind == "dora" else 2)


@pytest.mark.parametrize("source", ["valid", "tmp/no/such/adapter"])
def test_a_source_and_a_state_dict_together_are_refused_as_a_pair(llama_and_adapter, source) -> None:
    base, path = llama_and_adapter
    rt = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=16))
    config, state = read_adapter_dir(path)
    with pytest.raises(HotswapError, match="exactly one of a source"):
        rt.load("a", path if source == "valid" else source, state_dict=state, config=config)
    assert rt.adapters() == []
