"""The slot arena: all adapters' device memory, allocated once. Device memory only: it knows
layer shapes and offsets, not any file format (staging into host rows is
:mod:`hotswap_rt.staging`).

For each dtype of the injected layers, one tensor ``arena[S, P]`` (S = device_slots). A slot row
is laid out *rank-major*: ``R`` (= max_rank) blocks of width ``W``, block ``j`` holding rank ``j``
of every injected layer in a fixed order: row ``j`` of A (``d_in``) and column ``j`` of B
(``d_out``, the adapter's scaling folded in)::

    arena[s] = [ a_0[0] b_0[:,0] a_1[0] b_1[:,0] ... | a_0[1] b_0[:,1] ... | ... ]
               <------------------ W ---------------->                       P = R * W
               W = sum_l (d_in_l + d_out_l)

With *scale vectors* (IA3, DoRA and LoRA bias adapters; :meth:`SlotArena.enable_vectors`) the
row starts with ``V`` values: for each linear layer, in the same order, an input scale
(``d_in``), an output scale (``d_out``) and an output bias (``d_out``), each stored as its
difference from the identity (0 = no change). A ``modules_to_save`` module (kind ``"full"``)
keeps its whole weight and bias delta there too (``d_out * (d_in + 1)``)::

    arena[s] = [ in_0 out_0 bias_0 in_1 out_1 bias_1 ... | rank block 0 | rank block 1 | ... ]
               <------------------ V -------------------->                      P = V + R * W

So the vectors and the first ``r`` ranks of every layer are one contiguous prefix of ``V + r * W``
values: a staged adapter of rank ``r`` is a host row of exactly that prefix (its true size, not
max_rank's), and moving it into slot ``s`` is one ``copy_`` of the prefix per dtype plus clearing
what the previous occupant held beyond it (:meth:`SlotArena.write_slot`). Per layer the slot is
the views A ``[R, d_in]`` and B^T ``[R, d_out]`` of ``arena[s, V:].view(R, W)``
(:func:`factor_views`) and its vectors ``arena[s, o : o + d_in + 2 * d_out]`` (:func:`vector_views`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Mapping

import torch

from .errors import HotswapError


FULL_KINDS = ("full", "full_embedding")  # LayerShape.kind of modules held in full (modules_to_save)


@dataclass(frozen=True)
class LayerShape:
    """What a slot row holds for one layer: its LoRA as matrices A ``[R, d_in]``, B ``[d_out, R]``.

    Attributes:
        kind: ``"linear"`` (``nn.Linear``, ``Conv1D``), ``"conv"`` (``nn.Conv2d``: ``d_in`` =
            ``C_in*kh*kw``, ``kernel`` = ``(C_in, kh, kw)``, ``groups`` its groups),
            ``"embedding"`` (``nn.Embedding``: ``d_in`` = ``num_embeddings``), ``"full"`` (an
            ``nn.Linear`` in ``modules_to_save``: each slot holds a whole weight and bias delta
            in the vector region, nothing in the rank blocks), ``"full_embedding"`` (an
            ``nn.Embedding`` in ``modules_to_save``: its weight delta ``[num_embeddings, dim]``,
            ``d_in`` = ``num_embeddings``) or ``"experts"`` (one 3-D expert
            parameter of a fused MoE experts module, PEFT's ``target_parameters``: ``kernel`` =
            ``(E,)``, ``d_in`` = ``E * in``, ``d_out`` = ``E * out``: each rank holds every
            expert's A row and B column).
    """

    d_in: int
    d_out: int
    dtype: torch.dtype
    kind: str = "linear"
    kernel: tuple[int, ...] = ()
    groups: int = 1


@dataclass(frozen=True)
class LayerLayout:
    """Where one injected layer lives in its dtype's arena row."""

    name: str
    d_in: int
    d_out: int
    dtype: torch.dtype
    offset: int  # within a rank block: A's row starts here, B's column at offset + d_in
    kind: str = "linear"
    kernel: tuple[int, ...] = ()
    groups: int = 1
    vectors: int = -1  # where its scale vectors start in the row's vector region; -1: none

    @classmethod
    def of(cls, name: str, shape: LayerShape, offset: int, vectors: int = -1) -> LayerLayout:
        return cls(name, shape.d_in, shape.d_out, shape.dtype, offset, shape.kind, shape.kernel,
                   shape.groups, vectors)

    @property
    def shape(self) -> LayerShape:
        return LayerShape(self.d_in, self.d_out, self.dtype, self.kind, self.kernel, self.groups)

    @property
    def width(self) -> int:
        """Values this layer adds to each rank block (none for a module held in full)."""
        return 0 if self.full else self.d_in + self.d_out

    @property
    def full(self) -> bool:
        """A ``modules_to_save`` module (kind ``"full"`` or ``"full_embedding"``)."""
        return self.kind in FULL_KINDS

    @property
    def vector_width(self) -> int:
        """Values of its part of the vector region: input scale, output scale, output bias; for a
        ``"full"`` module (``modules_to_save``) its weight delta ``[d_out, d_in]`` and bias delta;
        for a ``"full_embedding"`` one its weight delta ``[num_embeddings, dim]``."""
        if self.kind == "full":
            return self.d_out * (self.d_in + 1)
        if self.kind == "full_embedding":
            return self.d_in * self.d_out
        return self.vector_in + 2 * self.d_out

    @property
    def vector_in(self) -> int:
        """Values of the input scale: ``d_in``, a Conv2d's input channels (its ``d_in`` is
        ``C_in * kh * kw``, what A reads), none for an Embedding (its input is token ids)."""
        if self.kind == "embedding":
            return 0
        return self.kernel[0] if self.kind == "conv" else self.d_in

    @property
    def can_hold_vectors(self) -> bool:
        """Scale vectors (IA3/DoRA/LoRA bias) exist for linear layers (Linear, Conv1D), Conv2d
        layers (DoRA / LoRA bias on a grouped one are refused when read) and Embedding layers
        (DoRA only: output scale)."""
        return self.kind in ("linear", "conv", "embedding")


def factor_views(row: torch.Tensor, layout: LayerLayout, width: int,
                 vectors: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[n, d_in]`` and B ``[d_out, n]`` views of one layer's part of a rank-major row
    ``[V + n * width]`` (a device slot, ``n = R``, or a staged host row, ``n`` = its ranks).

    Args:
        width: ``W`` of the row's dtype (:attr:`SlotArena.rank_widths`).
        vectors: ``V`` of the row's dtype (:attr:`SlotArena.vector_sizes`).
    """
    blocks = row[vectors:].view(-1, width)  # [n, W]
    a_view = blocks[:, layout.offset : layout.offset + layout.d_in]
    b_view = blocks[:, layout.offset + layout.d_in : layout.offset + layout.width].t()
    return a_view, b_view


def vector_views(row: torch.Tensor, layout: LayerLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's scale vectors in a row ``[..., V + ...]`` (a slot row, a staged host row, or
    the whole arena ``[S, P]``): input scale ``[..., d_in]`` (a Conv2d's: ``[..., C_in]``),
    output scale ``[..., d_out]`` and output bias ``[..., d_out]``, each as its difference from
    the identity."""
    if layout.vectors < 0:
        raise ValueError(f"layer {layout.name!r} has no scale vectors")
    start, d_in, d_out = layout.vectors, layout.vector_in, layout.d_out
    return (row[..., start : start + d_in], row[..., start + d_in : start + d_in + d_out],
            row[..., start + d_in + d_out : start + d_in + 2 * d_out])


class SlotArena:
    """Device slot storage for every injected layer.

    Args:
        layers: layer name -> :class:`LayerShape` (or ``(d_in, d_out, dtype)``: a linear layer),
            in a fixed order.
        max_rank: R.
        num_slots: S.
        device: where the arena lives (the injected layers' device).
        vectors: give every linear layer scale vectors (:meth:`enable_vectors`).

    Attributes:
        layouts: layer name -> :class:`LayerLayout`.
        arenas: dtype -> ``[S, P_dtype]`` device tensor.
        vectors: whether linear layers have scale vectors.
        vector_sizes: dtype -> ``V``, the values of the vector region at the start of a row.
        pin_host_rows: host rows copied into the arena should be pinned (an accelerator holds it).
        filled: per slot, dtype -> ranks its occupant wrote (what the next write must clear
            beyond its own prefix); absent = 0 (a new arena is zero).
    """

    def __init__(
        self,
        layers: Mapping[str, LayerShape | tuple[int, int, torch.dtype]],
        max_rank: int,
        num_slots: int,
        device: torch.device,
        vectors: bool = False,
    ) -> None:
        self.max_rank = max_rank
        self.num_slots = num_slots
        self.device = device
        self.vectors = vectors
        self.layouts: dict[str, LayerLayout] = {}
        self.arenas: dict[torch.dtype, torch.Tensor] = {}
        self.vector_sizes: dict[torch.dtype, int] = {}
        self.filled: list[dict[torch.dtype, int]] = [{} for _ in range(num_slots)]
        # write_slot's per-call work kept small (a swap's fixed cost is Python): by (slot, dtype,
        # size), the checked plan of a write (_prefix_plan), and (V, W) by dtype; both dropped
        # whenever a dtype's tensor is replaced (_regrow)
        self._prefixes: dict[tuple[int, torch.dtype, int], tuple[torch.Tensor, int, int, int]] = {}
        self._row_sizes: dict[torch.dtype, tuple[int, int]] = {}
        self.extend(layers)
        self.pin_host_rows = device.type != "cpu" and torch.accelerator.is_available()
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._copy_done = threading.local()  # per thread: the event write_slot waits on, reused

    def extend(self, layers: Mapping[str, LayerShape | tuple[int, int, torch.dtype]]) -> None:
        """Add layers (name -> :class:`LayerShape`) at the end of their dtype's rank blocks (and
        of its vector region, with :attr:`vectors`).

        Existing layers keep their offsets and every slot keeps its contents (new layers start
        at zero), but a grown dtype gets a *new* ``[S, P]`` tensor: whoever holds the old one
        (the slot layers) must be pointed at :attr:`arenas` again, and staged host rows re-laid
        (:meth:`relayout`). Only before compiling: a compiled graph reads the old tensor."""
        before = self._sizes()
        widths, vector_sizes = self.rank_widths, dict(self.vector_sizes)
        added: dict[str, LayerLayout] = {}
        for name, spec in layers.items():
            shape = spec if isinstance(spec, LayerShape) else LayerShape(*spec)
            if name in self.layouts:
                raise ValueError(f"layer {name!r} is already in the arena")
            offset = widths.get(shape.dtype, 0)
            layout = LayerLayout.of(name, shape, offset)
            if layout.full or (self.vectors and layout.can_hold_vectors):
                layout = dataclasses.replace(layout, vectors=vector_sizes.get(shape.dtype, 0))
                vector_sizes[shape.dtype] = layout.vectors + layout.vector_width
            added[name] = layout
            widths[shape.dtype] = offset + layout.width
        after = {dtype: (vector_sizes.get(dtype, 0), width) for dtype, width in widths.items()}
        grown = self._allocate(before, after)  # may raise: nothing has changed yet
        self.layouts.update(added)  # same dict object
        self._regrow(grown, before, after)

    def enable_vectors(self) -> None:
        """Give every linear layer scale vectors, now and when added later (IA3, DoRA and LoRA
        bias adapters need them). Slot contents are kept, the vectors start at zero; like
        :meth:`extend`, a new tensor per grown dtype (only before compiling)."""
        if self.vectors:
            return
        before = self._sizes()
        vector_sizes = dict(self.vector_sizes)  # appended after what is there ("full" modules)
        moved: dict[str, LayerLayout] = {}
        for name, layout in self.layouts.items():
            if layout.can_hold_vectors:
                start = vector_sizes.get(layout.dtype, 0)
                moved[name] = dataclasses.replace(layout, vectors=start)
                vector_sizes[layout.dtype] = start + layout.vector_width
        after = {dtype: (vector_sizes.get(dtype, 0), width) for dtype, (_, width) in before.items()}
        grown = self._allocate(before, after)  # may raise: nothing has changed yet
        self.vectors = True
        self.layouts.update(moved)
        self._regrow(grown, before, after)

    def _sizes(self) -> dict[torch.dtype, tuple[int, int]]:
        """dtype -> ``(V, W)`` of the current rows."""
        return {dtype: self._row_size(dtype) for dtype in self.arenas}

    def _row_size(self, dtype: torch.dtype) -> tuple[int, int]:
        """``(V, W)`` of ``dtype``'s rows, kept until the tensor is replaced (:meth:`_regrow`)."""
        sizes = self._row_sizes.get(dtype)
        if sizes is None:
            sizes = self._row_sizes[dtype] = (self.vector_sizes.get(dtype, 0), self._width(dtype))
        return sizes

    def _allocate(self, before: Mapping[torch.dtype, tuple[int, int]],
                  after: Mapping[torch.dtype, tuple[int, int]]) -> dict[torch.dtype, torch.Tensor]:
        """Zeroed ``[S, V + R * W]`` tensors for the dtypes whose ``(V, W)`` change.

        Raises:
            HotswapError: the memory cannot be allocated (naming the size and the knobs)."""
        grown = {}
        for dtype, sizes in after.items():
            if dtype in self.arenas and before[dtype] == sizes:
                continue
            row = sizes[0] + self.max_rank * sizes[1]
            try:
                grown[dtype] = torch.zeros(self.num_slots, row, dtype=dtype, device=self.device)
            except (RuntimeError, TypeError, ValueError) as exc:  # out of memory; a size past int64
                raise HotswapError(
                    f"cannot allocate the {dtype} slot arena on {self.device}: "
                    f"{self.num_slots * row * dtype.itemsize:,} "
                    f"bytes (device_slots={self.num_slots} x max_rank={self.max_rank} x {sizes[1]:,} "
                    f"values per rank, + {sizes[0]:,} vector values per slot); lower max_rank or "
                    f"device_slots ({exc})") from None
        return grown

    def _regrow(self, grown: Mapping[torch.dtype, torch.Tensor], before: Mapping[torch.dtype, tuple[int, int]],
                after: Mapping[torch.dtype, tuple[int, int]]) -> None:
        """Put the new tensors (:meth:`_allocate`) in place, holding the old values at the same
        (layer, rank) / vector positions."""
        for dtype, tensor in grown.items():
            old = self.arenas.get(dtype)
            if old is not None:
                for slot in range(self.num_slots):
                    tensor[slot].copy_(self.relayout(old[slot], before[dtype], after[dtype], self.max_rank))
            self.arenas[dtype] = tensor
            self.vector_sizes[dtype] = after[dtype][0]
        self._prefixes.clear()
        self._row_sizes.clear()

    @staticmethod
    def relayout(row: torch.Tensor, old: tuple[int, int], new: tuple[int, int],
                 ranks: int | None = None) -> torch.Tensor:
        """A row ``[V + n * W]`` laid out for the old ``(V, W)`` re-laid for the ``new`` one
        (layers appended to the rank blocks and the vector region): the values at the same
        positions, the new ones zero. ``ranks``: ``n`` (else from the row's size)."""
        if old == new:
            return row
        (old_v, old_w), (new_v, new_w) = old, new
        if ranks is None:
            ranks = (row.numel() - old_v) // old_w if old_w else 0
        grown = torch.zeros(new_v + ranks * new_w, dtype=row.dtype, device=row.device,
                            pin_memory=row.is_pinned())
        if row.numel():
            grown[:old_v].copy_(row[:old_v])
            if ranks and old_w:
                grown[new_v:].view(ranks, new_w)[:, :old_w].copy_(row[old_v:].view(ranks, old_w))
        return grown

    @property
    def row_sizes(self) -> dict[torch.dtype, int]:
        """dtype -> P, the length of one slot row."""
        return {dtype: arena.shape[1] for dtype, arena in self.arenas.items()}

    @property
    def rank_widths(self) -> dict[torch.dtype, int]:
        """dtype -> W, the values of one rank block (``P = V + R * W``)."""
        return {dtype: self._width(dtype) for dtype in self.arenas}

    def _width(self, dtype: torch.dtype) -> int:
        """W of ``dtype``'s ``[S, V + R * W]`` arena tensor."""
        return (self.arenas[dtype].shape[1] - self.vector_sizes.get(dtype, 0)) // self.max_rank

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one slot row, all dtypes together."""
        return sum(a[0].numel() * a.element_size() for a in self.arenas.values())

    def slot_factors(self, slot: int, name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views into device slot ``slot`` of layer ``name``'s unpadded factors:
        A ``[rank, d_in]`` and B ``[d_out, rank]`` (strided: rows ``W`` apart)."""
        layout = self.layouts[name]
        a_view, b_view = factor_views(self.arenas[layout.dtype][slot], layout, self._width(layout.dtype),
                                      self.vector_sizes.get(layout.dtype, 0))
        return a_view[:rank], b_view[:, :rank]

    def slot_rank(self, slot: int) -> int:
        """Ranks ``slot``'s occupant holds (the most over dtypes; 0 if empty)."""
        return max(self.filled[slot].values(), default=0)

    def mark_unknown(self, slot: int) -> None:
        """Forget what ``slot`` holds (a copy into it failed part-way): the next write clears
        the whole row beyond its prefix."""
        self.filled[slot] = dict.fromkeys(self.arenas, self.max_rank)

    def layout_token(self) -> tuple:
        """Changes whenever the slot rows change layout or storage (a layer injected, scale
        vectors added): a copy made into a slot before a change is not valid after it."""
        return tuple((dtype, tensor.data_ptr(), tuple(tensor.shape), self._row_size(dtype))
                     for dtype, tensor in self.arenas.items())

    def write_slot(self, slot: int, rows: Mapping[torch.dtype, torch.Tensor], ordered: bool = True) -> float:
        """Copy host rows (dtype -> prefix ``[V + r * W]``) into device slot ``slot``: one
        ``copy_`` per dtype of the prefix, and a ``zero_`` of what the previous occupant wrote
        beyond it (nothing when it held no more ranks). The slot then holds exactly the row,
        zero-padded to max_rank (a missing dtype: all zero).

        On CUDA the copy (``non_blocking`` from pinned memory) is ordered after the work already
        queued on the compute stream (which may still read the slot), and the host waits for it
        (an event after the copy, not the whole device) so the host row can be evicted or
        reused right after. The event is the calling thread's own, recorded again on each
        write (creating one costs a CUDA call, and destroying it another). ``ordered``: later
        forwards must see the new contents, so the copy is queued on the compute stream itself
        (between the forwards before and after it: no side stream, stream wait or cross-stream
        event to pay for). Not ordered (a slot no forward reads before this returns: loads
        beside running forwards): on a side stream, so forwards queued meanwhile do not wait
        for it.

        No ``no_grad`` (it costs ~3 us, a swap's fixed cost is what matters here): neither the
        arena tensors nor the host rows require grad (a trainable adapter's parameters are
        separate leaves aliasing the slot memory), so autograd records nothing.

        Returns:
            Seconds the copy took.
        """
        start = time.perf_counter()
        if self._copy_stream is not None:
            compute = torch.cuda.current_stream(self.device)
            done = getattr(self._copy_done, "event", None)
            if done is None:  # one per thread: writes from several threads never share one
                done = self._copy_done.event = torch.cuda.Event()
            if ordered:
                self._write(slot, rows, non_blocking=True)
                done.record(compute)
            else:
                self._copy_stream.wait_stream(compute)
                with torch.cuda.stream(self._copy_stream):
                    self._write(slot, rows, non_blocking=True)
                    done.record(self._copy_stream)
            done.synchronize()
        else:
            self._write(slot, rows, non_blocking=self.pin_host_rows)
            if self.pin_host_rows:
                torch.accelerator.synchronize(self.device)
        return time.perf_counter() - start

    def _write(self, slot: int, rows: Mapping[torch.dtype, torch.Tensor], non_blocking: bool) -> None:
        filled = self.filled[slot]
        for dtype, arena in self.arenas.items():
            row = rows.get(dtype)
            size = 0 if row is None else row.numel()
            plan = self._prefixes.get((slot, dtype, size))
            if plan is None:  # first write of this size into this slot: check it, keep the view
                plan = self._prefixes[slot, dtype, size] = self._prefix_plan(slot, dtype, size)
            target, ranks, vectors, width = plan
            stale = vectors + filled.get(dtype, 0) * width  # the prefix the previous occupant wrote
            filled[dtype] = self.max_rank  # unknown until the writes below complete: clear all next time
            if size:
                target.copy_(row, non_blocking)  # positional: ~0.1 us less than the keyword
            if stale > size:
                arena[slot, size:stale].zero_()
            filled[dtype] = ranks

    def _prefix_plan(self, slot: int, dtype: torch.dtype, size: int) -> tuple[torch.Tensor, int, int, int]:
        """What :meth:`_write` needs to copy a ``size``-value row of ``dtype`` into ``slot``: the
        slot row's prefix view, the ranks the row holds, ``V`` and ``W``.

        Raises:
            ValueError: ``size`` is not ``V`` plus whole rank blocks of ``W`` (at most R)."""
        vectors, width = self._row_size(dtype)
        if size > vectors + self.max_rank * width or (
                size and (size < vectors or (size - vectors) % max(width, 1))):
            raise ValueError(f"a {dtype} row of {size} values is not a prefix of V={vectors} "
                             f"vector values and whole rank blocks of W={width}")
        ranks = (size - vectors) // width if size and width else 0
        return self.arenas[dtype][slot, :size], ranks, vectors, width
