"""Which adapters the runtime holds, and which of them sit in which device slot.

Two tiers: every loaded adapter keeps its staged host row (up to ``host_slots`` adapters); up to
``device_slots`` of them also sit in a device slot. A slot is reused least-recently-used first,
never while the current selection reads it. The registry is bookkeeping only; the runtime does the
copies, under its lock.
"""

from __future__ import annotations

from dataclasses import dataclass

from .arena import StagedAdapter
from .errors import SlotsBusyError, UnknownAdapterError


@dataclass
class AdapterRecord:
    """One loaded adapter: its staged host copy, its device slot (if any), its version.

    ``weight_scale`` multiplies its selection weight (a trainable adapter's scaling, which its
    slot does not fold into B; 1.0 otherwise). A ``pinned`` adapter's slot is never reused.
    """

    name: str
    staged: StagedAdapter
    version: int
    slot: int | None = None
    last_used: int = 0
    weight_scale: float = 1.0
    pinned: bool = False


class AdapterRegistry:
    """Host entries by name and the device slot table, with LRU bookkeeping."""

    def __init__(self, host_slots: int, device_slots: int) -> None:
        self.host_slots = host_slots
        self.records: dict[str, AdapterRecord] = {}
        self.slot_owner: list[str | None] = [None] * device_slots
        self.evictions = 0
        self._clock = 0

    def get(self, name: str) -> AdapterRecord:
        record = self.records.get(name)
        if record is None:
            known = sorted(self.records) or "none"
            raise UnknownAdapterError(f"no adapter named {name!r} is loaded (loaded: {known})")
        return record

    def check_room(self, name: str) -> None:
        """Raise unless ``name`` is already held or a host entry is free."""
        if name not in self.records and len(self.records) >= self.host_slots:
            raise SlotsBusyError(
                f"cannot hold adapter {name!r}: all host_slots={self.host_slots} entries are in "
                f"use ({sorted(self.records)}); unload one or raise RuntimeConfig.host_slots"
            )

    def put(self, name: str, staged: StagedAdapter) -> AdapterRecord:
        """Insert or replace ``name``'s host entry; a replacement keeps its slot and bumps version."""
        self.check_room(name)
        previous = self.records.get(name)
        if previous is None:
            record = AdapterRecord(name=name, staged=staged, version=1)
        else:
            previous.staged, previous.version = staged, previous.version + 1
            previous.weight_scale = 1.0
            record = previous
        self.records[name] = record
        self.touch(record)
        return record

    def remove(self, name: str) -> AdapterRecord:
        record = self.get(name)
        if record.slot is not None:
            self.slot_owner[record.slot] = None
        del self.records[name]
        return record

    def touch(self, record: AdapterRecord) -> None:
        self._clock += 1
        record.last_used = self._clock

    def free_slot(self) -> int | None:
        """The first slot holding no adapter, or None."""
        return next((slot for slot, owner in enumerate(self.slot_owner) if owner is None), None)

    def pick_slot(self, protected: set[int], avoid: set[int] = frozenset()) -> int | None:
        """A free slot, else the least-recently-used slot outside ``protected`` and not pinned
        (preferring one outside ``avoid`` too), else None."""
        free = self.free_slot()
        if free is not None:
            return free
        for excluded in (protected | avoid, protected):
            candidates = [
                (self.records[owner].last_used, slot)
                for slot, owner in enumerate(self.slot_owner)
                if slot not in excluded and owner is not None and not self.records[owner].pinned
            ]
            if candidates:
                return min(candidates)[1]
        return None

    def vacate(self, slot: int) -> None:
        """Forget whatever ``slot`` held (its contents are no longer that adapter's)."""
        owner = self.slot_owner[slot]
        if owner is not None:
            self.records[owner].slot = None
            self.slot_owner[slot] = None

    def assign(self, record: AdapterRecord, slot: int) -> None:
        """Record that ``record`` now lives in ``slot``, evicting the previous owner's claim."""
        owner = self.slot_owner[slot]
        if owner is not None and owner != record.name:
            self.records[owner].slot = None
            self.evictions += 1
        if record.slot is not None and record.slot != slot:
            self.slot_owner[record.slot] = None
        self.slot_owner[slot] = record.name
        record.slot = slot
