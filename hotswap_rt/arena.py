"""The slot arena: all adapters' device memory, allocated once. Device memory only: it knows
layer shapes and offsets, not any file format (staging into host rows is
:mod:`hotswap_rt.staging`).

For each dtype of the injected layers, one tensor ``arena[S, P]`` (S = device_slots). A slot row
holds, for every injected layer in a fixed order, A ``[R, d_in]`` then B ``[d_out, R]`` (R =
max_rank), with the adapter's scaling folded into B::

    arena[s] = [ A_0 | B_0 | A_1 | B_1 | ... ]     P = sum_l R * (d_in_l + d_out_l)

A staged adapter is the same row built on the host, so moving it into slot ``s`` is one ``copy_``
per dtype (:meth:`SlotArena.write_slot`).
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
    offset: int  # A starts here; B starts at offset + R * d_in
    kind: str = "linear"
    kernel: tuple[int, ...] = ()
    groups: int = 1

    @classmethod
    def of(cls, name: str, shape: LayerShape, offset: int) -> LayerLayout:
        return cls(name, shape.d_in, shape.d_out, shape.dtype, offset, shape.kind, shape.kernel,
                   shape.groups)

    def size(self, max_rank: int) -> int:
        return max_rank * (self.d_in + self.d_out)


def factor_views(
    row: torch.Tensor, layout: LayerLayout, max_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[R, d_in]`` and B ``[d_out, R]`` views of one layer's part of a slot row ``[P]``
    (a device slot or a host row alike)."""
    a_size = max_rank * layout.d_in
    a_view = row.narrow(0, layout.offset, a_size).view(max_rank, layout.d_in)
    b_view = row.narrow(0, layout.offset + a_size, layout.d_out * max_rank).view(
        layout.d_out, max_rank
    )
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
        self.extend(layers)
        self.pin_host_rows = device.type != "cpu" and torch.accelerator.is_available()
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def extend(self, layers: Mapping[str, LayerShape | tuple[int, int, torch.dtype]]) -> None:
        """Add layers (name -> :class:`LayerShape`) at the end of their dtype's slot rows.

        Existing layers keep their offsets and every slot keeps its contents (new layers start
        at zero), but a grown dtype gets a *new* ``[S, P]`` tensor: whoever holds the old one
        (the slot layers) must be pointed at :attr:`arenas` again. Only before compiling: a
        compiled graph reads the old tensor."""
        row_sizes = self.row_sizes
        for name, spec in layers.items():
            shape = spec if isinstance(spec, LayerShape) else LayerShape(*spec)
            if name in self.layouts:
                raise ValueError(f"layer {name!r} is already in the arena")
            offset = row_sizes.get(shape.dtype, 0)
            self.layouts[name] = LayerLayout.of(name, shape, offset)  # same dict object
            row_sizes[shape.dtype] = offset + self.max_rank * (shape.d_in + shape.d_out)
        for dtype, size in row_sizes.items():
            old = self.arenas.get(dtype)
            if old is not None and old.shape[1] == size:
                continue
            grown = torch.zeros(self.num_slots, size, dtype=dtype, device=self.device)
            if old is not None:
                grown[:, : old.shape[1]].copy_(old)
            self.arenas[dtype] = grown

    @property
    def row_sizes(self) -> dict[torch.dtype, int]:
        """dtype -> P, the length of one slot row."""
        return {dtype: arena.shape[1] for dtype, arena in self.arenas.items()}

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one slot row, all dtypes together."""
        return sum(a[0].numel() * a.element_size() for a in self.arenas.values())

    def slot_factors(self, slot: int, name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views into device slot ``slot`` of layer ``name``'s unpadded factors:
        A ``[rank, d_in]`` (contiguous) and B ``[d_out, rank]`` (a column slice of ``[d_out, R]``)."""
        layout = self.layouts[name]
        a_view, b_view = factor_views(self.arenas[layout.dtype][slot], layout, self.max_rank)
        return a_view[:rank], b_view[:, :rank]

    @torch.no_grad()
    def write_slot(self, slot: int, rows: Mapping[torch.dtype, torch.Tensor]) -> float:
        """Copy host rows (dtype -> ``[P_dtype]``) into device slot ``slot``: one ``copy_`` per
        dtype.

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
                for dtype, row in rows.items():
                    self.arenas[dtype][slot].copy_(row, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._copy_stream)
            compute.wait_event(done)
            done.synchronize()
        else:
            for dtype, row in rows.items():
                self.arenas[dtype][slot].copy_(row, non_blocking=self.pin_host_rows)
            if self.pin_host_rows:
                torch.accelerator.synchronize(self.device)
        return time.perf_counter() - start
