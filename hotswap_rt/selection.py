"""Selection tensors: which device slots a forward reads and with what weight, per batch row; and
the :class:`Selector`, which keeps the selection by adapter name and writes those tensors.

::

    active_slots: int64   [k]              slot index of each of the k active positions
    row_weights:  float32 [max_batch, k]   weight of active position j in batch row b (0 = off)
    row_slots:    int64   [max_batch, m]   the slots row b combines (m = max per row)
    row_slot_weights: float32 [max_batch, m]  their weights (0 = unused)
    row_on, row_slot_on: bool, the same shapes  which of those weights are not 0

The first two serve layers that multiply every row by all k active slots (stacked); the last
two serve layers that gather only each row's own m slots (per row, when m < k).

With *in-place* reads (``RuntimeConfig.slot_reads``) the k positions are the S device slots
themselves: ``active_slots = arange(S)`` for life and ``row_weights[b, s]`` is slot ``s``'s weight,
so layers read the arena as it lies, without gathering the active slots first.

All of them (and ``row_count``) are views of one byte buffer, so a write is one ``copy_`` of a
host image of the whole selection (one host-to-device copy on an accelerator).

The compiled graph reads these tensors; this module only ever writes them in place (``copy_``), so
the graph never sees a new Python object and never recompiles on a switch. Unused positions point
at slot 0 with weight 0 and are off: layers take an exact 0 there, not 0 times the product (finite
factors whose product with x overflows would give inf * 0 = NaN).
"""

from __future__ import annotations

import math
from array import array
from typing import Callable, Mapping, Sequence

import torch

from .errors import SelectionError

RowSpec = Mapping[int, float]  # slot index -> weight, for one batch row
FLOAT32_MAX = torch.finfo(torch.float32).max  # the selection weights' dtype
assert array("q").itemsize == 8 and array("f").itemsize == 4  # host images: int64, float32
Activation = str | Mapping[str, float] | None  # what rt.activate takes for one row


def row_spec(spec: Activation) -> dict[str, float]:
    """An activation for one row as ``{name: weight}``."""
    if isinstance(spec, str):
        return {spec: 1.0}
    if isinstance(spec, Mapping):
        row: dict[str, float] = {}
        for name, weight in spec.items():
            if not isinstance(name, str):
                raise SelectionError(f"adapter names must be str, got {name!r}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                math.isfinite(weight)
            ):
                raise SelectionError(f"weight of {name!r} must be a finite number, got {weight!r}")
            row[name] = float(weight)
        return row
    raise SelectionError(f"an activation is a name, a {{name: weight}} dict or None, got {spec!r}")


def _used(row: Mapping[object, float]) -> list[object]:
    """The adapters (or slots) one row spec gives a non-zero weight."""
    return [key for key, weight in row.items() if weight != 0.0]


