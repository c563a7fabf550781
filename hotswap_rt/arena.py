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

So the first ``r`` ranks of every layer are one contiguous prefix of ``r * W`` values: a staged
adapter of rank ``r`` is a host row of exactly that prefix (its true size, not max_rank's), and
moving it into slot ``s`` is one ``copy_`` of the prefix per dtype plus clearing what the
previous occupant held beyond it (:meth:`SlotArena.write_slot`). Per layer the slot is the views
A ``[R, d_in]`` and B^T ``[R, d_out]`` of ``arena[s].view(R, W)`` (:func:`factor_views`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class LayerShape:
    """What a slot row holds for one layer: its LoRA as matrices A ``[R, d_in]``, B ``[d_out, R]``.

    Attributes:
        kind: ``"linear"`` (``nn.Linear``, ``Conv1D``), ``"conv"`` (``nn.Conv2d``: ``d_in`` =
            ``C_in*kh*kw``, ``kernel`` = ``(C_in, kh, kw)``, ``groups`` its groups) or
            ``"embedding"`` (``nn.Embedding``: ``d_in`` = ``num_embeddings``).
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

    @classmethod
    def of(cls, name: str, shape: LayerShape, offset: int) -> LayerLayout:
        return cls(name, shape.d_in, shape.d_out, shape.dtype, offset, shape.kind, shape.kernel,
                   shape.groups)

    @property
    def width(self) -> int:
        """Values this layer adds to each rank block."""
        return self.d_in + self.d_out


def factor_views(row: torch.Tensor, layout: LayerLayout, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[n, d_in]`` and B ``[d_out, n]`` views of one layer's part of a rank-major row
    ``[n * width]`` (a device slot, ``n = R``, or a staged host row, ``n`` = its ranks).

    Args:
        width: ``W`` of the row's dtype (:attr:`SlotArena.rank_widths`).
    """
    blocks = row.view(-1, width)  # [n, W]
    a_view = blocks[:, layout.offset : layout.offset + layout.d_in]
    b_view = blocks[:, layout.offset + layout.d_in : layout.offset + layout.width].t()
    return a_view, b_view


class SlotArena:
    """Device slot storage for every injected layer.

    Args:
        layers: layer name -> :class:`LayerShape` (or ``(d_in, d_out, dtype)``: a linear layer),
            in a fixed order.
        max_rank: R.
        num_slots: S.
        device: where the arena lives (the injected layers' device).

    Attributes:
        layouts: layer name -> :class:`LayerLayout`.
        arenas: dtype -> ``[S, P_dtype]`` device tensor.
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
    ) -> None:
        self.max_rank = max_rank
        self.num_slots = num_slots
        self.device = device
        self.layouts: dict[str, LayerLayout] = {}
        self.arenas: dict[torch.dtype, torch.Tensor] = {}
        self.filled: list[dict[torch.dtype, int]] = [{} for _ in range(num_slots)]
        self.extend(layers)
        self.pin_host_rows = device.type != "cpu" and torch.accelerator.is_available()
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def extend(self, layers: Mapping[str, LayerShape | tuple[int, int, torch.dtype]]) -> None:
        """Add layers (name -> :class:`LayerShape`) at the end of their dtype's rank blocks.

        Existing layers keep their offsets and every slot keeps its contents (new layers start
        at zero), but a grown dtype gets a *new* ``[S, P]`` tensor: whoever holds the old one
        (the slot layers) must be pointed at :attr:`arenas` again, and staged host rows re-laid
        (:meth:`relayout`). Only before compiling: a compiled graph reads the old tensor."""
        widths = self.rank_widths
        for name, spec in layers.items():
            shape = spec if isinstance(spec, LayerShape) else LayerShape(*spec)
            if name in self.layouts:
                raise ValueError(f"layer {name!r} is already in the arena")
            offset = widths.get(shape.dtype, 0)
            self.layouts[name] = LayerLayout.of(name, shape, offset)  # same dict object
            widths[shape.dtype] = offset + shape.d_in + shape.d_out
        for dtype, width in widths.items():
            old = self.arenas.get(dtype)
            if old is not None and old.shape[1] == self.max_rank * width:
                continue
            grown = torch.zeros(self.num_slots, self.max_rank * width, dtype=dtype, device=self.device)
            if old is not None:
                old_width = self._width(old)
                grown.view(self.num_slots, self.max_rank, width)[:, :, :old_width].copy_(
                    old.view(self.num_slots, self.max_rank, old_width))
            self.arenas[dtype] = grown

    @staticmethod
    def relayout(row: torch.Tensor, old_width: int, width: int) -> torch.Tensor:
        """A rank-major row ``[n * old_width]`` laid out for ``width`` (layers appended):
        ``[n * width]``, the new layers' values zero."""
        if old_width == width:
            return row
        ranks = row.numel() // old_width if old_width else 0
        grown = torch.zeros(ranks * width, dtype=row.dtype, pin_memory=row.is_pinned())
        if ranks:
            grown.view(ranks, width)[:, :old_width].copy_(row.view(ranks, old_width))
        return grown

    @property
    def row_sizes(self) -> dict[torch.dtype, int]:
        """dtype -> P, the length of one slot row."""
        return {dtype: arena.shape[1] for dtype, arena in self.arenas.items()}

    @property
    def rank_widths(self) -> dict[torch.dtype, int]:
        """dtype -> W, the values of one rank block (``P = R * W``)."""
        return {dtype: self._width(arena) for dtype, arena in self.arenas.items()}

    def _width(self, arena: torch.Tensor) -> int:
        """W of a ``[S, R * W]`` arena tensor."""
        return arena.shape[1] // self.max_rank

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one slot row, all dtypes together."""
        return sum(a[0].numel() * a.element_size() for a in self.arenas.values())

    def slot_factors(self, slot: int, name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views into device slot ``slot`` of layer ``name``'s unpadded factors:
        A ``[rank, d_in]`` and B ``[d_out, rank]`` (strided: rows ``W`` apart)."""
        layout = self.layouts[name]
        arena = self.arenas[layout.dtype]
        a_view, b_view = factor_views(arena[slot], layout, self._width(arena))
        return a_view[:rank], b_view[:, :rank]

    def slot_rank(self, slot: int) -> int:
        """Ranks ``slot``'s occupant holds (the most over dtypes; 0 if empty)."""
        return max(self.filled[slot].values(), default=0)

    def mark_unknown(self, slot: int) -> None:
        """Forget what ``slot`` holds (a copy into it failed part-way): the next write clears
        the whole row beyond its prefix."""
        self.filled[slot] = dict.fromkeys(self.arenas, self.max_rank)

    @torch.no_grad()
    def write_slot(self, slot: int, rows: Mapping[torch.dtype, torch.Tensor]) -> float:
        """Copy host rows (dtype -> rank prefix ``[r * W]``) into device slot ``slot``: one
        ``copy_`` per dtype of the prefix, and a ``zero_`` of what the previous occupant wrote
        beyond it (nothing when it held no more ranks). The slot then holds exactly the row,
        zero-padded to max_rank.

        On CUDA the copy runs on a side stream (``non_blocking`` from pinned memory) ordered
        after the work already queued on the compute stream (which may still read the slot);
        the compute stream waits on its event, and the host waits for the copy itself (not for
        the whole device) so the host row can be evicted or reused right after.

        Returns:
            Seconds the copy took.
        """
        start = time.perf_counter()
        if self._copy_stream is not None:
            compute = torch.cuda.current_stream(self.device)
            self._copy_stream.wait_stream(compute)
            with torch.cuda.stream(self._copy_stream):
                self._write(slot, rows, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._copy_stream)
            compute.wait_event(done)
            done.synchronize()
        else:
            self._write(slot, rows, non_blocking=self.pin_host_rows)
            if self.pin_host_rows:
                torch.accelerator.synchronize(self.device)
        return time.perf_counter() - start

    def _write(self, slot: int, rows: Mapping[torch.dtype, torch.Tensor], non_blocking: bool) -> None:
        filled = self.filled[slot]
        for dtype, arena in self.arenas.items():
            width = self._width(arena)
            row = rows.get(dtype)
            size = 0 if row is None else row.numel()
            if size > arena.shape[1] or size % width:
                raise ValueError(f"a {dtype} row of {size} values is not a rank prefix of W={width}")
            target = arena[slot]
            stale = filled.get(dtype, 0) * width  # a new arena is zero
            filled[dtype] = self.max_rank  # unknown until the writes below complete: clear all next time
            if size:
                target[:size].copy_(row, non_blocking=non_blocking)
            if stale > size:
                target[size:stale].zero_()
            filled[dtype] = size // width
