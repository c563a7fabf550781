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
    def stage(self, adapter: ParsedAdapter) -> StagedAdapter:
        """Check ``adapter``, then build its padded, scaled slot rows in host memory."""
        self.check(adapter)
        rank = self.max_rank
        rows = {
            dtype: torch.zeros(arena.shape[1], dtype=dtype, pin_memory=self._pin)
            for dtype, arena in self.arenas.items()
        }
        for name, module in adapter.modules.items():
            layout = self.layouts[name]
            row = rows[layout.dtype]
            a_size = rank * layout.d_in
            a_view = row.narrow(0, layout.offset, a_size).view(rank, layout.d_in)
            b_view = row.narrow(0, layout.offset + a_size, layout.d_out * rank).view(
                layout.d_out, rank
            )
            a_view[: module.rank].copy_(module.lora_A)
            # Scale in fp32 before rounding to the slot dtype.
            b_view[:, : module.rank].copy_(module.lora_B.float() * module.scaling)
        return StagedAdapter(adapter=adapter, rows=rows)

    @torch.no_grad()
    def write_slot(self, slot: int, staged: StagedAdapter) -> float:
        """Copy a staged adapter into device slot ``slot``: one ``copy_`` per dtype.

        Returns:
            Seconds the copy took (synchronized on accelerators).
        """
        start = time.perf_counter()
        for dtype, row in staged.rows.items():
            self.arenas[dtype][slot].copy_(row, non_blocking=self._pin)
        if self._pin:
            torch.accelerator.synchronize(self.device)
        return time.perf_counter() - start
