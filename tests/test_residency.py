"""Tiers, pins, leases, holds, background failures, and forwards running while other threads
load, prefetch, replace and activate.

The concurrency tests check every output against precomputed references: each forward must equal
the output of exactly one adapter version (or the base model), never a mix.
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from hotswap_rt import (
    AdapterChangedError, HotswapError, HotswapRuntime, RuntimeConfig, SlotsBusyError, UnknownAdapterError,
)

from hotswap_rt.staging import BackgroundLoads

from .conftest import ATTENTION_TARGETS, VOCAB, BaseModel, assert_unchanged, logits, snapshot_state

IDS = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
NAMES = ["a", "b", "c", "d", "e"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = BaseModel("llama", seed=31)
    root = tmp_path_factory.mktemp("residency")
    paths = {n: base.make_adapter(root / n, seed=50 + i, r=2 + 2 * i, lora_alpha=8)
             for i, n in enumerate(NAMES)}
    reference = base.peft_reference(paths)
    expected = {}
    for name in NAMES:
        reference.set_adapter(name)
        expected[name] = logits(reference, IDS)
    expected[None] = logits(base.model, IDS)
    return base, paths, expected


def _runtime(base: BaseModel, device_slots: int = 2, host_slots: int = 4) -> HotswapRuntime:
    return HotswapRuntime(base.clone(), RuntimeConfig(
        ATTENTION_TARGETS["llama"], max_rank=16, device_slots=device_slots, host_slots=host_slots,
        max_active_adapters=1))


def _matches(output: torch.Tensor, expected: dict) -> list:
    return [key for key, value in expected.items() if (output - value).abs().max().item() <= 1e-4]


def test_pin_keeps_an_adapter_resident(env) -> None:
    base, paths, expected = env
    rt = _runtime(base)
    for name in "abc":
        rt.load(name, paths[name])
    assert rt.pin("c").tier == "device"  # c was host-only: pinning copies it in
    for name in ("a", "b", "a", "b"):
        rt.activate(name)
        assert torch.allclose(logits(rt.model, IDS), expected[name], atol=1e-4)
        assert {i.name: i.tier for i in rt.adapters()}["c"] == "device"
    # b is served from the only unpinned slot: pinning a may not evict what is being served.
    before = snapshot_state(rt, IDS)
    with pytest.raises(SlotsBusyError, match="device-resident"):
        rt.pin("a")
    assert_unchanged(before, snapshot_state(rt, IDS))
    rt.activate("a")
    rt.pin("a")  # both slots pinned now; b cannot come in
    before = snapshot_state(rt, IDS)
    with pytest.raises(SlotsBusyError, match="pinned, leased"):
        rt.activate("b")
    assert_unchanged(before, snapshot_state(rt, IDS))
    rt.unpin("c")
    rt.activate("b")
    assert {i.name: i.tier for i in rt.adapters()}["c"] == "host"


def test_lease_is_idempotent_thread_safe_and_released_on_gc(env) -> None:
    base, paths, _ = env
    rt = _runtime(base)
    for name in "abc":
        rt.load(name, paths[name])
    lease = rt.lease("c")
    assert rt.info("c").leases == 1 and rt.adapters()[-1].leases == 1
    second = rt.lease("c")
    with pytest.raises(SlotsBusyError, match="lease"):
        rt.unload("c")
    barrier = threading.Barrier(8)

    def release() -> None:
        barrier.wait()
        lease.release()

    threads = [threading.Thread(target=release) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert lease.released and rt.info("c").leases == 1  # released exactly once
    del second
    gc.collect()
    assert rt.info("c").leases == 0
    with rt.lease("a") as held:
        rt.activate("b")
        rt.activate("c")  # a is leased: c takes b's slot, never a's
        assert rt.info("a").slot is not None and rt.info("b").slot is None
    assert held.released


def test_forward_gate_hold_blocks_other_threads_changes(env) -> None:
    base, paths, expected = env
    rt = _runtime(base)
    rt.load("a", paths["a"])
    rt.load("b", paths["b"])
    rt.activate("a")
    flipped = threading.Event()

    def flip() -> None:
        rt.activate("b")
        flipped.set()

    with rt.hold():
        thread = threading.Thread(target=flip)
        thread.start()
        time.sleep(0.2)
        assert not flipped.is_set()  # waits for the hold to end
        assert torch.allclose(logits(rt.model, IDS), expected["a"], atol=1e-4)
        with pytest.raises(HotswapError, match="inside a forward or an rt.hold"):
            rt.activate("b")  # this thread would wait for itself
    thread.join(timeout=10)
    assert flipped.is_set()
    assert torch.allclose(logits(rt.model, IDS), expected["b"], atol=1e-4)


def test_prefetch_failure_surfaces_from_future_and_next_activate(env, tmp_path) -> None:
    base, paths, expected = env
    rt = _runtime(base)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    future = rt.prefetch("x", broken)
    with pytest.raises(HotswapError, match="not a valid safetensors"):
        future.result(timeout=30)
    with pytest.raises(HotswapError, match="background load of 'x' failed"):
        rt.activate("x")
    with pytest.raises(HotswapError, match="no adapter named 'x'"):
        rt.activate("x")  # reported once; then it is simply unknown
    assert rt.adapters() == []
    # Activating right after prefetch waits for it (no sleep, no result()).
    rt.prefetch("a", paths["a"])
    rt.activate("a")
    assert torch.allclose(logits(rt.model, IDS), expected["a"], atol=1e-4)


def test_prefetch_of_a_file_that_disappears_fails_cleanly(env, tmp_path, monkeypatch) -> None:
    from hotswap_rt import peft_format

    base, paths, _ = env
    rt = _runtime(base)
    copy = tmp_path / "vanishing"
    shutil.copytree(paths["a"], copy)
    real_read = peft_format.read_adapter_dir

    def read_after_delete(directory, **kwargs):
        shutil.rmtree(copy)
        return real_read(directory, **kwargs)

    monkeypatch.setattr("hotswap_rt.staging.read_adapter_dir", read_after_delete)
    with pytest.raises(HotswapError, match="missing"):
        rt.prefetch("v", copy).result(timeout=30)
    assert rt.adapters() == []


def test_save_of_a_disk_tier_adapter_reads_it_again(env, tmp_path) -> None:
    from safetensors.torch import load_file

    base, paths, _ = env
    rt = _runtime(base, device_slots=1, host_slots=2)
    for name in "abc":
        rt.load(name, paths[name])
    assert {i.name: i.tier for i in rt.adapters()} == {"a": "device", "b": "disk", "c": "host"}
    saved = Path(rt.save("b", tmp_path / "b"))
    original = load_file(str(paths["b"] / "adapter_model.safetensors"))
    written = load_file(str(saved / "adapter_model.safetensors"))
    assert original.keys() == written.keys()
    assert all(torch.equal(original[k], written[k]) for k in original)


def _concurrent_run(rt: HotswapRuntime, paths: dict[str, Path], expected: dict,
                    seconds: float = 3.0, slots_busy_ok: bool = False,
                    forwards_per_hold: int = 1, activation_pause: float = 0.0) -> dict[str, int]:
    """Forwards in a loop on one thread; three threads activate, load/replace/unload and
    prefetch. Returns counts; raises if any output is not exactly one reference.
    ``slots_busy_ok``: an activation may find every slot reserved or leased by the loads
    (with fewer slots than adapters), which it reports as SlotsBusyError.
    ``forwards_per_hold``: forwards run in ``rt.hold()`` blocks of this many (one selection).
    ``activation_pause``: seconds, at most, an activating thread sleeps between activations
    (so some arrive while a forward runs, instead of queueing behind the last one)."""
    stop = threading.Event()
    errors: list[BaseException] = []
    counts = {"forwards": 0, "activations": 0, "loads": 0, "prefetches": 0}
    # Version 2 of each name carries another adapter's weights: outputs then match that one.
    swap_for = {"a": "b", "b": "c", "c": "a"}

    def forwards() -> None:
        while not stop.is_set():
            with rt.hold():
                outputs = [logits(rt.model, IDS) for _ in range(forwards_per_hold)]
            matched = [_matches(out, expected) for out in outputs]
            if any(len(m) != 1 for m in matched) or any(m != matched[0] for m in matched):
                errors.append(AssertionError(f"outputs match {matched}, not one reference each "
                                             f"and the same in one hold"))
                return
            counts["forwards"] += len(outputs)

    def activations(rng: random.Random) -> None:
        while not stop.is_set():
            name = rng.choice(["a", "b", "c", None])
            if activation_pause:
                time.sleep(rng.random() * activation_pause)
            try:
                rt.activate(name)
                counts["activations"] += 1
            except (SlotsBusyError, HotswapError) as exc:
                busy = slots_busy_ok and isinstance(exc, SlotsBusyError)
                if not busy and "no adapter named" not in str(exc) and "in flight" not in str(exc):
                    raise

    def loads(rng: random.Random) -> None:
        while not stop.is_set():
            name = rng.choice(["a", "b", "c"])
            source = paths[rng.choice([name, swap_for[name]])]
            rt.load(name, source, replace=True)
            counts["loads"] += 1

    def prefetches(rng: random.Random) -> None:
        while not stop.is_set():
            rt.prefetch("d", paths["d"], replace=True).result()
            try:
                rt.unload("d", force=True)
            except HotswapError:
                pass
            counts["prefetches"] += 1

    def guarded(fn, *args):
        def run():
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                stop.set()
        return threading.Thread(target=run)

    threads = [guarded(forwards), guarded(activations, random.Random(1)),
               guarded(loads, random.Random(2)), guarded(prefetches, random.Random(3))]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return counts


def test_forwards_while_other_threads_load_replace_prefetch_activate(env) -> None:
    base, paths, expected = env
    rt = _runtime(base, device_slots=3, host_slots=6)
    for name in "abc":
        rt.load(name, paths[name])
    counts = _concurrent_run(rt, paths, {k: expected[k] for k in ("a", "b", "c", None)})
    print(counts)
    assert counts["forwards"] > 20 and counts["activations"] > 20 and counts["loads"] > 5
    assert counts["prefetches"] > 2


def test_forwards_while_other_threads_swap_adapters_in_from_the_host_ring(env) -> None:
    """Two slots for three adapters: activations copy from the host ring (under the gate, or
    beside a forward that is running when they start) while loads reserve shadow slots. Every
    output is still exactly one reference; no reservation is left behind."""
    base, paths, expected = env
    rt = _runtime(base, device_slots=2, host_slots=6)
    for name in "abc":
        rt.load(name, paths[name])
    beside: list[bool] = []
    activate_beside = rt._activate_beside_forwards
    rt._activate_beside_forwards = lambda name: beside.append(activate_beside(name)) or beside[-1]
    swaps = rt.stats()["swaps"]
    counts = _concurrent_run(rt, paths, {k: expected[k] for k in ("a", "b", "c", None)},
                             slots_busy_ok=True, forwards_per_hold=4, activation_pause=0.004)
    assert counts["forwards"] > 20 and counts["activations"] > 20
    assert rt.stats()["swaps"] - swaps > 20 and rt.internals.registry.reserved == set()
    assert beside.count(True) > 2, beside.count(True)  # ~20 in a run here


@pytest.mark.slow
def test_concurrent_operations_on_the_compiled_model_never_recompile(env) -> None:
    base, paths, expected = env
    torch._dynamo.reset()
    rt = _runtime(base, device_slots=3, host_slots=6)
    for name in "abc":
        rt.load(name, paths[name])
    rt.compile(IDS, guard="count")
    counts = _concurrent_run(rt, paths, {k: expected[k] for k in ("a", "b", "c", None)})
    print(counts)
    assert counts["forwards"] > 20
    assert rt.guard.recompiles == 0 and rt.guard.storage_moves == 0, rt.guard.report()


def test_enable_brings_back_adapters_evicted_while_disabled(env) -> None:
    """Found by the soak: while disabled the selection reads no slot, so its adapters may be
    evicted; enable() must bring them back rather than write a selection naming no slot."""
    base, paths, expected = env
    rt = _runtime(base, device_slots=1)
    rt.load("a", paths["a"])
    rt.load("b", paths["b"])
    rt.activate("a")
    rt.disable()
    with rt.lease("b"):  # takes the only slot: a drops to the host ring
        assert {i.name: i.tier for i in rt.adapters()}["a"] == "host"
        assert torch.allclose(logits(rt.model, IDS), expected[None], atol=1e-5)
    rt.enable()
    assert torch.allclose(logits(rt.model, IDS), expected["a"], atol=1e-4)


def test_activating_a_loaded_name_skips_the_general_checks_and_ends_the_same(env, tmp_path) -> None:
    """``activate(name)`` of an adapter in the ring or a slot takes the short path; a weighted
    spec, a disk-tier adapter, a prefetch in flight and an unknown name take the general one;
    both leave the same selection, slots and outputs."""
    base, paths, expected = env
    rt = _runtime(base, device_slots=1, host_slots=2)
    general = []
    select = rt._select
    rt._select = lambda rows, per_row: general.append(rows) or select(rows, per_row)
    for name in "ab":
        rt.load(name, paths[name])
    rt.activate("b")  # host ring -> the one slot
    assert general == []
    short = snapshot_state(rt, IDS)
    assert torch.allclose(short["logits"], expected["b"], atol=1e-4)
    rt.activate({"a": 1.0})
    rt.activate({"b": 1.0})  # the general path to the same selection
    assert len(general) == 2
    assert_unchanged(short, snapshot_state(rt, IDS))
    rt.load("c", paths["c"])  # the ring holds 2: the least recently used ("a") drops to disk
    assert rt.info("a").tier == "disk"
    rt.activate("a")  # re-read from disk (and "c" drops there): the general path
    assert len(general) == 3 and torch.allclose(logits(rt.model, IDS), expected["a"], atol=1e-4)
    rt.pin("a")
    assert {info.name: info.tier for info in rt.adapters()} == {"a": "device", "b": "host", "c": "disk"}
    before = snapshot_state(rt, IDS)
    with pytest.raises(SlotsBusyError):  # the short path refuses as the general one, changing nothing
        rt.activate("b")
    assert_unchanged(before, snapshot_state(rt, IDS))
    assert len(general) == 3
    with pytest.raises(HotswapError, match="no adapter named 'zz'"):
        rt.activate("zz")
    assert len(general) == 4


def test_a_disk_tier_adapter_whose_files_changed_is_refused_not_read_back(env, tmp_path) -> None:
    """An adapter that dropped to the disk tier is read back only from the files it was loaded
    from: after they are rewritten, activating or saving it raises AdapterChangedError and changes
    nothing; ``load(..., replace=True)`` takes the new files."""
    base, paths, expected = env
    rt = _runtime(base, device_slots=1, host_slots=2)
    directory = tmp_path / "b"
    shutil.copytree(paths["b"], directory)
    rt.load("a", paths["a"])  # the one slot
    rt.load("b", directory)
    rt.load("c", paths["c"])  # the ring is full: "b", host-only, drops to the disk tier
    assert rt.info("b").tier == "disk"
    rt.activate("a")
    shutil.rmtree(directory)
    shutil.copytree(paths["d"], directory)  # someone saves another adapter there
    before = snapshot_state(rt, IDS)
    for change in (lambda: rt.activate("b"), lambda: rt.pin("b"), lambda: rt.save("b", tmp_path / "out")):
        with pytest.raises(AdapterChangedError, match=r"adapter 'b': \['adapter_config.json', "
                                                      r"'adapter_model.safetensors'\]"):
            change()
        assert_unchanged(before, snapshot_state(rt, IDS))
    assert rt.info("b").tier == "disk" and not (tmp_path / "out").exists()
    rt.load("b", directory, replace=True)  # the files as they are now
    rt.activate("b")
    assert torch.allclose(logits(rt.model, IDS), expected["d"], atol=1e-4)


def test_a_rewrite_in_place_that_restores_size_and_mtime_is_still_seen(env, tmp_path) -> None:
    """Same size, same inode, modification time set back (as ``cp -p`` leaves it): the change
    time, which the kernel sets on every write, still tells."""
    base, paths, _ = env
    rt = _runtime(base, device_slots=1, host_slots=2)
    directory = tmp_path / "b"
    shutil.copytree(paths["b"], directory)
    rt.load("a", paths["a"])
    rt.load("b", directory)
    rt.load("c", paths["c"])  # "b" drops to the disk tier
    weights = directory / "adapter_model.safetensors"
    before_stat = weights.stat()
    raw = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    for i in range(header + 3, len(raw), 4):
        raw[i] ^= 0x80  # every fp32 value negated: same size, other weights
    time.sleep(0.01)  # a change time the write can move
    with open(weights, "r+b") as f:
        f.write(raw)
    os.utime(weights, ns=(before_stat.st_atime_ns, before_stat.st_mtime_ns))
    after_stat = weights.stat()
    assert (after_stat.st_size, after_stat.st_mtime_ns, after_stat.st_ino) == (
        before_stat.st_size, before_stat.st_mtime_ns, before_stat.st_ino)
    with pytest.raises(AdapterChangedError, match=r"\['adapter_model.safetensors'\]"):
        rt.activate("b")


def test_pin_and_lease_of_a_name_whose_prefetch_is_in_flight_wait_for_it(env) -> None:
    """``pin`` / ``lease`` of a prefetching name wait for its load (as ``activate`` does) rather
    than refusing it as unknown; a name that is not a string is refused by name."""
    base, paths, expected = env
    rt = _runtime(base)
    read = rt.internals.stager.read

    def slow_read(*args, **kwargs):
        time.sleep(0.2)  # the prefetch is still in flight when pin / lease is called
        return read(*args, **kwargs)

    rt.internals.stager.read = slow_read
    rt.prefetch("p", paths["a"])
    assert rt.pin("p").slot is not None
    rt.prefetch("q", paths["b"])
    with rt.lease("q"):
        assert rt.info("q").tier == "device"
    rt.activate("p")
    assert torch.allclose(logits(rt.model, IDS), expected["a"], atol=1e-4)
    with pytest.raises(UnknownAdapterError, match=r"\['p'\]"):
        rt.pin(["p"])


class _ForwardInProgress:
    """Another thread inside a forward (``rt.hold()``) until :meth:`end`; its output then."""

    def __init__(self, rt: HotswapRuntime) -> None:
        self.rt, self.inside, self.release, self.outputs = rt, threading.Event(), threading.Event(), []
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.inside.wait(10)

    def _run(self) -> None:
        with self.rt.hold():
            self.inside.set()
            self.release.wait(10)
            self.outputs.append(logits(self.rt.model, IDS))

    def end(self) -> torch.Tensor:
        self.release.set()
        self.thread.join(10)
        return self.outputs[0]


def _in_thread(job) -> tuple[threading.Thread, list]:
    """``job()`` on a thread of its own; the list gets the exception it raised, if any."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def _host_adapter_and_a_running_forward(env) -> tuple[HotswapRuntime, _ForwardInProgress]:
    """Two slots: "a" selected, "b" resident, "c" in the host ring; a forward of "a" running."""
    base, paths, _ = env
    rt = _runtime(base, device_slots=2)
    for name in "abc":
        rt.load(name, paths[name])
    rt.activate("a")
    assert {i.name: i.tier for i in rt.adapters()} == {"a": "device", "b": "device", "c": "host"}
    return rt, _ForwardInProgress(rt)


