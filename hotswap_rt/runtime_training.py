"""The training half of :class:`~hotswap_rt.runtime.HotswapRuntime`: new adapters, trainable
slots, ``freeze``.

A mixin so that ``runtime.py`` stays readable; it uses the runtime's registry, arena, layers,
lock and slot helpers, and the mechanics live in :mod:`hotswap_rt.training`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from torch import nn

from .config import AdapterInfo, name_matches
from .errors import HotswapError, IncompatibleAdapterError
from .training import Init, TrainableAdapter, check_args, fresh_adapter, make_trainable, snapshot

if TYPE_CHECKING:
    from .registry import AdapterRecord


class TrainingMixin:
    """``add_adapter``, ``trainable_parameters``, ``freeze`` and the training state they share."""

    _trainable: TrainableAdapter | None
    _frozen_base: list[nn.Parameter]

    # ------------------------------------------------------------------ new adapters
    def add_adapter(
        self,
        name: str,
        rank: int,
        alpha: float,
        use_rslora: bool = False,
        targets: Sequence[str] | str | None = None,
        trainable: bool = True,
        init: Init = "kaiming",
    ) -> AdapterInfo:
        """Create a new adapter in a device slot: B = 0 (outputs equal the base model's) and A
        initialised like PEFT (``"kaiming"`` uniform, ``"gaussian"``, or ``"zeros"``).

        Args:
            targets: injected layers to cover (names or suffixes, a regex, or None for all).
            trainable: give it parameters (:meth:`trainable_parameters`) that train the slot in
                place. One trainable adapter at a time; base parameters get
                ``requires_grad=False``.

        Raises:
            HotswapError: bad hyper-parameters, a name in use, another adapter in training, or
                no device slot that can be freed (:class:`SlotsBusyError`); nothing changes.
        """
        self._check_name(name, replace=False)
        check_args(rank, alpha, init, self.config.max_rank)
        if trainable:
            self._check_can_train()
        layer_names = self.targets
        if targets is not None:
            layer_names = [n for n in self.targets if name_matches(targets, n)]
            if not layer_names:
                raise IncompatibleAdapterError(
                    f"add_adapter targets={targets!r} match no injected layer (injected: "
                    f"{self.targets[:6]}...)"
                )
        adapter = fresh_adapter(self.arena, layer_names, rank, float(alpha), use_rslora, init)
        staged = self.arena.stage(adapter, fold_scaling=not trainable)
        return self._commit(name, staged, None, False, use_free_slot=True, trainable=trainable)

    # ---------------------------------------------------------------------------- training
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly what an optimizer should update: the trainable adapter's A and B of every
        layer it targets (unpadded views of its device slot, trained in place).

        Raises:
            HotswapError: no adapter is trainable.
        """
        with self._lock:
            if self._trainable is None:
                raise HotswapError(
                    "no trainable adapter: use add_adapter(..., trainable=True) or "
                    "load(..., trainable=True)"
                )
            return self._trainable.parameters()

    def freeze(self, name: str) -> AdapterInfo:
        """Turn trainable adapter ``name`` into an inference adapter in place: its scaling is
        folded into B, the slot layers stop attaching its parameters, and its slot may be
        reused. The old parameters are detached from the slot (they keep a copy of the trained
        values), so an optimizer still holding them can no longer change what is served."""
        with self._mutation():
            record = self.registry.get(name)
            if self._trainable is None or self._trainable.name != name:
                raise HotswapError(f"adapter {name!r} is not trainable")
            staged = self.arena.stage(snapshot(self._trainable, record.staged.adapter))
            self._stop_training()
            record.staged, record.weight_scale = staged, 1.0
            assert record.slot is not None  # a trainable adapter never leaves its slot
            self._copy_to_slot(record.slot, staged)
            self._write_selection()
            return self._info(record)

    def _check_can_train(self) -> None:
        if self._trainable is not None:
            raise HotswapError(
                f"adapter {self._trainable.name!r} is being trained; freeze or unload it first "
                f"(one trainable adapter at a time)"
            )

    def _start_training(self, record: AdapterRecord) -> None:
        assert record.slot is not None
        trainable = make_trainable(self.arena, record.slot, record.name, record.staged.adapter)
        record.weight_scale, record.training = trainable.scaling, True
        for layer_name, state in trainable.layers.items():
            self._layers[layer_name]._train = state
        for parameter in self.model.parameters():
            if parameter.requires_grad:
                parameter.requires_grad_(False)
                self._frozen_base.append(parameter)
        self._trainable = trainable

    def _stop_training(self) -> None:
        assert self._trainable is not None
        for layer_name, state in self._trainable.layers.items():
            self._layers[layer_name]._train = None
            for parameter in (state.lora_A, state.lora_B):
                # No graph reads these any more: give them their own memory so a stray
                # optimizer step cannot write into a slot another adapter may take.
                parameter.data = parameter.data.clone()
        record = self.registry.records.get(self._trainable.name)
        if record is not None:
            record.training = False
        self._trainable = None

