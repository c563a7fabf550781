"""The residency policy's bookkeeping (:mod:`hotswap_rt.registry`): LRU slot choice, pins,
leases, training, host-ring eviction. No model: records are built by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hotswap_rt.config import AdapterInfo
from hotswap_rt.errors import SlotsBusyError, UnknownAdapterError
from hotswap_rt.peft_format import ParsedAdapter
from hotswap_rt.registry import AdapterRegistry, Origin
from hotswap_rt.staging import StagedAdapter


def staged() -> StagedAdapter:
    adapter = ParsedAdapter(rank=1, alpha=1.0, use_rslora=False, modules={})
    return StagedAdapter(adapter=adapter, rows={torch.float32: torch.zeros(4)}, sizes={torch.float32: (0, 4)})


def info(name: str) -> AdapterInfo:
    return AdapterInfo(name, 1, 1.0, False, 1.0, (), "host", 16, 0)


def registry_with(names: str, host_slots: int = 4, device_slots: int = 2,
                  readable: bool = True) -> AdapterRegistry:
    registry = AdapterRegistry(host_slots, device_slots)
    for name in names:
        origin = Origin(Path(f"/adapters/{name}")) if readable else None
        registry.put(name, staged(), info(name), origin)
    return registry


def test_free_slots_first_then_least_recently_used() -> None:
    registry = registry_with("abc", device_slots=2)
    assert registry.pick_slot(set()) == 0
    registry.assign(registry.get("a"), 0)
    assert registry.pick_slot(set()) == 1
    registry.assign(registry.get("b"), 1)
    registry.touch(registry.get("a"))  # b is now the least recently used
    assert registry.pick_slot(set()) == 1
    assert registry.pick_slot({1}) == 0  # protected slots are never taken
    assert registry.pick_slot(set(), avoid={1}) == 0  # avoided only while another slot fits
    assert registry.pick_slot(set(), avoid={0, 1}) == 1


def test_pinned_leased_and_trained_adapters_are_never_evicted() -> None:
    registry = registry_with("ab", device_slots=2)
    registry.assign(registry.get("a"), 0)
    registry.assign(registry.get("b"), 1)
    for flag in ("pinned", "leases", "training"):
        for name in "ab":
            setattr(registry.get(name), flag, 1 if flag == "leases" else True)
        assert registry.pick_slot(set()) is None and registry.reusable_slots(set()) == []
        for name in "ab":
            setattr(registry.get(name), flag, 0 if flag == "leases" else False)
    assert registry.reusable_slots(set()) == [0, 1]


def test_assign_evicts_the_previous_owner_and_counts_it() -> None:
    registry = registry_with("ab", device_slots=1)
    registry.assign(registry.get("a"), 0)
    registry.assign(registry.get("b"), 0)
    assert registry.get("a").slot is None and registry.get("a").tier == "host"
    assert registry.slot_owner == ["b"] and registry.evictions == 1
    registry.vacate(0)
    assert registry.get("b").slot is None and registry.slot_owner == [None]


def test_host_ring_drops_the_lru_readable_adapter_to_disk() -> None:
    registry = registry_with("ab", host_slots=2)
    registry.touch(registry.get("a"))  # b is least recently used
    registry.put("c", staged(), info("c"), Origin(Path("/adapters/c")))
    assert registry.get("b").tier == "disk" and registry.host_evictions == 1
    assert registry.get("a").tier == "host" and registry.get("c").tier == "host"


def test_host_ring_refuses_when_nothing_can_be_dropped() -> None:
    registry = registry_with("ab", host_slots=2, readable=False)  # no file to read again
    with pytest.raises(SlotsBusyError, match="host_slots=2"):
        registry.check_room("c")
    registry = registry_with("ab", host_slots=2)
    registry.assign(registry.get("a"), 0)
    registry.get("b").pinned = True
    with pytest.raises(SlotsBusyError):
        registry.check_room("c")


def test_replacing_keeps_the_slot_and_bumps_the_version() -> None:
    registry = registry_with("a")
    registry.assign(registry.get("a"), 1)
    record = registry.put("a", staged(), info("a"), None)
    assert record.slot == 1 and record.version == 2


def test_unknown_names_list_what_is_loaded() -> None:
    with pytest.raises(UnknownAdapterError, match=r"\['a', 'b'\]"):
        registry_with("ab").get("zz")
