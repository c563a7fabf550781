"""The LoRA slot layers: a frozen base layer plus a read of the shared slot arena.

Linear layers (``nn.Linear``, ``Conv1D``) below; ``nn.Conv2d`` and ``nn.Embedding`` use the same
slot rows and selection, meeting the input with a conv or an embedding lookup instead of the
first matmul (:class:`LoraSlotConv2d`, :class:`LoraSlotEmbedding`).

One forward, for ``k`` active slots of rank ``R`` (``k = max_active_adapters``)::

    x: [B, ..., d_in]
    A_act  = A_stack[active]           # [k, R, d_in]    -> [k*R, d_in]
    Bt_act = Bt_stack[active]          # [k, R, d_out]   -> [k*R, d_out]  (B^T, scaling folded in)
    h      = x @ A_act.T               # [B, ..., k*R]
    h      = h * row_weights[:B]       # per-row, per-adapter weight (0 = adapter off: exactly 0)
    y      = base(x) + h @ Bt_act      # [B, ..., d_out]

(``A_stack`` / ``Bt_stack`` are strided views of the rank-major arena, see :mod:`hotswap_rt.arena`.)

The active set acts like one LoRA of rank ``k*R`` whose column groups are switched per row, so a
uniform batch, a weighted sum and a mixed batch are the same two matmuls.

Per row (when ``RuntimeConfig.max_adapters_per_row`` = m < k), each row gathers only its own
slots' factors, so the cost follows m instead of k::

    A_row  = A_stack[row_slots[b]]     # [B, m*R, d_in]
    Bt_row = Bt_stack[row_slots[b]]    # [B, m*R, d_out]
    h      = bmm(x, A_row.T) * row_slot_weights     # [B, T, m*R]
    y      = base(x) + bmm(h, Bt_row)

(With ``RuntimeConfig.per_row_decode="reduce"``, one-token steps skip the gathered copies: each
row's factors are read in place by a broadcast product summed over ``d_in``, then over the
ranks: :meth:`LoraSlotLinear._per_row_reduce`.)

With scale vectors (IA3, DoRA, LoRA bias: ``RuntimeConfig.scale_vectors``), each row's weighted
sum of its adapters' vectors scales the base layer's input and output and adds a bias
(:meth:`SlotLayer._scaled_base`); the LoRA product above is added to that.

Zero-padded rows of A and columns of B add exactly zero. With a trainable adapter attached
(:meth:`attach_trainable`, done by :mod:`hotswap_rt.training`) and autograd on, its parameters
are attached to the gathered factors at its slot's positions (:class:`LayerTrainState`).
Nothing here branches on which adapters are selected: the slot indices and weights are tensors
that :mod:`hotswap_rt.selection` updates in place, so switching never recompiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .arena import LayerLayout, LayerShape
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
        self, a_sel: torch.Tensor, bt_sel: torch.Tensor, active: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``a_sel [k, R, d_in]``, ``bt_sel [k, R, d_out]`` (B^T), ``active [k]`` -> the same
        values, differentiable w.r.t. ``lora_A``/``lora_B`` wherever ``active == slot``: adds
        ``mask * (P - P.detach())``, exactly zero in value."""
        max_rank, rank = a_sel.shape[1], self.lora_A.shape[0]
        mask = (active == self.slot).to(a_sel.dtype).view(-1, 1, 1)  # [k, 1, 1]
        zero_a = F.pad(self.lora_A - self.lora_A.detach(), (0, 0, 0, max_rank - rank))
        zero_bt = F.pad((self.lora_B - self.lora_B.detach()).t(), (0, 0, 0, max_rank - rank))
        return a_sel + mask * zero_a, bt_sel + mask * zero_bt


