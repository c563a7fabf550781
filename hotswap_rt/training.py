"""Trainable adapters: LoRA factors trained in place, inside their device slot.

A trainable adapter occupies a device slot like any other adapter, with three differences:

* Its slot holds B **unscaled**, exactly the factors PEFT trains; its scaling ``s`` is applied
  through the selection weights (row weight ``w * s``), so one forward serves it next to
  inference adapters whose scaling is folded into B.
* For every layer it targets, two ``nn.Parameter`` leaves **alias the slot's memory**:
  A ``[r, d_in]`` and B ``[d_out, r]`` (unpadded). An optimizer step updates the slot itself;
  padded rows/columns beyond ``r`` belong to no parameter and stay exactly zero.
* With autograd on, each slot layer adds ``mask * (P - P.detach())`` to its gathered factors,
  ``mask[k] = (active[k] == slot)``. That is exactly zero in value (the forward reads the same
  numbers as in inference) and routes the gradient of the trained slot's positions into the
  parameters. Nothing branches on which slot is trained, so a compiled graph follows.

The runtime allows one trainable adapter at a time; :meth:`HotswapRuntime.freeze` folds its
scaling into B and turns it into an ordinary inference adapter in the same slot.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .arena import SlotArena
from .config import lora_scaling
from .errors import HotswapError, IncompatibleAdapterError
from .peft_format import LoraModule, ParsedAdapter

Init = Literal["kaiming", "gaussian", "zeros"]
INITS = ("kaiming", "gaussian", "zeros")


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
        differentiable w.r.t. ``lora_A``/``lora_B`` wherever ``active == slot``."""
        max_rank, rank = a_sel.shape[1], self.lora_A.shape[0]
        mask = (active == self.slot).to(a_sel.dtype).view(-1, 1, 1)  # [k, 1, 1]
        zero_a = F.pad(self.lora_A - self.lora_A.detach(), (0, 0, 0, max_rank - rank))
        zero_b = F.pad(self.lora_B - self.lora_B.detach(), (0, max_rank - rank))
        return a_sel + mask * zero_a, b_sel + mask * zero_b


@dataclass(frozen=True)
class TrainableAdapter:
    """The trainable adapter's parameters, by layer name, and where it lives."""

    name: str
    slot: int
    scaling: float
    layers: dict[str, LayerTrainState]

    def parameters(self) -> list[nn.Parameter]:
        """A then B of every targeted layer, in layer order: what an optimizer should update."""
        return [p for state in self.layers.values() for p in (state.lora_A, state.lora_B)]


def fresh_adapter(
    arena: SlotArena,
    targets: list[str],
    rank: int,
    alpha: float,
    use_rslora: bool,
    init: Init,
) -> ParsedAdapter:
    """A new adapter on ``targets``: B = 0 and A initialised like PEFT (``kaiming``:
    ``kaiming_uniform_(a=sqrt(5))``; ``gaussian``: ``normal_(std=1/r)``; ``zeros``: A = 0 too,
    a placeholder through which no gradient flows). Uses torch's default generator."""
    scaling = lora_scaling(rank, alpha, use_rslora)
    modules: dict[str, LoraModule] = {}
    for name in targets:
        layout = arena.layouts[name]
        lora_A = torch.zeros(rank, layout.d_in)
        if init == "kaiming":
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(lora_A, std=1 / rank)
        lora_B = torch.zeros(layout.d_out, rank)
        modules[name] = LoraModule(
            lora_A=lora_A.to(layout.dtype), lora_B=lora_B.to(layout.dtype), rank=rank,
            alpha=alpha, scaling=scaling,
        )
    return ParsedAdapter(rank=rank, alpha=alpha, use_rslora=use_rslora, modules=modules,
                         source="add_adapter")


def check_args(rank: object, alpha: object, init: object, max_rank: int) -> None:
    """Raise :class:`HotswapError` unless ``add_adapter``'s hyper-parameters are usable."""
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= max_rank:
        raise HotswapError(f"rank must be an int in 1..max_rank ({max_rank}), got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
        math.isfinite(alpha) and alpha > 0
    ):
        raise HotswapError(f"alpha must be a positive finite number, got {alpha!r}")
    if init not in INITS:
        raise HotswapError(f"init must be one of {INITS}, got {init!r}")


def uniform_scaling(adapter: ParsedAdapter) -> float:
    """The one scaling shared by every module, which a trainable adapter needs.

    Raises:
        IncompatibleAdapterError: rank/alpha patterns give modules different scalings.
    """
    scalings = {module.scaling for module in adapter.modules.values()}
    if len(scalings) != 1:
        raise IncompatibleAdapterError(
            f"{adapter.source or 'state_dict'}: a trainable adapter needs one scaling for all "
            f"modules, but its rank/alpha patterns give {sorted(scalings)}; load it for inference"
        )
    return scalings.pop()


def make_trainable(arena: SlotArena, slot: int, name: str, adapter: ParsedAdapter) -> TrainableAdapter:
    """Parameters aliasing ``slot``'s memory for every module of ``adapter`` (already copied
    into the slot, B unscaled)."""
    slot_index = torch.tensor(slot, dtype=torch.long, device=arena.device)
    layers: dict[str, LayerTrainState] = {}
    for layer_name, module in adapter.modules.items():
        a_view, b_view = arena.slot_factors(slot, layer_name, module.rank)
        layers[layer_name] = LayerTrainState(nn.Parameter(a_view), nn.Parameter(b_view), slot_index)
    return TrainableAdapter(name=name, slot=slot, scaling=uniform_scaling(adapter), layers=layers)


@torch.no_grad()
def snapshot(trainable: TrainableAdapter, adapter: ParsedAdapter) -> ParsedAdapter:
    """``adapter`` with its factors replaced by the current trained values (CPU copies)."""
    modules = {
        name: dataclasses.replace(
            adapter.modules[name],
            lora_A=state.lora_A.detach().cpu().clone(),
            lora_B=state.lora_B.detach().cpu().clone(),
        )
        for name, state in trainable.layers.items()
    }
    return dataclasses.replace(adapter, modules=modules)
