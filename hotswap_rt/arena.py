"""The slot arena: all adapters' device memory, allocated once, and host staging into it.

For each dtype of the injected layers, one tensor ``arena[S, P]`` (S = device_slots). A slot row
holds, for every injected layer in a fixed order, A ``[R, d_in]`` then B ``[d_out, R]`` (R =
max_rank), with the adapter's scaling folded into B::

    arena[s] = [ A_0 | B_0 | A_1 | B_1 | ... ]     P = sum_l R * (d_in_l + d_out_l)

A staged adapter is the same row built on the host (zero-padded, scaled, pinned when an accelerator
holds the arena), so moving it into slot ``s`` is one ``copy_`` per dtype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .errors import IncompatibleAdapterError, RankTooLargeError
from .peft_format import ParsedAdapter


@dataclass(frozen=True)
class LayerLayout:
    """Where one injected layer lives in its dtype's arena row."""

    name: str
    d_in: int
    d_out: int
    dtype: torch.dtype
    offset: int  # A starts here; B starts at offset + R * d_in

    def size(self, max_rank: int) -> int:
        return max_rank * (self.d_in + self.d_out)


@dataclass(frozen=True)
class StagedAdapter:
    """An adapter validated against the layout and laid out as one host row per dtype.

    Attributes:
        adapter: the parsed, unpadded, unscaled factors (kept for ``save``).
        rows: dtype -> ``[P_dtype]`` host tensor, exactly a slot row.
    """

    adapter: ParsedAdapter
    rows: dict[torch.dtype, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(row.numel() * row.element_size() for row in self.rows.values())


class SlotArena:
    """Device slot storage for every injected layer, and staging of adapters into it.

    Args:
        layers: layer name -> (d_in, d_out, dtype), in a fixed order.
        max_rank: R.
        num_slots: S.
        device: where the arena lives (the injected layers' device).
    """

    def __init__(
        self,
        layers: dict[str, tuple[int, int, torch.dtype]],
        max_rank: int,
        num_slots: int,
        device: torch.device,
    ) -> None:
        self.max_rank = max_rank
        self.num_slots = num_slots
        self.device = device
        self.layouts: dict[str, LayerLayout] = {}
        row_sizes: dict[torch.dtype, int] = {}
        for name, (d_in, d_out, dtype) in layers.items():
            offset = row_sizes.get(dtype, 0)
            self.layouts[name] = LayerLayout(name, d_in, d_out, dtype, offset)
            row_sizes[dtype] = offset + max_rank * (d_in + d_out)
        self.arenas: dict[torch.dtype, torch.Tensor] = {
            dtype: torch.zeros(num_slots, size, dtype=dtype, device=device)
            for dtype, size in row_sizes.items()
        }
        self._pin = device.type != "cpu" and torch.accelerator.is_available()
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one slot row, all dtypes together."""
        return sum(a[0].numel() * a.element_size() for a in self.arenas.values())

    def check(self, adapter: ParsedAdapter) -> None:
        """Raise unless every module of ``adapter`` is an injected layer of matching shape.

        Raises:
            IncompatibleAdapterError: a module was not injected, or its shapes differ.
            RankTooLargeError: a module's rank exceeds ``max_rank``.
        """
        where = adapter.source or "state_dict"
        for name, module in adapter.modules.items():
            layout = self.layouts.get(name)
            if layout is None:
                raise IncompatibleAdapterError(
                    f"{where}: module {name!r} is not an injected layer of this runtime "
                    f"(widen RuntimeConfig.target_modules to include it)"
                )
            if module.rank > self.max_rank:
                raise RankTooLargeError(
                    f"{where}: module {name!r} has rank {module.rank} > max_rank={self.max_rank}"
                )
            expected_a, expected_b = (module.rank, layout.d_in), (layout.d_out, module.rank)
            if tuple(module.lora_A.shape) != expected_a or tuple(module.lora_B.shape) != expected_b:
                raise IncompatibleAdapterError(
                    f"{where}: module {name!r}: lora_A {tuple(module.lora_A.shape)} / lora_B "
                    f"{tuple(module.lora_B.shape)} do not fit the layer (d_in={layout.d_in}, "
                    f"d_out={layout.d_out}); expected {expected_a} / {expected_b}"
                )

    @torch.no_grad()
    def stage(self, adapter: ParsedAdapter, fold_scaling: bool = True) -> StagedAdapter:
        """Check ``adapter``, then build its padded slot rows in host memory.

        Args:
            fold_scaling: multiply B by each module's scaling (inference). A trainable adapter
                keeps B unscaled (its scaling is applied through the selection weights), so the
                slot holds exactly the factors PEFT trains.
        """
        self.check(adapter)
        rows = {
            dtype: torch.zeros(arena.shape[1], dtype=dtype, pin_memory=self._pin)
            for dtype, arena in self.arenas.items()
        }
        for name, module in adapter.modules.items():
            layout = self.layouts[name]
            a_view, b_view = self._factor_views(rows[layout.dtype], layout)
            a_view[: module.rank].copy_(module.lora_A)
            scale = module.scaling if fold_scaling else 1.0
            b_part = b_view[:, : module.rank]
            if layout.dtype == torch.float32:
                b_part.copy_(module.lora_B)
                if scale != 1.0:
                    b_part.mul_(scale)
            else:  # scale in fp32 before rounding to the slot dtype
                b_part.copy_(module.lora_B.float() * scale)
        return StagedAdapter(adapter=adapter, rows=rows)

    def slot_factors(self, slot: int, name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views into device slot ``slot`` of layer ``name``'s unpadded factors:
        A ``[rank, d_in]`` (contiguous) and B ``[d_out, rank]`` (a column slice of ``[d_out, R]``)."""
        layout = self.layouts[name]
        a_view, b_view = self._factor_views(self.arenas[layout.dtype][slot], layout)
        return a_view[:rank], b_view[:, :rank]

    def _factor_views(
        self, row: torch.Tensor, layout: LayerLayout
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``[R, d_in]`` and B ``[d_out, R]`` views of one layer's part of a slot row ``[P]``."""
        a_size = self.max_rank * layout.d_in
        a_view = row.narrow(0, layout.offset, a_size).view(self.max_rank, layout.d_in)
        b_view = row.narrow(0, layout.offset + a_size, layout.d_out * self.max_rank).view(
            layout.d_out, self.max_rank
        )
        return a_view, b_view

    @torch.no_grad()
    def write_slot(self, slot: int, staged: StagedAdapter) -> float:
        """Copy a staged adapter into device slot ``slot``: one ``copy_`` per dtype.

        On CUDA the copy runs on a side stream (``non_blocking`` from pinned memory) ordered
        after the work already queued on the compute stream (which may still read the slot);
        the compute stream waits on its event, and the host waits for the copy itself (not for
        the whole device) so the staged row can be evicted or reused right after.

        Returns:
            Seconds the copy took.
        """
        start = time.perf_counter()
        if self._copy_stream is not None:
            compute = torch.cuda.current_stream(self.device)
            self._copy_stream.wait_stream(compute)
            with torch.cuda.stream(self._copy_stream):
                for dtype, row in staged.rows.items():
                    self.arenas[dtype][slot].copy_(row, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._copy_stream)
            compute.wait_event(done)
            done.synchronize()
        else:
            for dtype, row in staged.rows.items():
                self.arenas[dtype][slot].copy_(row, non_blocking=self._pin)
            if self._pin:
                torch.accelerator.synchronize(self.device)
        return time.perf_counter() - start