def _poll(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def test_a_load_into_a_free_slot_does_not_wait_for_running_forwards(env) -> None:
    """A new adapter's copy into a free slot changes nothing a forward reads: it completes while
    another thread is inside a forward (here ``rt.hold()``), which a change of the selection or
    of a selected slot would wait for. Both outputs stay exact."""
    base, paths, expected = env
    rt = _runtime(base, device_slots=3)
    rt.load("a", paths["a"])
    rt.activate("a")
    forward = _ForwardInProgress(rt)
    try:
        loader = threading.Thread(
            target=lambda: (rt.load("b", paths["b"]), rt.prefetch("c", paths["c"]).result()))
        loader.start()
        loader.join(10)
        done = not loader.is_alive()
        tiers = {info.name: info.tier for info in rt.adapters()}
    finally:
        held = forward.end()
        loader.join(10)
    assert done and tiers == {"a": "device", "b": "device", "c": "host"}
    assert _matches(held, expected) == ["a"]
    rt.activate("b")
    assert _matches(logits(rt.model, IDS), expected) == ["b"]
    rt.activate("c")
    assert _matches(logits(rt.model, IDS), expected) == ["c"]


def test_replacing_a_served_adapter_copies_beside_running_forwards(env) -> None:
    """``load(name, ..., replace=True)`` of the served adapter copies into a shadow slot while
    another thread is inside a forward (``rt.hold()``), which keeps serving the old version
    from the old slot; only pointing the selection at the new slot waits for it."""
    base, paths, expected = env
    rt = _runtime(base, device_slots=3)
    rt.load("a", paths["a"])
    rt.activate("a")
    old_slot = rt.info("a").slot
    forward = _ForwardInProgress(rt)
    loader = threading.Thread(target=lambda: rt.load("a", paths["b"], replace=True))
    loader.start()
    _poll(lambda: rt.internals.registry.stale)
    copied_beside = rt.internals.registry.stale == {old_slot} and rt.info("a").slot != old_slot
    held = forward.end()
    loader.join(10)
    assert copied_beside and not loader.is_alive()
    assert _matches(held, expected) == ["a"]  # the old version, served during the copy
    assert _matches(logits(rt.model, IDS), expected) == ["b"]  # the selection followed
    assert rt.internals.registry.stale == set() and rt.info("a").leases == 0
    assert rt.info("a").version == 2 and rt.stats()["swaps"] >= 2


def test_activating_a_host_adapter_copies_beside_running_forwards(env) -> None:
    """``activate`` of an adapter in the host ring copies it into a slot the selection does not
    read (here b's, the least recently used) while another thread is inside a forward, which
    keeps serving "a"; only selecting it waits for that forward."""
    _, _, expected = env
    rt, forward = _host_adapter_and_a_running_forward(env)
    b_slot = rt.info("b").slot
    row = rt.internals.registry.records["c"].staged.rows[torch.float32]
    slot_row = rt.internals.arena.arenas[torch.float32][b_slot, : row.numel()]
    activator, errors = _in_thread(lambda: rt.activate("c"))
    try:
        copied_beside = _poll(lambda: rt.internals.registry.reserved == {b_slot} and torch.equal(slot_row, row))
        still_waiting = activator.is_alive()
    finally:
        held = forward.end()
        activator.join(10)
    assert copied_beside and still_waiting and not errors
    assert _matches(held, expected) == ["a"]  # served unchanged during the copy
    assert _matches(logits(rt.model, IDS), expected) == ["c"]
    assert {i.name: i.tier for i in rt.adapters()} == {"a": "device", "b": "host", "c": "device"}
    assert rt.info("c").slot == b_slot and rt.internals.registry.reserved == set()


def test_a_copy_beside_running_forwards_that_fails_leaves_the_selection(env, monkeypatch) -> None:
    _, _, expected = env
    rt, forward = _host_adapter_and_a_running_forward(env)
    arena = rt.internals.arena
    real_write = arena.write_slot

    def failing_write(slot, rows, ordered=True):
        real_write(slot, rows, ordered)  # the slot is written, then the copy is reported failed
        raise RuntimeError("copy failed")

    monkeypatch.setattr(arena, "write_slot", failing_write)
    activator, errors = _in_thread(lambda: rt.activate("c"))
    activator.join(10)
    held = forward.end()
    assert not activator.is_alive() and len(errors) == 1 and "copy failed" in str(errors[0])
    assert _matches(held, expected) == ["a"] and _matches(logits(rt.model, IDS), expected) == ["a"]
    assert rt.active == [{"a": 1.0}] and rt.internals.registry.reserved == set()
    assert rt.info("c").tier == "host"
    monkeypatch.undo()
    rt.activate("c")
    assert _matches(logits(rt.model, IDS), expected) == ["c"]
    rt.activate("b")  # into the slot the failed copy wrote: cleared and rewritten
    assert _matches(logits(rt.model, IDS), expected) == ["b"]


def test_an_adapter_replaced_during_its_copy_beside_forwards_is_selected_in_its_new_version(
        env, monkeypatch) -> None:
    """The copy beside the forwards is of the version that was loaded when it started: if
    ``load(..., replace=True)`` lands meanwhile, that copy is dropped and the gated path
    copies and selects the new version."""
    _, paths, expected = env
    rt, forward = _host_adapter_and_a_running_forward(env)
    arena = rt.internals.arena
    real_write = arena.write_slot
    replaced: list[bool] = []

    def write_then_replace(slot, rows, ordered=True):
        seconds = real_write(slot, rows, ordered)
        if not replaced:
            replaced.append(True)
            rt.load("c", paths["d"], replace=True)  # beside the forwards: the lock only
        return seconds

    monkeypatch.setattr(arena, "write_slot", write_then_replace)
    activator, errors = _in_thread(lambda: rt.activate("c"))
    assert _poll(lambda: rt.info("c").version == 2)
    held = forward.end()
    activator.join(10)
    assert replaced and not activator.is_alive() and not errors
    assert _matches(held, expected) == ["a"]
    assert _matches(logits(rt.model, IDS), expected) == ["d"]
    assert rt.internals.registry.reserved == set()


def test_selecting_the_selection_again_waits_for_a_prefetch_of_its_adapter(env, monkeypatch) -> None:
    """Re-selecting what is already selected changes nothing and returns at once, except while
    a prefetch of one of its names is in flight: then it waits for it, as any activation of a
    name being prefetched does, and the new version is served."""
    base, paths, expected = env
    rt = _runtime(base, device_slots=3)
    rt.load("a", paths["a"])
    rt.activate("a")
    rt.activate("a")  # already selected: nothing to do
    assert _matches(logits(rt.model, IDS), expected) == ["a"]
    go, real_read = threading.Event(), rt.internals.stager.read

    def slow_read(*args, **kwargs):
        go.wait(10)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(rt.internals.stager, "read", slow_read)
    future = rt.prefetch("a", paths["b"], replace=True)
    timer = threading.Timer(0.2, go.set)
    timer.start()
    rt.activate("a")
    assert future.done() and future.result().version == 2
    assert _matches(logits(rt.model, IDS), expected) == ["b"]
    timer.join()


def test_selection_changes_go_on_while_a_load_copies_into_its_slot(env, monkeypatch) -> None:
    """Once compiled (the slot layout fixed), the copy of a new adapter into a free slot runs
    outside the runtime lock: the engine's per-step selection changes (here activating another
    resident adapter) do not wait for it, and the slot is taken by nothing else meanwhile."""
    base, paths, expected = env
    rt = _runtime(base, device_slots=3)
    rt.load("a", paths["a"])
    rt.load("b", paths["b"])
    rt.activate("a")
    rt.compile(IDS)
    copying, finish = threading.Event(), threading.Event()
    real_write = rt.internals.arena.write_slot

    def slow_write(slot, rows, ordered=True):
        if threading.current_thread().name == "loader":
            copying.set()
            finish.wait(10)
        return real_write(slot, rows, ordered)

    monkeypatch.setattr(rt.internals.arena, "write_slot", slow_write)
    loader = threading.Thread(target=lambda: rt.load("c", paths["c"]), name="loader")
    loader.start()
    try:
        assert copying.wait(10)
        reserved = set(rt.internals.registry.reserved)
        rt.activate("b")  # waited for the whole copy when the lock was held through it
        switched_during_copy = loader.is_alive()
        served_during_copy = _matches(logits(rt.model, IDS), expected)
    finally:
        finish.set()
        loader.join(10)
    assert switched_during_copy and served_during_copy == ["b"] and len(reserved) == 1
    assert rt.info("c").slot in reserved and rt.internals.registry.reserved == set()
    rt.activate("c")
    assert _matches(logits(rt.model, IDS), expected) == ["c"] and rt.stats()["swaps"] == 3


def test_the_layout_token_changes_when_slots_are_relaid(env, tmp_path) -> None:
    """What a copy outside the lock is checked against: adding scale vectors (a DoRA adapter
    before compiling) re-lays every slot, and the token changes; a plain load does not."""
    base, paths, _ = env
    rt = _runtime(base, device_slots=3)
    rt.load("a", paths["a"])
    token = rt.internals.arena.layout_token()
    rt.load("b", paths["b"])
    assert rt.internals.arena.layout_token() == token
    rt.load("dora", base.make_adapter(tmp_path / "dora", seed=9, r=4, use_dora=True))
    assert rt.internals.arena.layout_token() != token


def test_loads_beside_forwards_never_serve_a_torn_adapter(env) -> None:
    """Compiled (loads copy outside the lock): one thread keeps replacing the served adapter
    (its versions alternate between two files) and loading / unloading another; the forwarding
    thread's every output is exactly one of the served adapter's versions, never a mix, and
    nothing stays stale, reserved or leased afterwards."""
    base, paths, expected = env
    rt = _runtime(base, device_slots=3)
    rt.load("s", paths["a"])
    rt.activate("s")
    rt.compile(IDS)
    stop, errors, loads = threading.Event(), [], [0]

    def loader() -> None:
        try:
            while not stop.is_set():
                rt.load("s", paths["b" if loads[0] % 2 == 0 else "a"], replace=True)
                rt.load("n", paths["c"])
                rt.unload("n")
                loads[0] += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=loader)
    thread.start()
    served = []
    try:
        for _ in range(60):
            rt.activate("s")
            served += _matches(logits(rt.model, IDS), expected)
    finally:
        stop.set()
        thread.join(30)
    assert not errors and loads[0] > 0 and len(served) == 60
    assert set(served) <= {"a", "b"}  # each output one whole version
    registry = rt.internals.registry
    assert registry.stale == set() and registry.reserved == set() and rt.info("s").leases == 0
    assert rt.guard.recompiles == 0


