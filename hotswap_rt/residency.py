"""Residency: which tier every adapter is in, and moving adapters up the tiers.

::

    disk --(read, validate, stage: outside the lock)--> host ring --(one copy_ per dtype)--> slot

:class:`Residency` is the only code that picks a device slot (:meth:`Residency._choose_slot`) and
the only caller of :meth:`~hotswap_rt.arena.SlotArena.write_slot`. It owns the registry
(records, slot table, LRU), the arena and the swap counters; pins and leases keep adapters in
their slots; a failed copy is repaired from the host row.

Locking: methods marked *under the mutation* run while the runtime holds its mutation (no
forward running, runtime lock held); :meth:`prepare` runs before it, without the lock (it may
wait for a background load or read a file); lease release takes the lock itself (from any
thread, e.g. Ray's ``__del__``).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

from .arena import SlotArena
from .config import AdapterInfo
from .errors import SlotsBusyError
from .registry import AdapterRecord, AdapterRegistry, Origin, next_weights_id
from .selection import Selector
from .staging import BackgroundLoads, StagedAdapter
from .stats import SwapStats

T = TypeVar("T")
Prestaged = dict[str, tuple[StagedAdapter, float]]  # name -> (re-read host row, seconds it took)


class AdapterLease:
    """Keeps one adapter in its device slot until released.

    ``release()`` is idempotent and thread-safe, and also runs when the lease is garbage
    collected (Ray Serve's multiplexing drops evicted models that way). Use as a context manager
    or call ``release()``. A lease on an adapter that was since unloaded releases nothing.
    """

    def __init__(self, residency: Residency, record: AdapterRecord) -> None:
        self._residency = residency
        self._record = record
        self._released = False
        self._guard = threading.Lock()
        self.name = record.name

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        with self._guard:
            if self._released:
                return
            self._released = True
        self._residency.release_lease(self._record)

    def __enter__(self) -> AdapterLease:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"AdapterLease({self.name!r}, released={self._released})"


class Residency:
    """Records, tiers and device slots of every adapter (see the module doc).

    Args:
        arena: the device slots.
        registry: records and the slot table.
        selector: what the selection reads (those slots are taken last, and repaired first).
        background: in-flight prefetches (waited for before an adapter is needed).
        restage: re-reads a disk-tier adapter from its origin (a staging function).
        lock: the runtime's lock (taken by :meth:`release_lease`).
        keep_factors: host entries of adapters with files keep their factors as read
            (:attr:`RuntimeConfig.keep_factors`); else only their rows.
    """

    def __init__(
        self,
        arena: SlotArena,
        registry: AdapterRegistry,
        selector: Selector,
        background: BackgroundLoads,
        restage: Callable[[Origin], StagedAdapter],
        lock: threading.RLock,
        keep_factors: bool = False,
    ) -> None:
        self.arena = arena
        self.registry = registry
        self.stats = SwapStats()
        self._selector = selector
        self._background = background
        self._read_origin = restage
        self._lock = lock
        self.keep_factors = keep_factors

    def get(self, name: str) -> AdapterRecord:
        """The record of ``name``. Raises :class:`UnknownAdapterError`."""
        return self.registry.get(name)

    def slot_and_scale(self, name: str) -> tuple[int, float]:
        """Where the selection finds ``name``: its slot and its weight factor (resident only)."""
        record = self.registry.records[name]
        assert record.slot is not None, f"{name!r} is selected but not device-resident"
        return record.slot, record.weight_scale

    # ------------------------------------------------------------- before the lock: slow work
    def prepare(self, names: list[str]) -> Prestaged:
        """Wait for in-flight prefetches of ``names``, surface their failures, and re-read
        disk-tier adapters. Runs without the lock.

        Raises:
            HotswapError: a background load of one of ``names`` failed, or a re-read fails.
        """
        for name in names:
            if not isinstance(name, str):  # refused by name (a list would fail as unhashable below)
                self.registry.get(name)
            self._background.wait(name)
        prestaged = {}
        for name in names:
            record = self.registry.records.get(name)
            if record is not None and record.staged is None and record.origin is not None:
                prestaged[name] = self.restage(record)
        return prestaged

    def restage(self, record: AdapterRecord) -> tuple[StagedAdapter, float]:
        """Read a disk-tier adapter again; its host row and the seconds it took.

        Raises:
            AdapterChangedError: its files changed since it was loaded (checked before and
                after the read).
        """
        start = time.perf_counter()
        staged = self.read_again(record, self._read_origin)
        return staged, time.perf_counter() - start

    @staticmethod
    def read_again(record: AdapterRecord, read: Callable[[Origin], T]) -> T:
        """``read(origin)`` of an adapter loaded from files, which must be the files it was
        loaded from.

        Raises:
            AdapterChangedError: its files changed since it was loaded (checked before and
                after the read).
        """
        assert record.origin is not None
        record.origin.check_unchanged(record.name)
        result = read(record.origin)
        record.origin.check_unchanged(record.name)  # not rewritten while it was read
        return result

    # ----------------------------------------------------------------- under the mutation
    def commit(
        self,
        name: str,
        staged: StagedAdapter,
        info: AdapterInfo,
        origin: Origin | None,
        *,
        use_free_slot: bool,
        trainable: bool = False,
        ordered: bool = True,
        copied: tuple[int, float] | None = None,
    ) -> AdapterRecord:
        """Register a staged adapter (new, or replacing ``name``; ``info`` its static description)
        and copy it into a slot when
        it replaces a resident adapter (into a shadow slot when one can be freed), when
        ``use_free_slot`` and a slot is free, or always when ``trainable`` (evicting an
        adapter the selection does not read: training needs its slot). ``ordered=False``: the
        caller runs this without the forward gate, for a slot no forward reads (see
        :meth:`SlotArena.write_slot`). ``copied``: ``(slot, seconds)`` of a copy the caller made
        into a slot it reserved (:meth:`reserve_slot`), which the adapter takes instead.

        Raises:
            SlotsBusyError: no host entry can take it, or ``trainable`` and no slot can be
                freed; before any change.
        """
        self.check_commit(name, trainable)
        if copied is not None:
            slot = copied[0]
            self.stats.record_swap(staged.nbytes, copied[1], "host")
        else:
            slot = self._commit_slot(name, use_free_slot, trainable)
            if slot is not None:
                self._copy_to_slot(slot, staged, ordered=ordered)
        record = self.registry.put(name, self._host_entry(staged, origin, trainable), info, origin)
        self._background.forget(name)
        if slot is not None:
            previous = record.slot
            self.registry.assign(record, slot)
            if previous is not None and previous != slot and previous in self._selector.selected_slots():
                self.registry.stale.add(previous)  # still served until the selection is written
        self.stats.loads += 1
        return record

    def _commit_slot(self, name: str, use_free_slot: bool, trainable: bool) -> int | None:
        """The slot :meth:`commit` of ``name`` copies into now (see there), or None."""
        old = self.registry.records.get(name)
        if old is not None and old.slot is not None:
            slot = self._shadow_slot(old)
            return old.slot if slot is None else slot
        if trainable:
            slot = self._choose_slot(protected=self._selector.selected_slots())
            assert slot is not None  # check_commit
            return slot
        return self.registry.free_slot() if use_free_slot else None

    def reserve_slot(self, name: str, use_free_slot: bool) -> int | None:
        """Choose the slot :meth:`commit` of ``name`` would copy into, one no forward reads (a
        shadow slot or a free one; the caller checked that it exists for a resident adapter),
        and keep every other change off it while the caller copies into it outside the lock
        (the adapter evicted from it, if any, leaves it now). None: it would take no slot.

        Raises:
            SlotsBusyError: no host entry can take ``name``.
        """
        self.check_commit(name)
        slot = self._commit_slot(name, use_free_slot, trainable=False)
        if slot is not None:
            self._reserve(slot)
        return slot

    def reserve_slot_to_activate(self, record: AdapterRecord) -> int | None:
        """For ``record`` (in the host ring, in no slot), about to be selected: reserve the slot
        :meth:`ensure_resident` would copy it into, when that is a slot the selection does not
        read (free, else the least-recently-used evictable one), so the caller can copy into
        it outside the gate while forwards go on (:meth:`adopt_copy` then, under the lock).
        The adapter evicted from it, if any, leaves it now. None: every slot it could take is
        read by the selection (the copy must wait for the forwards)."""
        slot = self._choose_slot(protected=set(self._selector.selected_slots()))
        if slot is not None:
            self._reserve(slot)
        return slot

    def _reserve(self, slot: int) -> None:
        """Keep every other change off ``slot`` (its adapter, if any, leaves it now)."""
        if self.registry.slot_owner[slot] is not None:
            self.registry.vacate(slot)
            self.registry.evictions += 1
        self.registry.reserved.add(slot)

    def adopt_copy(self, record: AdapterRecord, slot: int, seconds: float) -> None:
        """Under the lock: ``record`` now lives in reserved ``slot``, into which its host row
        was copied in ``seconds`` (:meth:`reserve_slot_to_activate`; the caller releases the
        reservation)."""
        assert record.staged is not None and slot in self.registry.reserved
        self.stats.record_swap(record.staged.nbytes, seconds, "host")
        self.registry.touch(record)
        self.registry.assign(record, slot)
        self.stats.hits["host"] += 1

    def release_reserved(self, slot: int, written: bool) -> None:
        """Give a reserved slot back (after its commit, or ``written=False`` when the copy
        into it failed: its contents are then unknown)."""
        if not written:
            self.arena.mark_unknown(slot)
        self.registry.reserved.discard(slot)

    def shadow_slot_for(self, name: str) -> bool:
        """Whether replacing resident adapter ``name`` now would copy into another slot (one
        the selection does not read), leaving the one it is served from untouched."""
        return self._shadow_slot(self.registry.records[name]) is not None

    def _shadow_slot(self, old: AdapterRecord) -> int | None:
        """A slot resident ``old``'s replacement can take while ``old`` stays served (outside
        the selection and ``old``'s own slot), or None."""
        assert old.slot is not None
        return self._choose_slot(protected=self._selector.selected_slots() | {old.slot})

    def selection_written(self) -> None:
        """After a selection write: release the stale slots it no longer reads."""
        if self.registry.stale:
            self.registry.stale &= self._selector.selected_slots()

    def check_commit(self, name: str, trainable: bool = False) -> None:
        """Raise what :meth:`commit` of ``name`` would raise before any change, as things
        stand now (a lazy runtime asks before it injects layers for the adapter).

        Raises:
            SlotsBusyError: no host entry can take it, or ``trainable`` and no slot can be freed.
        """
        self.registry.check_room(name)
        old = self.registry.records.get(name)
        if trainable and (old is None or old.slot is None) and self._choose_slot(
                protected=self._selector.selected_slots()) is None:
            raise SlotsBusyError(
                f"no device slot can take trainable adapter {name!r}: every slot is read "
                f"by the current selection, pinned, leased or trained"
            )

    def ensure_resident(
        self, records: list[AdapterRecord], prestaged: Prestaged, replaces_selection: bool = False
    ) -> None:
        """Give every record a device slot. The slots the selection tensors read are taken only
        when the caller is about to replace the selection.

        Raises:
            SlotsBusyError: they cannot all fit; before any copy.
        """
        registry, hits = self.registry, self.stats.hits
        if len(records) == 1 and records[0].slot is not None:  # a switch to one resident adapter
            registry.touch(records[0])
            hits["device"] += 1
            return
        protected: set[int] = set()
        missing: list[AdapterRecord] = []
        for record in records:  # one loop: this runs on every swap and switch
            if record.slot is None:
                missing.append(record)
            else:
                protected.add(record.slot)
        if not replaces_selection:
            protected |= self._selector.selected_slots()
        if len(missing) > 1:  # one alone: its slot is chosen (or refused) below, before any change
            reusable = registry.reusable_slots(protected)
            if len(missing) > len(reusable):
                raise self._slots_busy(missing, len(reusable))
        for record in records:
            registry.touch(record)
        hits["device"] += len(records) - len(missing)
        for record in missing:
            slot = self._choose_slot(protected)
            if slot is None:  # only with one missing record (more are counted above)
                raise self._slots_busy(missing, 0)
            tier, extra = "host", 0.0
            if record.staged is None:
                tier = "disk"
                staged, extra = prestaged.get(record.name) or self.restage(record)
                self.registry.make_room(record.name, {r.name for r in records})
                record.staged = self._host_entry(staged, record.origin)
            self._copy_to_slot(slot, record.staged, tier, extra)
            registry.assign(record, slot)
            protected.add(slot)
            hits[tier] += 1

    def _host_entry(self, staged: StagedAdapter, origin: Origin | None,
                    trainable: bool = False) -> StagedAdapter:
        """What the host ring keeps of ``staged``: without its factors when its files can be
        read again for ``save`` (an origin) and the runtime does not keep them."""
        if origin is None or trainable or self.keep_factors or staged.adapter is None:
            return staged
        return staged.without_factors()

    def _slots_busy(self, missing: list[AdapterRecord], free: int) -> SlotsBusyError:
        return SlotsBusyError(
            f"cannot make {[r.name for r in missing]} device-resident: only {free} "
            f"of {len(self.registry.slot_owner)} device slots are free or hold an adapter that "
            f"is not pinned, leased, trained or needed by this selection"
        )

    def rewrite(self, record: AdapterRecord, staged: StagedAdapter) -> None:
        """Replace a resident adapter's host row and copy it into its own slot (``freeze``)."""
        assert record.slot is not None
        record.staged = staged
        self._copy_to_slot(record.slot, staged)

    def remove(self, name: str) -> AdapterRecord:
        """Forget ``name``: its slot and host entry become free."""
        record = self.registry.remove(name)
        self._background.forget(name)
        return record

    def pin(self, record: AdapterRecord, pinned: bool = True) -> None:
        """Keep ``record`` in its slot (or, ``pinned=False``, let its slot be reused again)."""
        record.pinned = pinned

    def set_training(self, record: AdapterRecord, scaling: float | None) -> None:
        """Mark ``record`` trained with ``scaling`` applied through its selection weight (its
        slot holds B unscaled and is never evicted), or (None) an ordinary adapter again."""
        record.training = scaling is not None
        record.weight_scale = 1.0 if scaling is None else scaling
        record.weights_id = next_weights_id()  # trained weights are other weights

    def lease(self, record: AdapterRecord) -> AdapterLease:
        """A lease on a resident ``record`` (call :meth:`ensure_resident` first)."""
        record.leases += 1
        return AdapterLease(self, record)

    def release_lease(self, record: AdapterRecord) -> None:
        """Any thread: one lease fewer (nothing if ``record`` was unloaded meanwhile)."""
        with self._lock:
            if self.registry.records.get(record.name) is record and record.leases > 0:
                record.leases -= 1

    # ------------------------------------------------------------------------------ internals
    def _choose_slot(self, protected: set[int]) -> int | None:
        """The slot policy: a free slot, else the least-recently-used slot whose adapter may be
        evicted, outside ``protected``, preferring one the running selection does not read (no
        waiting for forwards, and a failed copy leaves what is served intact); None if none."""
        return self.registry.pick_slot(protected, avoid=self._selector.selected_slots())

    def _copy_to_slot(
        self, slot: int, staged: StagedAdapter, tier: str = "host", extra_seconds: float = 0.0,
        ordered: bool = True,
    ) -> None:
        """Copy a staged row into ``slot``; repair the slot if the copy fails, then re-raise."""
        try:
            seconds = self.arena.write_slot(slot, staged.rows, ordered)
        except BaseException:
            self.arena.mark_unknown(slot)
            self._recover_slot(slot)
            raise
        self.stats.record_swap(staged.nbytes, seconds + extra_seconds, tier)

    def _recover_slot(self, slot: int) -> None:
        """After a failed copy into ``slot``: if the selection reads it, copy its owner back from
        the host; otherwise (or if that fails too) the slot no longer holds its owner, and the
        selection drops it."""
        owner = self.registry.slot_owner[slot]
        if owner is not None and slot in self._selector.selected_slots():
            staged = self.registry.records[owner].staged
            try:
                assert staged is not None  # device-resident adapters keep their host row
                self.arena.write_slot(slot, staged.rows)
                return
            except Exception:
                self._selector.drop(owner)
        self.registry.vacate(slot)
        self._selector.write(self.slot_and_scale)
        self.selection_written()
