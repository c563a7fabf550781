"""The residency half of :class:`~hotswap_rt.runtime.HotswapRuntime`: moving adapters up the tiers.

::

    disk --(read, validate, stage: outside the lock)--> host ring --(one copy_ per dtype)--> slot

Activation, ``lease`` and ``pin`` bring adapters into device slots. Slow work (waiting for a
prefetch, re-reading a disk-tier adapter) happens before the runtime lock is taken; the lock is
held only for bookkeeping and the slot copies, and every change waits for running forwards first
(the forward gate), so a forward never sees a slot or the selection mid-change.

A mixin so that ``runtime.py`` stays readable; it uses the runtime's registry, arena, gate,
stats and lock.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from .config import AdapterInfo
from .errors import HotswapError, SlotsBusyError
from .registry import AdapterRecord

if TYPE_CHECKING:
    from concurrent.futures import Future

    from .arena import StagedAdapter


class AdapterLease:
    """Keeps one adapter in its device slot until released.

    ``release()`` is idempotent and thread-safe, and also runs when the lease is garbage
    collected (Ray Serve's multiplexing drops evicted models that way). Use as a context manager
    or call ``release()``. A lease on an adapter that was since unloaded releases nothing.
    """

    def __init__(self, runtime: ResidencyMixin, record: AdapterRecord) -> None:
        self._runtime = runtime
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
        self._runtime._release_lease(self._record)

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


class ResidencyMixin:
    """``pin``, ``unpin``, ``lease`` and the machinery that makes adapters device-resident."""

    _pending: dict[str, Future]
    _failed: dict[str, HotswapError]

    # ------------------------------------------------------------------------------ public
    def pin(self, name: str) -> AdapterInfo:
        """Bring ``name`` into a device slot and keep it there until :meth:`unpin`."""
        prestaged = self._prepare([name])
        with self._mutation():
            record = self.registry.get(name)
            self._ensure_resident([record], prestaged)
            record.pinned = True
            return self._info(record)

    def unpin(self, name: str) -> AdapterInfo:
        """Let ``name``'s slot be reused again (least-recently-used)."""
        with self._lock:
            record = self.registry.get(name)
            record.pinned = False
            return self._info(record)

    def lease(self, name: str) -> AdapterLease:
        """Bring ``name`` into a device slot and keep it there while the lease is held.

        Raises:
            SlotsBusyError: every slot is pinned, leased or read by the current selection.
        """
        prestaged = self._prepare([name])
        with self._mutation():
            record = self.registry.get(name)
            self._ensure_resident([record], prestaged)
            record.leases += 1
            return AdapterLease(self, record)

    def _release_lease(self, record: AdapterRecord) -> None:
        with self._lock:
            if self.registry.records.get(record.name) is record and record.leases > 0:
                record.leases -= 1

    # ------------------------------------------------------------- before the lock: slow work
    def _prepare(self, names: list[str]) -> dict[str, tuple[StagedAdapter, float]]:
        """Wait for in-flight prefetches of ``names``, surface their failures, and re-read
        disk-tier adapters (staged row, seconds it took). Runs without the lock."""
        for name in names:
            future = self._pending.get(name)
            error = future.exception() if future is not None else None  # waits for it
            with self._lock:
                if future is not None and self._pending.get(name) is future:
                    del self._pending[name]  # consumed here, before its done-callback ran
                    failure = error if isinstance(error, HotswapError) else None
                else:
                    failure = self._failed.pop(name, None)
            if failure is not None:
                raise HotswapError(f"background load of {name!r} failed: {failure}") from failure
        prestaged = {}
        for name in names:
            record = self.registry.records.get(name)
            if record is not None and record.staged is None and record.origin is not None:
                prestaged[name] = self._restage(record)
        return prestaged

    def _restage(self, record: AdapterRecord) -> tuple[StagedAdapter, float]:
        start = time.perf_counter()
        origin = record.origin
        assert origin is not None
        staged = self._read_and_stage(
            origin.directory, None, None, origin.allow_pickle, origin.allow_nonfinite
        )
        return staged, time.perf_counter() - start

    # ----------------------------------------------------------------- under the lock: copies
    def _ensure_resident(
        self,
        records: list[AdapterRecord],
        prestaged: dict[str, tuple[StagedAdapter, float]],
        replaces_selection: bool = False,
    ) -> None:
        """Give every record a device slot (inside a mutation). The slots the selection tensors
        read are taken only when the caller is about to replace the selection. Raises
        :class:`SlotsBusyError` before any copy when they cannot all fit."""
        protected = {r.slot for r in records if r.slot is not None}
        if not replaces_selection:
            protected |= self._selected_slots()
        missing = [r for r in records if r.slot is None]
        reusable = self.registry.reusable_slots(protected)
        if len(missing) > len(reusable):
            raise SlotsBusyError(
                f"cannot make {[r.name for r in missing]} device-resident: only {len(reusable)} "
                f"of {len(self.registry.slot_owner)} device slots are free or hold an adapter that "
                f"is not pinned, leased, trained or needed by this selection"
            )
        keep = {r.name for r in records}
        for record in records:
            self.registry.touch(record)
            if record.slot is not None:
                self._stats.hits["device"] += 1
        for record in missing:
            tier, extra = "host", 0.0
            if record.staged is None:
                tier = "disk"
                staged, extra = prestaged.get(record.name) or self._restage(record)
                self.registry.make_room(record.name, keep)
                record.staged = staged
            # Prefer a slot the running selection does not read: no waiting for forwards, and a
            # failed copy leaves what is being served intact.
            slot = self.registry.pick_slot(protected, avoid=self._selected_slots())
            assert slot is not None  # counted above
            self._copy_to_slot(slot, record.staged, tier, extra)
            self.registry.assign(record, slot)
            protected.add(slot)
            self._stats.hits[tier] += 1

    def _slot_for_load(self, old: AdapterRecord | None, use_free_slot: bool) -> int | None:
        """Where a load copies to: for a replacement of a resident adapter a different (shadow)
        slot if one can be freed, else its own slot; otherwise a free slot, if wanted."""
        if old is None or old.slot is None:
            return self.registry.free_slot() if use_free_slot else None
        protected = self._selected_slots() | {old.slot}
        shadow = self.registry.pick_slot(protected)
        return shadow if shadow is not None else old.slot

    def _selected_slots(self) -> set[int]:
        """Slots the selection tensors currently give a non-zero weight: what forwards read."""
        return {slot for row in self._written or [] for slot, weight in row.items() if weight}

    def _copy_to_slot(
        self, slot: int, staged: StagedAdapter, tier: str = "host", extra_seconds: float = 0.0
    ) -> None:
        """Copy a staged row into ``slot`` (inside a mutation); repair the slot if it fails."""
        try:
            seconds = self.arena.write_slot(slot, staged)
        except BaseException:
            self._recover_slot(slot)
            raise
        self._stats.record_swap(staged.nbytes, seconds + extra_seconds, tier)

    def _recover_slot(self, slot: int) -> None:
        """After a failed copy into ``slot``: if the selection reads it, copy its owner back from
        the host; otherwise (or if that fails too) the slot no longer holds its owner."""
        owner = self.registry.slot_owner[slot]
        if owner is not None and slot in self._selected_slots():
            staged = self.registry.records[owner].staged
            try:
                assert staged is not None  # device-resident adapters keep their host row
                self.arena.write_slot(slot, staged)
                return
            except Exception:
                self._rows = [{n: w for n, w in row.items() if n != owner} for row in self._rows]
        self.registry.vacate(slot)
        self._write_selection()