def weigh(h: torch.Tensor, weights: torch.Tensor, on: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``h * weights`` where ``on`` (the weight is not 0), an exact ``zero`` elsewhere (shapes
    broadcast). Not ``h * 0``: an unselected slot read in place, a padding position or a freed
    slot's stale bytes may hold finite factors whose product with x overflows, and inf * 0 is
    NaN."""
    return torch.where(on, h * weights.to(h.dtype), zero)


class SlotLayer(nn.Module):
    """A frozen base layer plus the selected LoRA slots; the layer kinds below differ only in
    how the factors meet the input (see the module doc for the linear case).

    Args:
        base: the original layer; its parameters are not modified.
        arena: ``[device_slots, P]`` tensor shared by every layer of the same dtype.
        layout: where this layer lives in a slot row (its offset in each rank block; its scale
            vectors' offset, if it has them).
        vector_size: ``V`` of the arena: where the rank blocks start in a row.
        max_rank: ``R``.
        selection: the shared selection tensors.
    """

    def __init__(
        self,
        base: nn.Module,
        arena: torch.Tensor,
        layout: LayerLayout,
        vector_size: int,
        max_rank: int,
        selection: Selection,
    ) -> None:
        super().__init__()
        self.base = base
        self.shape = layout.shape
        self.in_features, self.out_features = self.shape.d_in, self.shape.d_out
        self.max_rank = max_rank
        # Plain attributes, not buffers: shared by all layers, kept out of the model's state_dict.
        self.set_arena(arena, layout, vector_size)
        self._selection = selection
        self._train: LayerTrainState | None = None  # set while a trainable adapter targets us

    def set_arena(self, arena: torch.Tensor, layout: LayerLayout, vector_size: int) -> None:
        """Read slots from ``arena`` with ``layout`` from now on (the arena grew: lazy injection
        or scale vectors, before compile)."""
        self._arena = arena
        self.offset = layout.offset
        self.vector_offset = layout.vectors  # -1: no scale vectors (fixed once compiled)
        self._vector_in = layout.vector_in  # values of the input scale
        self._vector_size = vector_size

    def attach_trainable(self, state: LayerTrainState) -> None:
        """Route gradients of the slot ``state.slot`` into ``state``'s parameters (autograd on)."""
        self._train = state

    def detach_trainable(self) -> None:
        """Stop attaching a trainable adapter's parameters."""
        self._train = None

    def ranks(self) -> int:
        """Ranks the forward multiplies: the selection's rank bucket (``RuntimeConfig.rank_buckets``;
        a plain int, so each bucket is its own compiled graph), else ``max_rank``."""
        bucket = self._selection.rank_bucket
        return self.max_rank if bucket is None else bucket

    def slot_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of every slot's first ``r`` = :meth:`ranks` ranks: A ``[S, r, d_in]`` and B^T
        ``[S, r, d_out]`` (scaled)."""
        blocks = self._arena[:, self._vector_size :].unflatten(1, (self.max_rank, -1))  # [S, R, W]
        rank = self.ranks()
        if rank != self.max_rank:
            blocks = blocks[:, :rank]  # the rank-major prefix: every rank beyond it is zero
        a_stack = blocks.narrow(2, self.offset, self.in_features)
        bt_stack = blocks.narrow(2, self.offset + self.in_features, self.out_features)
        return a_stack, bt_stack

    def _training(self) -> bool:
        # Grad mode first: under no_grad dynamo never reads (nor guards on) _train.
        return torch.is_grad_enabled() and self._train is not None

    def _active_factors(self, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The active slots' factors as one LoRA of rank ``k*R``: A ``[k*R, d_in]``,
        B^T ``[k*R, d_out]`` (the trainable adapter's parameters attached when ``training``).
        With in-place reads, ``k = S`` and these are views of the arena (rows ``W`` apart)."""
        a_stack, bt_stack = self.slot_views()
        if self._selection.in_place and not training:  # fixed for life: every slot, no gather
            return a_stack.flatten(0, 1), bt_stack.flatten(0, 1)  # strided views [S*R, ..]
        active = self._selection.active_slots  # [k]
        a_sel = a_stack.index_select(0, active)  # [k, R, d_in]
        bt_sel = bt_stack.index_select(0, active)  # [k, R, d_out]
        if training:
            assert self._train is not None
            a_sel, bt_sel = self._train.attach(a_sel, bt_sel, active)
        return a_sel.flatten(0, 1), bt_sel.flatten(0, 1)

    def _weigh(self, h: torch.Tensor, dim: int, per_row: bool = False) -> torch.Tensor:
        """``h`` with its ``[.., n*R, ..]`` dim ``dim`` (``n`` positions of ``R`` ranks) scaled per
        position by the rows' weights (batch in dim 0 of ``h``): ``row_weights [B, n]``, or
        ``row_slot_weights`` when ``per_row``; a weight of 0 gives exactly 0 (:func:`weigh`)."""
        selection = self._selection
        batch = h.shape[0]
        weights = (selection.row_slot_weights if per_row else selection.row_weights)[:batch]
        on = (selection.row_slot_on if per_row else selection.row_on)[:batch]
        n = weights.shape[1]
        dim = dim % h.dim()
        h = h.unflatten(dim, (n, -1))
        shape = [batch] + [1] * (h.dim() - 1)
        shape[dim] = n
        return weigh(h, weights.view(shape), on.view(shape), selection.zero).flatten(dim, dim + 1)

    def _row_slots(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row mode: each row's ``m`` slots' factors, A ``[B, m, R, d_in]`` and
        B^T ``[B, m, R, d_out]`` (their weights: :meth:`_weigh` with ``per_row``)."""
        a_stack, bt_stack = self.slot_views()
        slots = self._selection.row_slots[:batch]  # [B, m]
        per_row = slots.shape[1]
        a_row = a_stack.index_select(0, slots.flatten()).unflatten(0, (batch, per_row))
        bt_row = bt_stack.index_select(0, slots.flatten()).unflatten(0, (batch, per_row))
        return a_row, bt_row

    def _row_vectors(self, batch: int, per_row: bool, training: bool, size: int | None = None) -> torch.Tensor:
        """Each row's part of the vector region, its adapters' weighted sum: ``[B, size]``
        (default: the scale vectors, ``d_in + 2*d_out``, a Conv2d's ``C_in + 2*C_out``: input
        scale, output scale, output bias, differences from the identity)."""
        size = self._vector_in + 2 * self.out_features if size is None else size
        if per_row:
            vectors = self._arena.narrow(1, self.vector_offset, size)  # [S, size]
            slots = self._selection.row_slots[:batch]  # [B, m]
            picked = vectors.index_select(0, slots.flatten()).unflatten(0, slots.shape)  # [B, m, size]
            weights = self._selection.row_slot_weights[:batch].to(vectors.dtype)
            return torch.bmm(weights.unsqueeze(1), picked).squeeze(1)
        vectors = self._active_region(size, training)
        return self._selection.row_weights[:batch].to(vectors.dtype) @ vectors

    def _active_region(self, size: int, training: bool) -> torch.Tensor:
        """The stacked path's slots' part of the vector region: ``[S, size]`` read in place, or
        the ``k`` active slots gathered ``[k, size]`` (the columns of ``row_weights``)."""
        region = self._arena.narrow(1, self.vector_offset, size)  # [S, size]
        if self._selection.in_place and not training:
            return region
        return region.index_select(0, self._selection.active_slots)

    def _scaled_base(self, x: torch.Tensor, per_row: bool, training: bool) -> torch.Tensor:
        """The base layer with the rows' scale vectors: ``base(x * (1 + in)) * (1 + out) + bias``
        (IA3 scales, DoRA's ``s - 1`` and bias correction, LoRA bias), written as additions so
        a zero vector changes nothing and a small one survives bf16. On a Conv2d they act per
        channel (``[B, C, 1, 1]``); an Embedding has no input scale (its input is ids)."""
        d_in, d_out = self._vector_in, self.out_features
        vectors = self._row_vectors(x.shape[0], per_row, training)
        if d_in:
            y = self.base(x + x * self._per_sample(vectors[:, :d_in], x))
        else:  # an Embedding: no input scale
            y = self.base(x)
        out_scale = self._per_sample(vectors[:, d_in : d_in + d_out], y)
        out_bias = self._per_sample(vectors[:, d_in + d_out :], y)
        return y + y * out_scale + out_bias

    def _per_sample(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``values [B, n]`` shaped to broadcast over ``like`` sample by sample, in its dtype:
        along a Conv2d's channels (dim 1), else along the last dim."""
        if self.shape.kind == "conv":  # [B, C, H, W]
            return values.reshape(values.shape[0], -1, 1, 1).to(like.dtype)
        return values.reshape(values.shape[0], *(1,) * (like.dim() - 2), -1).to(like.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, max_rank={self.max_rank}"


class LoraSlotLinear(SlotLayer):
    """Wraps a frozen ``nn.Linear`` or transformers ``Conv1D`` (input ``[B, ..., d_in]``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = self._training()
        per_row = self._selection.per_row and not training  # fixed for the runtime's life
        if self.vector_offset >= 0:  # fixed once compiled
            y = self._scaled_base(x, per_row, training)
        else:
            y = self.base(x)  # [B, ..., d_out]
        if per_row:
            return y + self._per_row(x).to(y.dtype)
        a_act, bt_act = self._active_factors(training)
        h = F.linear(x.to(a_act.dtype), a_act)  # [B, ..., k*R]
        h = self._weigh(h, dim=-1)
        return y + torch.matmul(h, bt_act).to(y.dtype)

    def _per_row(self, x: torch.Tensor) -> torch.Tensor:
        """Each row times its own ``m`` slots only (see the module doc); ``[B, ..., d_out]``."""
        batch, d_in, d_out = x.shape[0], self.in_features, self.out_features
        if self._selection.per_row_decode_reduce and x.numel() == batch * d_in:  # one token a row
            return self._per_row_reduce(x).view(*x.shape[:-1], d_out)
        a_row, bt_row = self._row_slots(batch)
        a_row, bt_row = a_row.flatten(1, 2), bt_row.flatten(1, 2)  # [B, m*R, d_in], [B, m*R, d_out]
        flat = x.reshape(batch, -1, d_in).to(a_row.dtype)  # [B, T, d_in]
        h = self._weigh(torch.bmm(flat, a_row.transpose(1, 2)), dim=-1, per_row=True)  # [B, T, m*R]
        return torch.bmm(h, bt_row).view(*x.shape[:-1], d_out)

    def _per_row_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_per_row` for one token a row (``x`` holds ``B * d_in`` values), the factors
        read where they lie: ``h[b, i, j] = sum_d x[b, d] * A[slot[b, i], j, d]``, weighted, then
        ``out[b, o] = sum_{i, j} h[b, i, j] * Bt[slot[b, i], j, o]``. Compiled, each sum is one
        kernel whose loads index the arena by the row's slot (nothing gathered first).
        Returns ``[B, d_out]``."""
        batch = x.shape[0]
        a_stack, bt_stack = self.slot_views()  # [S, R, d_in], [S, R, d_out]
        slots = self._selection.row_slots[:batch]  # [B, m]
        per_row = slots.shape[1]
        rows = x.reshape(batch, 1, 1, self.in_features).to(a_stack.dtype)
        h = (rows * a_stack[slots]).sum(-1)  # [B, m, R]
        h = self._weigh(h.flatten(1), dim=-1, per_row=True)  # [B, m*R]
        return (h.view(batch, per_row, -1, 1) * bt_stack[slots]).sum((1, 2))  # [B, d_out]


class FullSlotLinear(SlotLayer):
    """Wraps a frozen ``nn.Linear`` named in an adapter's ``modules_to_save`` (trained in full):
    each slot holds the module's weight and bias minus the base's, so a row computes
    ``base(x) + x @ (sum_i w_i dW_i)^T + sum_i w_i db_i`` (with weight 1: the adapter's own
    module; a row without it: the base module). Stacked, that is one product per active slot
    (``x @ [dW_1; ...; dW_k]^T``, weighted per row); per row, each row's slots are combined
    first and multiplied with one ``bmm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [B, ..., d_out]
        batch, d_in, d_out = x.shape[0], self.in_features, self.out_features
        training = self._training()
        size = d_out * (d_in + 1)
        if self._selection.per_row and not training:
            # each row's m slots combined first: [B, d_out*(d_in+1)], then one bmm
            deltas = self._row_vectors(batch, True, training, size=size)
            delta_w = deltas[:, : d_out * d_in].view(batch, d_out, d_in)
            flat = x.reshape(batch, -1, d_in).to(delta_w.dtype)  # [B, T, d_in]
            out = torch.baddbmm(deltas[:, d_out * d_in :].unsqueeze(1), flat, delta_w.transpose(1, 2))
            return y + out.view(*x.shape[:-1], d_out).to(y.dtype)
        # stacked: one product per active slot (never a per-row copy of the weights)
        region = self._active_region(size, training)  # [k, size]
        weights = self._selection.row_weights[:batch].to(region.dtype)  # [B, k]
        delta_w = region[:, : d_out * d_in].reshape(-1, d_in)  # [k*d_out, d_in]
        h = self._weigh(F.linear(x.to(delta_w.dtype), delta_w), dim=-1)  # [B, ..., k*d_out]
        out = h.unflatten(-1, (weights.shape[1], d_out)).sum(-2)  # [B, ..., d_out]
        shape = (batch,) + (1,) * (x.dim() - 2) + (-1,)
        out = out + (weights @ region[:, d_out * d_in :]).view(shape)
        return y + out.to(y.dtype)


class FullSlotEmbedding(SlotLayer):
    """Wraps a frozen ``nn.Embedding`` named in an adapter's ``modules_to_save``: each slot holds
    the module's weight minus the base's, ``[num_embeddings, dim]``, so a row computes
    ``base(ids) + sum_i w_i dE_i[ids]`` (with weight 1: the adapter's own embedding; a row
    without it: the base one). Only the looked-up rows of each slot's delta are read."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)  # [B, ..., dim]
        batch, vocab, dim = ids.shape[0], self.in_features, self.out_features
        training = self._training()
        flat = ids.reshape(batch, -1)  # [B, T]
        if self._selection.per_row and not training:
            deltas = self._arena.narrow(1, self.vector_offset, vocab * dim).view(-1, vocab, dim)  # [S, V, dim]
            slots = self._selection.row_slots[:batch]  # [B, m]
            picked = deltas[slots[:, :, None], flat[:, None, :]]  # [B, m, T, dim]
            weights = self._selection.row_slot_weights[:batch].to(picked.dtype)  # [B, m]
            out = (picked * weights[:, :, None, None]).sum(1)  # [B, T, dim]
        else:
            deltas = self._active_region(vocab * dim, training).unflatten(1, (vocab, dim))  # [k or S, V, dim]
            weights = self._selection.row_weights[:batch].to(deltas.dtype)  # [B, k or S]
            picked = deltas[:, flat]  # [k, B, T, dim]
            out = torch.einsum("bk,kbtd->btd", weights, picked)
        return y + out.view(*ids.shape, dim).to(y.dtype)


class LoraSlotConv2d(SlotLayer):
    """Wraps a frozen ``nn.Conv2d`` (input ``[B, C_in, H, W]``), as PEFT does: A is a conv with
    the base's kernel, stride and padding (``[R, C_in, kh, kw]``), B a 1x1 conv, stored as its
    block-diagonal matrix when the base has ``groups`` (see :class:`~hotswap_rt.peft_format.LoraModule`)::

        h = conv2d(x, A_act)              # [B, k*R, H', W']
        y = base(x) + conv2d(h * w, B_act)  # B_act: [C_out, k*R, 1, 1]
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"LoRA slots on Conv2d need a batched [B, C, H, W] input, got {tuple(x.shape)}")
        training = self._training()
        per_row = self._selection.per_row and not training  # fixed for the runtime's life
        if self.vector_offset >= 0:  # fixed once compiled
            y = self._scaled_base(x, per_row, training)  # [B, C_out, H', W']
        else:
            y = self.base(x)  # [B, C_out, H', W']
        if per_row:
            return y + self._per_row(x).to(y.dtype)
        a_act, bt_act = self._active_factors(training)
        h = self._conv_a(x.to(a_act.dtype), a_act.reshape(-1, *self.shape.kernel), groups=1)
        h = self._weigh(h, dim=1)
        return y + F.conv2d(h, bt_act.t()[:, :, None, None]).to(y.dtype)

    def _per_row(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample through its own ``m`` slots: the batch as conv groups."""
        batch, channels, height, width = x.shape
        a_row, bt_row = self._row_slots(batch)  # [B, m, R, d_in], [B, m, R, d_out]
        per_row = a_row.shape[1]
        rank = a_row.shape[2]
        kernels = a_row.reshape(batch * per_row * rank, *self.shape.kernel)
        flat = x.reshape(1, batch * channels, height, width).to(kernels.dtype)
        h = self._conv_a(flat, kernels, groups=batch)  # [1, B*m*R, H', W']
        h = self._weigh(h.view(batch, per_row * rank, *h.shape[2:]), dim=1, per_row=True)
        h = h.view(batch, per_row, rank, *h.shape[2:])
        return torch.einsum("bmrhw,bmro->bohw", h, bt_row)

    def _conv_a(self, x: torch.Tensor, kernels: torch.Tensor, groups: int) -> torch.Tensor:
        base = self.base
        return F.conv2d(x, kernels, stride=base.stride, padding=base.padding, groups=groups)


class LoraSlotEmbedding(SlotLayer):
    """Wraps a frozen ``nn.Embedding`` (input token ids ``[B, ...]``), as PEFT does:
    ``y = base(ids) + A.T[ids] @ B.T`` with A ``[R, num_embeddings]``, B ``[dim, R]``. The rows
    of A are looked up in place (no gather of the slots' full A)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        training = self._training()
        per_row = self._selection.per_row and not training  # fixed for the runtime's life
        if self.vector_offset >= 0:  # fixed once compiled: DoRA's output scale
            y = self._scaled_base(ids, per_row, training)  # [B, ..., dim]
        else:
            y = self.base(ids)  # [B, ..., dim]
        if per_row:
            return y + self._per_row(ids).to(y.dtype)
        a_act, bt_act = self._active_factors(training)  # [k*R, V], [k*R, dim]
        h = F.embedding(ids, a_act.t())  # [B, ..., k*R]
        h = self._weigh(h, dim=-1)
        return y + torch.matmul(h, bt_act).to(y.dtype)

    def _per_row(self, ids: torch.Tensor) -> torch.Tensor:
        batch = ids.shape[0]
        a_stack, bt_stack = self.slot_views()  # [S, R, V], [S, R, dim]
        slots = self._selection.row_slots[:batch]  # [B, m]
        flat = ids.reshape(batch, -1)  # [B, T]
        h = a_stack.permute(0, 2, 1)[slots[:, None, :], flat[:, :, None]]  # [B, T, m, R]
        h = self._weigh(h.flatten(2), dim=-1, per_row=True)  # [B, T, m*R]
        bt_row = bt_stack.index_select(0, slots.flatten()).view(batch, -1, self.out_features)  # [B, m*R, dim]
        return torch.bmm(h, bt_row).view(*ids.shape, self.out_features)


def make_slot_layer(
    base: nn.Module, arena: torch.Tensor, layout: LayerLayout, vector_size: int, max_rank: int,
    selection: Selection,
) -> SlotLayer:
    """The slot layer for ``layout``'s kind."""
    classes = {"linear": LoraSlotLinear, "conv": LoraSlotConv2d, "embedding": LoraSlotEmbedding,
               "full": FullSlotLinear, "full_embedding": FullSlotEmbedding}
    return classes[layout.kind](base, arena, layout, vector_size, max_rank, selection)


def layer_shape(layer: nn.Module, full: bool = False) -> LayerShape:
    """What a slot row holds for ``layer`` (see :class:`~hotswap_rt.arena.LayerShape`);
    ``full``: as a ``modules_to_save`` module (whole weight deltas; ``nn.Linear`` and
    ``nn.Embedding``).

    Raises:
        TypeError: not a layer a slot layer can wrap.
    """
    if isinstance(layer, SlotLayer):
        return layer.shape
    dtype = layer.weight.dtype if hasattr(layer, "weight") else torch.float32
    if full and type(layer) not in (nn.Linear, nn.Embedding):
        raise TypeError(f"modules_to_save holds nn.Linear and nn.Embedding modules only, not "
                        f"{type(layer).__name__}")
    unsupported = unsupported_reason(layer)
    if unsupported:
        raise TypeError(unsupported)
    if full and type(layer) is nn.Embedding:
        return LayerShape(layer.num_embeddings, layer.embedding_dim, dtype, "full_embedding")
    if full:
        return LayerShape(layer.in_features, layer.out_features, dtype, "full")
    if isinstance(layer, nn.Linear):
        return LayerShape(layer.in_features, layer.out_features, dtype)
    if is_conv1d(layer):
        d_in, d_out = layer.weight.shape
        return LayerShape(int(d_in), int(d_out), dtype)
    if isinstance(layer, nn.Conv2d):
        c_out, c_in_per_group, kh, kw = layer.weight.shape
        kernel = (layer.in_channels, int(kh), int(kw))
        return LayerShape(layer.in_channels * kh * kw, int(c_out), dtype, "conv", kernel, layer.groups)
    if isinstance(layer, nn.Embedding):
        return LayerShape(layer.num_embeddings, layer.embedding_dim, dtype, "embedding")
    raise TypeError(f"unsupported layer type {type(layer).__name__}")


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why a layer of a supported type still cannot carry LoRA slots (None: it can)."""
    if isinstance(layer, nn.Conv2d):
        if layer.dilation != (1, 1) or layer.padding_mode != "zeros":
            return (f"{layer!r}: LoRA on Conv2d with dilation or padding_mode other than 'zeros' "
                    f"is not supported (PEFT's LoRA ignores both)")
    if isinstance(layer, nn.Embedding) and (layer.max_norm is not None or layer.sparse):
        return f"{layer!r}: LoRA on an Embedding with max_norm or sparse=True is not supported"
    return None


def is_conv1d(layer: nn.Module) -> bool:
    """True for transformers' GPT-2 style ``Conv1D`` (a linear layer storing its weight transposed)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(layer, Conv1D)


LINEAR_TYPES = "nn.Linear/Conv1D/Conv2d/Embedding"  # what error messages call the supported layers


def is_supported_layer(layer: nn.Module) -> bool:
    """A layer a slot layer can wrap, or a slot layer already."""
    if isinstance(layer, (nn.Conv2d, nn.Embedding)):
        return unsupported_reason(layer) is None
    return isinstance(layer, (nn.Linear, SlotLayer)) or is_conv1d(layer)


def is_linear_layer(layer: nn.Module) -> bool:
    """An ``nn.Linear`` or ``Conv1D`` (what ``"all-linear"`` targets)."""
    return isinstance(layer, nn.Linear) or is_conv1d(layer)