class Selection:
    """The two tensors the LoRA slot layers read, and the code that writes them."""

    def __init__(self, max_batch_size: int, max_active: int, device: torch.device,
                 max_per_row: int | None = None, in_place_slots: int | None = None,
                 rank_buckets: Sequence[int] = (), overflow_stacked: bool = False,
                 per_row_at_compile: bool = False, per_row_decode_reduce: bool = False) -> None:
        self.max_batch_size = max_batch_size
        # one-token steps of the per-row product read the slots in place (RuntimeConfig.per_row_decode)
        self.per_row_decode_reduce = per_row_decode_reduce
        # The ranks layers multiply (a plain int: dynamo guards on it, one graph per bucket).
        self.rank_buckets = tuple(rank_buckets)
        self.rank_bucket: int | None = self.rank_buckets[-1] if self.rank_buckets else None
        self.max_active = max_active
        self.max_per_row = max_active if max_per_row is None else max_per_row
        # per_row_at_compile (RuntimeConfig's auto): the per-row product, with a stacked
        # overflow, only once rt.compile calls enable_per_row (it compiles both graphs)
        self.per_row_at_compile = per_row_at_compile and self.max_per_row < max_active
        self.per_row_capable = self.max_per_row < max_active and not self.per_row_at_compile
        # a row combining more than max_per_row adapters runs the stacked product (else: refused)
        self.overflow_stacked = overflow_stacked and self.per_row_capable
        # Whether layers gather each row's own slots (a plain bool: dynamo guards on it; it
        # follows the selection only with overflow_stacked, one graph each).
        self.per_row = self.per_row_capable
        # What the written selection needs (rank bucket, per-row path); the layers read
        # rank_bucket / per_row, which equal these except while rt.compile's warm-up holds a
        # graph variant (use_variant): then every forward takes that variant's graph, whatever
        # selections the warm-up writes.
        self._needed: tuple[int | None, bool] = (self.rank_bucket, self.per_row)
        self._variant: tuple[int | None, bool] | None = None
        # On CUDA each write's host values are pinned and copied without blocking: a pageable
        # copy_ waits for every queued forward (cudaStreamSynchronize) before it returns.
        # The copies queue behind those forwards on the same stream, which read the old values.
        self.pinned_writes = device.type == "cuda"
        self.in_place = in_place_slots is not None  # positions are the slots: no gather
        positions = in_place_slots if in_place_slots is not None else max_active
        self.positions = positions
        fields = _fields(max_batch_size, positions, self.max_per_row)
        self.packed = torch.zeros(_packed_nbytes(fields), dtype=torch.uint8, device=device)
        self._offsets = _packed_offsets(fields)
        views = _packed_views(self.packed, fields, self._offsets)
        self.active_slots = views["active_slots"]
        self.row_weights = views["row_weights"]
        self.row_slots = views["row_slots"]
        self.row_slot_weights = views["row_slot_weights"]
        # which weights are not 0, kept beside them: layers select h * w where a weight is on
        # and an exact 0 elsewhere (an unused position's h may be inf: inf * 0 is NaN)
        self.row_on = views["row_on"]
        self.row_slot_on = views["row_slot_on"]
        self.zero = views["zero"]  # the 0 selected where a weight is off
        # Rows the selection was written for (1: uniform): MoE experts see the batch flattened
        # to tokens and map token t of N to row t * row_count // N (hotswap_rt.experts).
        self.row_count = views["row_count"]
        self.active_slots.copy_(torch.arange(positions))
        self.row_count.fill_(1)
        # selection (rows, per_row_capable) -> its host image and path (see write)
        self._plans: dict[tuple, tuple[torch.Tensor, bool]] = {}

    def enable_per_row(self, enabled: bool = True) -> None:
        """Turn the per-row product (with a stacked overflow) on or back off, for a selection
        built with ``per_row_at_compile`` (rt.compile, before it compiles both graphs). The
        caller writes the selection again next."""
        assert self.per_row_at_compile
        self.per_row_capable = self.overflow_stacked = enabled
        self._needs(self._needed[0], self.per_row_capable)

    def use_variant(self, variant: tuple[int | None, bool] | None) -> None:
        """Make every forward take the graph of ``(rank_bucket, per_row)`` until called with
        None, which returns to what the written selection needs (rt.compile's warm-up)."""
        self._variant = variant
        self.rank_bucket, self.per_row = variant if variant is not None else self._needed

    def needs_bucket(self, rank_bucket: int | None) -> None:
        """Record the rank bucket the written selection needs (held back while a variant is
        used)."""
        self._needs(rank_bucket, self._needed[1])

    @property
    def needed_bucket(self) -> int | None:
        return self._needed[0]

    def _needs(self, rank_bucket: int | None, per_row: bool) -> None:
        self._needed = (rank_bucket, per_row)
        if self._variant is None:
            self.rank_bucket, self.per_row = self._needed

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the graph reads, by name."""
        return {"active_slots": self.active_slots, "row_weights": self.row_weights,
                "row_slots": self.row_slots, "row_slot_weights": self.row_slot_weights,
                "row_on": self.row_on, "row_slot_on": self.row_slot_on, "row_count": self.row_count,
                "zero": self.zero}

    def check_rows(self, rows: Sequence[Mapping[object, float]]) -> None:
        """Raise unless no row combines more than ``max_per_row`` adapters (per-row mode
        without ``overflow_stacked`` only: otherwise :meth:`check`'s limit on distinct adapters
        is the tighter one)."""
        if not self.per_row_capable or self.overflow_stacked:
            return
        for b, row in enumerate(rows):
            used = _used(row)
            if len(used) > self.max_per_row:
                raise SelectionError(
                    f"row {b} combines {len(used)} adapters {used} but "
                    f"RuntimeConfig.max_adapters_per_row={self.max_per_row}"
                )

    def check(self, num_rows: int, adapters: Sequence[object]) -> None:
        """Raise unless ``num_rows`` rows over these distinct ``adapters`` fit the tensors."""
        if num_rows > self.max_batch_size:
            raise SelectionError(
                f"{num_rows} rows exceed RuntimeConfig.max_batch_size={self.max_batch_size}"
            )
        if len(adapters) > self.max_active:
            raise SelectionError(
                f"{len(adapters)} adapters {list(adapters)} requested at once but "
                f"RuntimeConfig.max_active_adapters={self.max_active}"
            )

    def write(self, rows: Sequence[RowSpec], rows_key: tuple | None = None,
              rank_bucket: int | None | bool = False) -> None:
        """Write a selection: ``rows[b]`` maps slot -> weight for batch row ``b``.

        A single row spec applies to every row of any batch (uniform activation); otherwise rows
        beyond ``len(rows)`` get no adapter. The host image a selection writes is kept for the
        next write of the same selection (switching between the same few selections then
        builds nothing).

        No ``torch.no_grad()`` needed (~2 us): these tensors never require grad.

        Args:
            rows_key: ``tuple(tuple(row.items()) for row in rows)``, when the caller has it.
            rank_bucket: the rank bucket the selection needs (:meth:`needs_bucket`), recorded
                with the write; False: keep the one recorded.

        Raises:
            SelectionError: more distinct slots than ``max_active``, more rows than
                ``max_batch_size`` (before any write).
        """
        if rows_key is None:
            rows_key = tuple(tuple(row.items()) for row in rows)
        key = (rows_key, self.per_row_capable)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(rows)  # validates
            if len(self._plans) >= 256:
                self._plans.clear()
            self._plans[key] = plan
        image, per_row = plan
        # A dispatched copy_, not a memcpy into the buffer's memory (~2 us less warm, ~13 us
        # less with the caches cold, ad hoc): copy_ releases the GIL, and without that a thread
        # switching in a loop starved other threads' forwards and loads (the concurrency test
        # in tests/test_residency.py: 15-22 forwards in 5 s against 150-200).
        self.packed.copy_(image, non_blocking=self.pinned_writes)
        self._needs(self._needed[0] if rank_bucket is False else rank_bucket, per_row)

    def _plan(self, rows: Sequence[RowSpec]) -> tuple[torch.Tensor, bool]:
        """Validate ``rows``; the host image of the packed buffer that writes them (the per-row
        fields zero when the selection runs stacked) and whether it runs per row.

        The image is built as flat Python lists packed by :mod:`array` (element-wise tensor
        writes cost ~us apiece, ``torch.tensor`` of a list several times ``array``); a single
        row spec is repeated over every row."""
        slots = sorted({slot for row in rows for slot, weight in row.items() if weight != 0.0})
        self.check(len(rows), slots)
        self.check_rows(rows)
        position = {slot: slot if self.in_place else j for j, slot in enumerate(slots)}
        positions, width = self.positions, self.max_per_row
        repeat = self.max_batch_size if len(rows) == 1 else 1  # uniform: row 0 into every row
        weights = [0.0] * (len(rows) * positions)
        for b, row in enumerate(rows):
            for slot, weight in row.items():
                if weight != 0.0:
                    weights[b * positions + position[slot]] = weight
        image = bytearray(self.packed.numel())  # zeros: rows beyond len(rows), unused fields
        # in place: arange(S) for life; else the active slots, unused positions at slot 0
        active = list(range(positions)) if self.in_place else slots + [0] * (self.max_active - len(slots))
        self._put(image, "active_slots", array("q", active))
        self._put(image, "row_count", array("q", [len(rows)]))
        self._put(image, "row_weights", array("f", weights * repeat))
        self._put(image, "row_on", array("b", [weight != 0.0 for weight in weights] * repeat))
        per_row = self.per_row_capable
        if self.overflow_stacked:  # the stacked graph for a selection some row overflows
            per_row = all(len(_used(row)) <= self.max_per_row for row in rows)
        if per_row:  # only per-row layers read these
            row_slots = [0] * (len(rows) * width)
            row_slot_weights = [0.0] * (len(rows) * width)
            for b, row in enumerate(rows):
                used = [(slot, weight) for slot, weight in row.items() if weight != 0.0]
                for j, (slot, weight) in enumerate(used):
                    row_slots[b * width + j] = slot
                    row_slot_weights[b * width + j] = weight
            self._put(image, "row_slots", array("q", row_slots * repeat))
            self._put(image, "row_slot_weights", array("f", row_slot_weights * repeat))
            self._put(image, "row_slot_on", array("b", [weight != 0.0 for weight in row_slot_weights] * repeat))
        image = torch.frombuffer(image, dtype=torch.uint8)
        assert image.numel() == self.packed.numel()
        if self.pinned_writes:  # never written after this, so safe to copy without blocking
            image = image.pin_memory()
        return image, per_row

    def _put(self, image: bytearray, field: str, values: array) -> None:
        """Write ``values`` (native int64 / float32) at the start of ``field`` in ``image``."""
        start = self._offsets[field]
        image[start : start + len(values) * values.itemsize] = values.tobytes()

    @torch.no_grad()
    def clear(self) -> None:
        """No adapter on any row: the model computes exactly its base outputs."""
        self.row_weights.zero_()
        self.row_slot_weights.zero_()
        self.row_on.zero_()
        self.row_slot_on.zero_()
        self._needs(self._needed[0], self.per_row_capable)  # no row overflows


def _fields(max_batch: int, positions: int, per_row: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The selection tensors' dtypes and shapes, in their order in the packed buffer (int64
    first: every field then starts on its element size)."""
    return {
        "active_slots": (torch.int64, (positions,)),
        "row_slots": (torch.int64, (max_batch, per_row)),
        "row_count": (torch.int64, ()),
        "row_weights": (torch.float32, (max_batch, positions)),
        "row_slot_weights": (torch.float32, (max_batch, per_row)),
        "zero": (torch.float32, ()),  # always 0 (every image leaves it so)
        "row_on": (torch.bool, (max_batch, positions)),  # row_weights != 0
        "row_slot_on": (torch.bool, (max_batch, per_row)),  # row_slot_weights != 0
    }


