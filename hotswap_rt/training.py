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

The runtime allows one trainable adapter at a time (:class:`Trainer`); :meth:`HotswapRuntime.freeze`
folds its scaling into B and turns it into an ordinary inference adapter in the same slot.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
from torch import nn

from .arena import SlotArena
from .config import lora_scaling, name_matches
from .errors import HotswapError, IncompatibleAdapterError
from .layers import LayerTrainState, SlotLayer
from .peft_format import LoraModule, ParsedAdapter
from .selection import FLOAT32_MAX

Init = Literal["kaiming", "gaussian", "zeros"]
INITS = ("kaiming", "gaussian", "zeros")


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
        if layout.kind == "conv" and layout.groups > 1:
            raise IncompatibleAdapterError(
                f"{name!r} is a Conv2d with groups={layout.groups}: a new adapter on it cannot be "
                f"trained in a slot (its B is block-diagonal); leave it out of the targets"
            )
        lora_A = torch.zeros(rank, layout.d_in)
        lora_B = torch.zeros(layout.d_out, rank)
        if layout.kind == "embedding":  # PEFT: A = 0, B ~ N(0, 1)
            if init != "zeros":
                nn.init.normal_(lora_B)
        elif init == "kaiming":
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(lora_A, std=1 / rank)
        modules[name] = LoraModule(
            lora_A=lora_A.to(layout.dtype), lora_B=lora_B.to(layout.dtype), rank=rank,
            alpha=alpha, scaling=scaling, kind=layout.kind, kernel=layout.kernel, groups=layout.groups,
        )
    return ParsedAdapter(rank=rank, alpha=alpha, use_rslora=use_rslora, modules=modules,
                         source="add_adapter")


def new_adapter(
    arena: SlotArena,
    rank: int,
    alpha: float,
    use_rslora: bool,
    targets: Sequence[str] | str | None,
    init: Init,
) -> ParsedAdapter:
    """A fresh adapter (:func:`fresh_adapter`) on the injected layers matching ``targets``
    (names or suffixes, a regex, or None for all), after checking the hyper-parameters.

    Raises:
        HotswapError: bad rank/alpha/init, or ``targets`` match no injected layer.
    """
    check_args(rank, alpha, init, arena.max_rank)
    layer_names = list(arena.layouts)
    if targets is not None:
        layer_names = [n for n in arena.layouts if name_matches(targets, n)]
        if not layer_names:
            raise IncompatibleAdapterError(
                f"add_adapter targets={targets!r} match no injected layer (injected: "
                f"{list(arena.layouts)[:6]}...)"
            )
    return fresh_adapter(arena, layer_names, rank, float(alpha), use_rslora, init)


def check_args(rank: object, alpha: object, init: object, max_rank: int) -> None:
    """Raise :class:`HotswapError` unless ``add_adapter``'s hyper-parameters are usable."""
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= max_rank:
        raise HotswapError(f"rank must be an int in 1..max_rank ({max_rank}), got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
        math.isfinite(alpha) and 0 < alpha <= FLOAT32_MAX
    ):  # its scaling (alpha / r or alpha / sqrt(r), at most alpha) is a float32 selection weight
        raise HotswapError(f"alpha must be a positive finite number (at most {FLOAT32_MAX:.4g}), got {alpha!r}")
    if init not in INITS:
        raise HotswapError(f"init must be one of {INITS}, got {init!r}")


