"""Selection tensors: which device slots a forward reads and with what weight, per batch row.

::

    active_slots: int64   [k]              slot index of each of the k active positions
    row_weights:  float32 [max_batch, k]   weight of active position j in batch row b (0 = off)

The compiled graph reads these tensors; this module only ever writes them in place (``copy_``), so
the graph never sees a new Python object and never recompiles on a switch. Unused positions point
at slot 0 with weight 0, which contributes exactly zero because slot contents are always finite.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .errors import SelectionError

RowSpec = Mapping[int, float]  # slot index -> weight, for one batch row


class Selection:
    """The two tensors the LoRA slot layers read, and the code that writes them."""

    def __init__(self, max_batch_size: int, max_active: int, device: torch.device) -> None:
        self.max_batch_size = max_batch_size
        self.max_active = max_active
        self.active_slots = torch.zeros(max_active, dtype=torch.int64, device=device)
        self.row_weights = torch.zeros(max_batch_size, max_active, dtype=torch.float32, device=device)

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

    @torch.no_grad()
    def write(self, rows: Sequence[RowSpec]) -> None:
        """Write a selection: ``rows[b]`` maps slot -> weight for batch row ``b``.

        A single row spec applies to every row of any batch (uniform activation); otherwise rows
        beyond ``len(rows)`` get no adapter.

        Raises:
            SelectionError: more distinct slots than ``max_active``, more rows than
                ``max_batch_size``.
        """
        slots = sorted({slot for row in rows for slot, weight in row.items() if weight != 0.0})
        self.check(len(rows), slots)
        position = {slot: j for j, slot in enumerate(slots)}
        active = torch.zeros(self.max_active, dtype=torch.int64)
        active[: len(slots)] = torch.tensor(slots, dtype=torch.int64)
        weights = torch.zeros(self.max_batch_size, self.max_active, dtype=torch.float32)
        uniform = len(rows) == 1
        for b, row in enumerate(rows):
            target = weights if uniform else weights[b : b + 1]
            for slot, weight in row.items():
                if weight != 0.0:
                    target[:, position[slot]] = weight
        self.active_slots.copy_(active)
        self.row_weights.copy_(weights)

    @torch.no_grad()
    def clear(self) -> None:
        """No adapter on any row: the model computes exactly its base outputs."""
        self.row_weights.zero_()