def _packed_nbytes(fields: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> int:
    return sum(dtype.itemsize * math.prod(shape) for dtype, shape in fields.values())


def _packed_offsets(fields: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict[str, int]:
    """Each field's byte offset in the packed buffer."""
    offsets, offset = {}, 0
    for name, (dtype, shape) in fields.items():
        offsets[name] = offset
        offset += dtype.itemsize * math.prod(shape)
    return offsets


def _packed_views(buffer: torch.Tensor, fields: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                  offsets: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Each field as a view of the uint8 ``buffer`` at its ``offsets`` (:func:`_packed_offsets`)."""
    views = {}
    for name, (dtype, shape) in fields.items():
        start = offsets[name]
        views[name] = buffer[start : start + dtype.itemsize * math.prod(shape)].view(dtype).view(shape)
    return views


class Selector:
    """The selection by name, and its translation to the :class:`Selection` tensors.

    Holds which adapters each row uses with what weight (``rows``: one spec for every row, or one
    per row with ``per_row``), and whether adapters are enabled. :meth:`write` turns that into slot
    indices through a ``resolve`` function the caller provides (name -> (slot, weight scale)), and
    skips the write when the tensors already hold exactly that. Callers hold the runtime's
    mutation (no forward runs while the tensors change).
    """

    def __init__(self, selection: Selection, slot_rank: Callable[[int], int] | None = None) -> None:
        self.selection = selection
        self.slot_rank = slot_rank  # slot -> ranks its occupant holds (rank buckets)
        self.rows: list[dict[str, float]] = []  # [] = no adapter
        self.per_row = False
        self.enabled = True
        self._written: list[dict[int, float]] | None = None  # what the tensors hold, by slot
        self._selected: frozenset[int] = frozenset()  # the slots of _written with a weight
        self._served_rows: int | None = None  # rows the tensors were written for (per-row)

    def names(self) -> list[str]:
        """Every adapter named by the selection, sorted."""
        return sorted({name for row in self.rows for name in row})

    def uses(self, name: str) -> bool:
        return any(name in row for row in self.rows)

    @staticmethod
    def check_weights(rows: Sequence[Mapping[str, float]], scale_of: Callable[[str], float]) -> None:
        """Raise unless every weight times its adapter's factor (``scale_of(name)``: a trainable
        adapter's scaling, else 1) fits the float32 selection tensors: a larger one would be
        written as Inf and every output of its rows would be Inf / NaN.

        Raises:
            SelectionError: naming the adapter and the product.
        """
        for row in rows:
            for name, weight in row.items():
                if weight and not abs(weight * scale_of(name)) <= FLOAT32_MAX:
                    raise SelectionError(
                        f"weight {weight!r} of {name!r} (times its factor {scale_of(name)!r}) does not fit "
                        f"the float32 selection weights (at most {FLOAT32_MAX:.4g} in magnitude)")

    def set(self, rows: list[dict[str, float]], per_row: bool) -> None:
        """Replace the selection by name (call :meth:`write` next)."""
        self.rows, self.per_row = rows, per_row

    def drop(self, name: str) -> None:
        """Remove ``name`` from every row (its rows then use the other adapters, or the base)."""
        self.rows = [{n: w for n, w in row.items() if n != name} for row in self.rows]

    def write(self, resolve: Callable[[str], tuple[int, float]], force: bool = False) -> None:
        """Write the tensors for the current selection; ``resolve(name)`` gives the adapter's
        device slot and the factor its weight is multiplied by. ``force``: even if they
        already hold it (the read path changed).

        Raises:
            SelectionError: more distinct slots than ``max_active_adapters`` (before any write).
        """
        slot_rows: list[dict[int, float]] = []
        row_keys: list[tuple] = []  # each row's items: the selection's key (Selection.write)
        selected: set[int] = set()
        if self.enabled:  # one loop, no generators: this runs on every switch
            for row in self.rows:
                spec: dict[int, float] = {}
                for name, weight in row.items():
                    if weight != 0.0:
                        slot, scale = resolve(name)
                        spec[slot] = weighted = weight * scale
                        if weighted:
                            selected.add(slot)
                slot_rows.append(spec)
                row_keys.append(tuple(spec.items()))
            if len(slot_rows) == 1 and not slot_rows[0]:
                slot_rows, row_keys = [], []
        served_rows = len(self.rows) if self.per_row and self.enabled else None
        selection = self.selection
        bucket = self._bucket(slot_rows) if selection.rank_buckets else None
        if (not force and slot_rows == self._written and served_rows == self._served_rows
                and bucket == selection.needed_bucket):
            return
        if not selected:
            selection.clear()
            selection.needs_bucket(bucket)
        else:
            selection.write(slot_rows, tuple(row_keys), bucket)
        self._written, self._served_rows = slot_rows, served_rows
        self._selected = frozenset(selected)

    def _bucket(self, slot_rows: list[dict[int, float]]) -> int | None:
        """The smallest rank bucket holding every selected slot's ranks (None: no buckets)."""
        buckets = self.selection.rank_buckets
        if not buckets:
            return None
        assert self.slot_rank is not None
        needed = max((self.slot_rank(s) for row in slot_rows for s, w in row.items() if w), default=0)
        return next(b for b in buckets if b >= needed)

    def selected_slots(self) -> frozenset[int]:
        """Slots the tensors currently give a non-zero weight: what forwards read."""
        return self._selected

    def check_batch(self, batch: int) -> None:
        """Raise unless a forward of ``batch`` rows matches what the tensors were written for.

        Raises:
            SelectionError: more rows than ``max_batch_size``, or a per-row selection for
                another number of rows.
        """
        if batch > self.selection.max_batch_size:
            raise SelectionError(
                f"batch of {batch} rows exceeds RuntimeConfig.max_batch_size="
                f"{self.selection.max_batch_size}"
            )
        if self._served_rows is not None and batch != self._served_rows:
            raise SelectionError(f"activate_rows set {self._served_rows} rows but the batch has {batch}")