def test_a_background_failure_waited_for_before_its_callback_runs_is_reported_once(monkeypatch) -> None:
    """``wait`` can wake on a failed load before the Future's done-callback runs: that callback
    must not record the failure again (it was raised already), or the next use of the name
    would fail with it a second time."""
    late_callbacks = []
    monkeypatch.setattr(BackgroundLoads, "_done", lambda self, name, future: late_callbacks.append(
        (self, name, future)))
    loads = BackgroundLoads()

    def fail() -> None:
        raise HotswapError("the file is broken")

    loads.submit("x", fail)
    with pytest.raises(HotswapError, match="background load of 'x' failed: the file is broken"):
        loads.wait("x")
    monkeypatch.undo()
    for loads_, name, future in late_callbacks:  # the callback, after the waiter
        loads_._done(name, future)
    assert late_callbacks and not loads.knows("x")
    loads.wait("x")  # nothing in flight, nothing unseen: returns
    loads.shutdown()


def test_switching_to_a_resident_adapter_counts_a_device_hit_and_makes_it_the_most_recent(env) -> None:
    """A switch to a resident adapter copies nothing, counts a device hit, and makes that
    adapter the most recently used: the next swap evicts the other one."""
    base, paths, expected = env
    rt = _runtime(base, device_slots=2)
    for name in ("a", "b", "c"):
        rt.load(name, paths[name])
    rt.activate("a")
    rt.activate("b")  # both resident now; "a" the least recently used
    before = rt.stats()
    rt.activate("a")  # resident: no copy, a device hit, "a" becomes the most recent
    after = rt.stats()
    assert after["swaps"] == before["swaps"]
    assert after["hits"]["device"] == before["hits"]["device"] + 1
    assert _matches(logits(rt.model, IDS), expected) == ["a"]
    rt.activate(None)  # no slot read by the selection: the next copy goes by recency alone
    rt.activate("c")  # one copy: into "b"'s slot, not "a"'s
    assert rt.info("a").tier == "device" and rt.info("b").tier != "device"
    assert _matches(logits(rt.model, IDS), expected) == ["c"]
