"""Which adapters the runtime knows, in which tier each one is, and which device slot holds what.

Three tiers per adapter::

    disk    only its origin (directory + load options) is kept; activation reads it again
    host    its staged slot row is in the host ring (at most ``host_slots`` adapters)
    device  it also sits in a device slot (at most ``device_slots`` adapters)

A device-resident adapter keeps its host row (a failed copy can always be repaired from it). Both
tiers evict least-recently-used first, never a pinned or leased adapter, and the host ring only
drops adapters it can read again (loaded from a directory or the Hub cache). The registry is
bookkeeping only; :mod:`hotswap_rt.residency` decides and does the copies.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from .staging import StagedAdapter
from .config import AdapterInfo
from .errors import AdapterChangedError, SlotsBusyError, UnknownAdapterError
from .peft_format import FileStamp, changed_files

# Numbers the weights served under a name (AdapterRecord.weights_id); never reused in a process.
_weights_ids = itertools.count(1)


def next_weights_id() -> int:
    """A number no weights of this process had before."""
    return next(_weights_ids)


@dataclass(frozen=True)
class Origin:
    """Where an adapter can be read again, with which load options, and the stamp of the files
    it was read from (:func:`adapter_files_stamp`, taken before the read and checked after it)."""

    directory: Path
    allow_pickle: bool = False
    allow_nonfinite: bool = False
    stamp: tuple[FileStamp, ...] = ()

    @staticmethod
    def of(staged: StagedAdapter, allow_pickle: bool, allow_nonfinite: bool,
           stamp: tuple[FileStamp, ...]) -> Origin | None:
        """Where a directory-loaded adapter can be read again (its source is the resolved
        directory), ``stamp`` the files' stamp, taken before they were read and found again
        after; None for one that has no file."""
        source = staged.adapter.source
        if source is None:
            return None
        return Origin(Path(source), allow_pickle, allow_nonfinite, stamp)

    def check_unchanged(self, name: str) -> None:
        """Raise unless the directory still holds the files adapter ``name`` was loaded from:
        reading other files back would silently serve other weights under its name.

        Raises:
            AdapterChangedError: naming the files that changed.
        """
        changed = changed_files(self.directory, self.stamp)
        if changed:
            raise AdapterChangedError(
                f"adapter {name!r}: {changed} in {self.directory} changed (or appeared, or went) "
                f"since it was loaded, and only those files held it (it had dropped to the disk "
                f"tier): load it again with replace=True to use the files as they are now, or "
                f"unload it")


@dataclass
class AdapterRecord:
    """One known adapter.

    Attributes:
        staged: its host ring entry, or None when only on disk.
        info: its static description (tier, version and trainable are filled in on report).
        origin: where to read it again; None for adapters without a file (state_dict, new).
        weight_scale: multiplies its selection weight (a trainable adapter's scaling, which its
            slot does not fold into B; 1.0 otherwise).
        pinned: never evicted from its device slot (``rt.pin``).
        leases: outstanding ``rt.lease`` handles; a leased adapter is never evicted.
        training: it is the trainable adapter (its slot is its only up-to-date copy).
        weights_id: names the weights it serves: new at each load, replacement and change of
            ``training`` (what a KV prefix computed with it is keyed on), never reused.
    """

    name: str
    staged: StagedAdapter | None
    info: AdapterInfo
    version: int
    origin: Origin | None = None
    slot: int | None = None
    last_used: int = 0
    weight_scale: float = 1.0
    pinned: bool = False
    leases: int = 0
    training: bool = False
    weights_id: int = field(default_factory=next_weights_id)

    @property
    def tier(self) -> str:
        return "device" if self.slot is not None else "host" if self.staged is not None else "disk"

    @property
    def evictable(self) -> bool:
        return not self.pinned and self.leases == 0 and not self.training


class AdapterRegistry:
    """Records by name, the device slot table, LRU bookkeeping for both tiers."""

    def __init__(self, host_slots: int, device_slots: int) -> None:
        self.host_slots = host_slots
        self.records: dict[str, AdapterRecord] = {}
        self.slot_owner: list[str | None] = [None] * device_slots
        # Slots no record owns that the selection tensors still read: an adapter replaced into a
        # shadow slot before the selection followed it. Not reused until a selection write stops
        # reading them (Residency.selection_written).
        self.stale: set[int] = set()
        # Slots a commit is copying into outside the runtime lock (Residency.reserve_slot).
        self.reserved: set[int] = set()
        self.evictions = 0  # device slot reuses
        self.host_evictions = 0  # host ring entries dropped to the disk tier
        self._clock = 0

    def get(self, name: str) -> AdapterRecord:
        record = self.records.get(name) if isinstance(name, str) else None  # a list is unhashable
        if record is None:
            known = sorted(self.records) or "none"
            raise UnknownAdapterError(f"no adapter named {name!r} is loaded (loaded: {known})")
        return record

    # -- host ring -----------------------------------------------------------------------------
    def host_count(self) -> int:
        return sum(1 for record in self.records.values() if record.staged is not None)

    def host_victim(self, keep: set[str]) -> AdapterRecord | None:
        """The least-recently-used host entry that may drop to disk (not in a device slot, not
        pinned or leased, readable again, not in ``keep``), or None."""
        candidates = [
            r for r in self.records.values()
            if r.staged is not None and r.slot is None and r.evictable and r.origin is not None
            and r.name not in keep
        ]
        return min(candidates, key=lambda r: r.last_used, default=None)

    def check_room(self, name: str, keep: set[str] = frozenset()) -> None:
        """Raise unless ``name`` already has a host entry, one is free, or one can be dropped."""
        record = self.records.get(name)
        if record is not None and record.staged is not None:
            return
        if self.host_count() < self.host_slots or self.host_victim(keep | {name}) is not None:
            return
        raise SlotsBusyError(
            f"cannot stage adapter {name!r}: all host_slots={self.host_slots} entries hold "
            f"adapters that are device-resident, pinned, leased or have no file to re-read (loaded "
            f"from state_dict=, made by add_adapter, or trained: their values are not in a file) "
            f"({sorted(r.name for r in self.records.values() if r.staged is not None)}); "
            f"unload one or raise RuntimeConfig.host_slots"
        )

    def make_room(self, name: str, keep: set[str] = frozenset()) -> None:
        """Drop LRU host entries to the disk tier until ``name`` fits (after :meth:`check_room`)."""
        record = self.records.get(name)
        if record is not None and record.staged is not None:
            return
        while self.host_count() >= self.host_slots:
            victim = self.host_victim(keep | {name})
            if victim is None:
                self.check_room(name, keep)  # raises with the explanation
                return
            victim.staged = None
            self.host_evictions += 1

    def put(self, name: str, staged: StagedAdapter, info: AdapterInfo,
            origin: Origin | None) -> AdapterRecord:
        """Insert or replace ``name``; a replacement keeps its slot and bumps its version."""
        self.make_room(name)
        previous = self.records.get(name)
        if previous is None:
            record = AdapterRecord(name=name, staged=staged, info=info, version=1, origin=origin)
        else:
            record = previous
            record.staged, record.info, record.origin = staged, info, origin
            record.version += 1
            record.weight_scale = 1.0
            record.weights_id = next_weights_id()
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

    # -- device slots --------------------------------------------------------------------------
    def free_slot(self) -> int | None:
        """The first slot holding no adapter (and not :meth:`unusable`), or None."""
        free = (slot for slot, owner in enumerate(self.slot_owner) if owner is None and not self.unusable(slot))
        return next(free, None)

    def unusable(self, slot: int) -> bool:
        """Whether ``slot`` is :attr:`stale` or :attr:`reserved` (taken by no other change; both
        are owned by no record)."""
        return slot in self.stale or slot in self.reserved

    def reusable_slots(self, protected: set[int]) -> list[int]:
        """Slots that are free or hold an evictable adapter, outside ``protected``."""
        return [
            slot for slot, owner in enumerate(self.slot_owner)
            if slot not in protected and not self.unusable(slot)
            and (owner is None or self.records[owner].evictable)
        ]

    def pick_slot(self, protected: set[int], avoid: set[int] = frozenset()) -> int | None:
        """A free slot (the first), else the least-recently-used evictable slot outside
        ``protected`` (preferring one outside ``avoid`` too), else None. One pass over the
        slot table: this runs on every swap."""
        best: tuple[int, int] | None = None  # (last_used, slot) outside protected and avoid
        fallback: tuple[int, int] | None = None  # the same, in avoid
        for slot, owner in enumerate(self.slot_owner):
            if owner is None:
                if self.unusable(slot):
                    continue
                return slot
            if slot in protected:
                continue
            record = self.records[owner]
            if not record.evictable:
                continue
            candidate = (record.last_used, slot)
            if slot in avoid:
                fallback = candidate if fallback is None or candidate < fallback else fallback
            elif best is None or candidate < best:
                best = candidate
        chosen = best if best is not None else fallback
        return None if chosen is None else chosen[1]

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
