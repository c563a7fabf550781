"""The LoRA slot layer: a frozen base linear layer plus a read of the shared slot arena.

One forward, for ``k`` active slots of rank ``R`` (``k = max_active_adapters``)::

    x: [B, ..., d_in]
    A_act = A_stack[active]            # [k, R, d_in]    -> [k*R, d_in]
    B_act = B_stack[active]            # [k, d_out, R]   -> [d_out, k*R]  (scaling folded in)
    h     = x @ A_act.T                # [B, ..., k*R]
    h     = h * row_weights[:B]        # per-row, per-adapter weight (0 = adapter off)
    y     = base(x) + h @ B_act.T      # [B, ..., d_out]

The active set acts like one LoRA of rank ``k*R`` whose column groups are switched per row, so a
uniform batch, a weighted sum and a mixed batch are the same two matmuls.

Per row (when ``RuntimeConfig.max_adapters_per_row`` = m < k), each row gathers only its own
slots' factors, so the cost follows m instead of k::

    A_row = A_stack[row_slots[b]]      # [B, m*R, d_in]
    B_row = B_stack[row_slots[b]]      # [B, d_out, m*R]
    h     = bmm(x, A_row.T) * row_slot_weights      # [B, T, m*R]
    y     = base(x) + bmm(h, B_row.T) Zero-padded rows of A and
columns of B add exactly zero. With a trainable adapter attached (:meth:`attach_trainable`, done by
:mod:`hotswap_rt.training`) and autograd on, its parameters are attached to the gathered factors
at its slot's positions (:class:`LayerTrainState`). Nothing here
branches on which adapters are selected: the slot indices and weights are tensors that
:mod:`hotswap_rt.selection` updates in place, so switching never recompiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .selection import Selection


@dataclass(frozen=True)
class LayerTrainState:
    """What one slot layer needs to make its trained slot differentiable.

    Attributes:
        lora_A: ``[r, d_in]`` parameter aliasing the slot's A rows.
        lora_B: ``[d_out, r]`` parameter aliasing the slot's (unscaled) B columns.
        slot: 0-dim int64 tensor on the arena's device: the trained slot's index.
    """

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    slot: torch.Tensor

    def attach(
        self, a_sel: torch.Tensor, b_sel: torch.Tensor, active: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``a_sel [k, R, d_in]``, ``b_sel [k, d_out, R]``, ``active [k]`` -> the same values,
        differentiable w.r.t. ``lora_A``/``lora_B`` wherever ``active == slot``: adds
        ``mask * (P - P.detach())``, exactly zero in value."""
        max_rank, rank = a_sel.shape[1], self.lora_A.shape[0]
        mask = (active == self.slot).to(a_sel.dtype).view(-1, 1, 1)  # [k, 1, 1]
        zero_a = F.pad(self.lora_A - self.lora_A.detach(), (0, 0, 0, max_rank - rank))
        zero_b = F.pad(self.lora_B - self.lora_B.detach(), (0, max_rank - rank))
        return a_sel + mask * zero_a, b_sel + mask * zero_b


class LoraSlotLinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` or transformers ``Conv1D`` and adds the selected LoRA slots.

    Args:
        base: the original layer; its parameters are not modified.
        arena: ``[device_slots, P]`` tensor shared by every layer of the same dtype.
        offset: where this layer's ``A`` (``R*d_in`` values) then ``B`` (``d_out*R``) start in a
            slot row.
        max_rank: ``R``.
        selection: the shared selection tensors.
    """

    def __init__(
        self,
        base: nn.Module,
        arena: torch.Tensor,
        offset: int,
        max_rank: int,
        selection: Selection,
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base_layer_shape(base)
        self.max_rank = max_rank
        self.offset = offset
        # Plain attributes, not buffers: shared by all layers, kept out of the model's state_dict.
        self._arena = arena
        self._selection = selection
        self._train: LayerTrainState | None = None  # set while a trainable adapter targets us

    def set_arena(self, arena: torch.Tensor) -> None:
        """Read slots from ``arena`` from now on (the arena grew: lazy injection, before compile)."""
        self._arena = arena

    def attach_trainable(self, state: LayerTrainState) -> None:
        """Route gradients of the slot ``state.slot`` into ``state``'s parameters (autograd on)."""
        self._train = state

    def detach_trainable(self) -> None:
        """Stop attaching a trainable adapter's parameters."""
        self._train = None

    def slot_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of every slot's factors: A ``[S, R, d_in]`` and B ``[S, d_out, R]`` (scaled)."""
        rank, d_in, d_out = self.max_rank, self.in_features, self.out_features
        a_size = rank * d_in
        a_stack = self._arena.narrow(1, self.offset, a_size).unflatten(1, (rank, d_in))
        b_stack = self._arena.narrow(1, self.offset + a_size, d_out * rank).unflatten(
            1, (d_out, rank)
        )
        return a_stack, b_stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [B, ..., d_out]
        # Grad mode first: under no_grad dynamo never reads (nor guards on) _train.
        training = torch.is_grad_enabled() and self._train is not None
        if self._selection.per_row and not training:  # fixed for the runtime's life
            return y + self._per_row(x).to(y.dtype)
        a_stack, b_stack = self.slot_views()
        active = self._selection.active_slots  # [k]
        k = active.shape[0]
        a_sel = a_stack.index_select(0, active)  # [k, R, d_in]
        b_sel = b_stack.index_select(0, active)  # [k, d_out, R]
        if training:
            a_sel, b_sel = self._train.attach(a_sel, b_sel, active)
        a_act = a_sel.flatten(0, 1)  # [k*R, d_in]
        b_act = b_sel.permute(1, 0, 2).flatten(1)  # [d_out, k*R]
        h = F.linear(x.to(a_act.dtype), a_act)  # [B, ..., k*R]
        weights = self._selection.row_weights[: x.shape[0]].to(h.dtype)  # [B, k]
        weights = weights.view(x.shape[0], *([1] * (x.dim() - 2)), k, 1)
        h = (h.unflatten(-1, (k, self.max_rank)) * weights).flatten(-2)
        return y + F.linear(h, b_act).to(y.dtype)

    def _per_row(self, x: torch.Tensor) -> torch.Tensor:
        """Each row times its own ``m`` slots only (see the module doc); ``[B, ..., d_out]``."""
        batch, rank, d_in, d_out = x.shape[0], self.max_rank, self.in_features, self.out_features
        a_stack, b_stack = self.slot_views()
        slots = self._selection.row_slots[:batch]  # [B, m]
        per_row = slots.shape[1]
        a_row = a_stack.index_select(0, slots.flatten()).view(batch, per_row * rank, d_in)
        b_row = b_stack.index_select(0, slots.flatten()).view(batch, per_row, d_out, rank)
        b_row = b_row.permute(0, 2, 1, 3).reshape(batch, d_out, per_row * rank)
        flat = x.reshape(batch, -1, d_in).to(a_row.dtype)  # [B, T, d_in]
        h = torch.bmm(flat, a_row.transpose(1, 2))  # [B, T, m*R]
        weights = self._selection.row_slot_weights[:batch].to(h.dtype).view(batch, 1, per_row, 1)
        h = (h.unflatten(-1, (per_row, rank)) * weights).flatten(-2)
        return torch.bmm(h, b_row.transpose(1, 2)).view(*x.shape[:-1], d_out)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, max_rank={self.max_rank}"


def base_layer_shape(layer: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` (weight ``[out, in]``) or a ``Conv1D`` (``[in, out]``)."""
    if isinstance(layer, LoraSlotLinear):
        return layer.in_features, layer.out_features
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if is_conv1d(layer):
        d_in, d_out = layer.weight.shape
        return int(d_in), int(d_out)
    raise TypeError(f"unsupported layer type {type(layer).__name__}")


def is_conv1d(layer: nn.Module) -> bool:
    """True for transformers' GPT-2 style ``Conv1D`` (a linear layer storing its weight transposed)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(layer, Conv1D)


def is_supported_layer(layer: nn.Module) -> bool:
    """A layer a slot layer can wrap, or a slot layer already."""
    return isinstance(layer, (nn.Linear, LoraSlotLinear)) or is_conv1d(layer)