def uniform_scaling(adapter: ParsedAdapter) -> float:
    """The one scaling shared by every module, which a trainable adapter needs.

    Raises:
        IncompatibleAdapterError: rank/alpha patterns give modules different scalings, or a
            module is a grouped Conv2d (not trainable in a slot).
    """
    experts = [name for name, m in adapter.modules.items() if m.kind == "experts"]
    if experts:
        raise IncompatibleAdapterError(
            f"{adapter.source or 'state_dict'}: LoRA on expert parameters {experts[:3]} cannot be trained "
            f"in a slot; load it for inference")
    grouped = [name for name, m in adapter.modules.items() if m.kind == "conv" and m.groups > 1]
    if grouped:
        raise IncompatibleAdapterError(
            f"{adapter.source or 'state_dict'}: LoRA on grouped Conv2d layers {grouped[:3]} cannot be "
            f"trained in a slot (its B is block-diagonal); load it for inference"
        )
    scalings = {module.scaling for module in adapter.modules.values()}
    if len(scalings) != 1:
        raise IncompatibleAdapterError(
            f"{adapter.source or 'state_dict'}: a trainable adapter needs one scaling for all "
            f"modules, but its rank/alpha patterns give {sorted(scalings)}; load it for inference"
        )
    scaling = scalings.pop()
    if not scaling <= FLOAT32_MAX:  # a selection weight: Inf in float32 would make every output Inf / NaN
        raise IncompatibleAdapterError(
            f"{adapter.source or 'state_dict'}: its scaling {scaling!r} does not fit a float32 selection "
            f"weight; load it for inference (B * scaling is then checked in the slot dtype)")
    return scaling


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


class Trainer:
    """The one trainable adapter of a runtime: its parameters attached to the slot layers it
    targets, and the base parameters it froze.

    Args:
        model: the injected model (its trainable base parameters are frozen while training).
        layers: the slot layers by name.
        arena: the device slots the parameters alias.
    """

    def __init__(
        self, model: nn.Module, layers: Mapping[str, SlotLayer], arena: SlotArena
    ) -> None:
        self._model = model
        self._layers = layers
        self._arena = arena
        self.adapter: TrainableAdapter | None = None
        self._frozen_base: list[nn.Parameter] = []  # base parameters we set requires_grad=False

    def is_training(self, name: str) -> bool:
        return self.adapter is not None and self.adapter.name == name

    def check_can_train(self) -> None:
        """Raise if an adapter is already being trained (one at a time)."""
        if self.adapter is not None:
            raise HotswapError(
                f"adapter {self.adapter.name!r} is being trained; freeze or unload it first "
                f"(one trainable adapter at a time)"
            )

    def start(self, name: str, slot: int, adapter: ParsedAdapter) -> TrainableAdapter:
        """Make ``adapter`` (already in ``slot``, B unscaled) trainable: parameters aliasing the
        slot, attached to its layers; the base model's parameters stop requiring grad."""
        self.check_can_train()
        trainable = make_trainable(self._arena, slot, name, adapter)
        for layer_name, state in trainable.layers.items():
            self._layers[layer_name].attach_trainable(state)
        for parameter in self._model.parameters():
            if parameter.requires_grad:
                parameter.requires_grad_(False)
                self._frozen_base.append(parameter)
        self.adapter = trainable
        return trainable

    def parameters(self) -> list[nn.Parameter]:
        """The trainable adapter's A and B of every layer it targets.

        Raises:
            HotswapError: no adapter is trainable.
        """
        if self.adapter is None:
            raise HotswapError(
                "no trainable adapter: use add_adapter(..., trainable=True) or "
                "load(..., trainable=True)"
            )
        return self.adapter.parameters()

    def stop(self) -> None:
        """Detach the trainable adapter from its layers. Its parameters get their own memory:
        no graph reads them any more, and a stray optimizer step must not write into a slot
        another adapter may take."""
        assert self.adapter is not None
        for layer_name, state in self.adapter.layers.items():
            self._layers[layer_name].detach_trainable()
            for parameter in (state.lora_A, state.lora_B):
                parameter.data = parameter.data.clone()
        self.adapter = None

    def restore_base(self) -> None:
        """Give back ``requires_grad`` to the base parameters training froze (on eject)."""
        if self.adapter is not None:
            self.stop()
        for parameter in self._frozen_base:
            parameter.requires_grad_(True)
        self._frozen_base.clear()
