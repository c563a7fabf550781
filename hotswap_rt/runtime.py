"""``HotswapRuntime``: the public facade tying injection, arena, registry, selection and guard.

::

    load(name, dir)  -> parse + validate + stage (host row)  -> registry  -> free device slot?
    activate(...)    -> ensure each adapter has a device slot (LRU)      -> write selection tensors
    model(...)       -> lock, guard.call(compiled forward)               -> slot layers read arena

Every mutation happens under one re-entrant lock that forwards also take, so a forward never sees
a slot or the selection half-written. Slow work (reading files, validating, staging) runs outside
the lock. Each method validates everything before it changes anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch._dynamo
from torch import nn

from .arena import SlotArena, StagedAdapter
from .config import AdapterInfo, RuntimeConfig, lora_scaling
from .errors import HotswapError, SelectionError, SlotsBusyError
from .guard import GuardMode, RecompileGuard
from .inject import find_targets, replace_modules
from .inputs import as_kwargs, batch_size, unview
from .layers import LoraSlotLinear, base_layer_shape
from .peft_format import parse_adapter, read_adapter_dir, resolve_source, write_adapter_dir
from .registry import AdapterRecord, AdapterRegistry
from .selection import Selection
from .stats import SwapStats
from .runtime_training import TrainingMixin
from .training import TrainableAdapter, snapshot, uniform_scaling

Activation = str | Mapping[str, float] | None


class HotswapRuntime(TrainingMixin):
    """Serve many LoRA adapters from one (compiled) transformers model without recompiling.

    Args:
        model: any transformers model (or ``nn.Module`` whose forward takes ``input_ids``).
            Modified in place: targeted layers become :class:`LoraSlotLinear`.
        config: slot sizes and targets; defaults to :class:`RuntimeConfig()`.

    Raises:
        TargetNotFoundError: ``config.target_modules`` matches no linear layer.
    """

    def __init__(self, model: nn.Module, config: RuntimeConfig | None = None) -> None:
        self.config = config = config or RuntimeConfig()
        self.model = model
        names = find_targets(model, config.target_modules, config.exclude_modules)
        bases = {name: model.get_submodule(name) for name in names}
        devices = {base.weight.device for base in bases.values()}
        if len(devices) != 1:
            raise HotswapError(f"targeted layers span several devices {devices}; not supported")
        device = devices.pop()
        layer_shapes = {
            name: (*base_layer_shape(base), base.weight.dtype) for name, base in bases.items()
        }
        self.arena = SlotArena(layer_shapes, config.max_rank, config.device_slots, device)
        self.selection = Selection(config.max_batch_size, config.max_active_adapters, device)
        self._layers = {
            name: LoraSlotLinear(
                base,
                self.arena.arenas[base.weight.dtype],
                self.arena.layouts[name].offset,
                config.max_rank,
                self.selection,
            )
            for name, base in bases.items()
        }
        self._injection = replace_modules(model, self._layers)
        self.registry = AdapterRegistry(config.host_slots, config.device_slots)
        self.guard = RecompileGuard()
        self._stats = SwapStats()
        self._lock = threading.RLock()
        self._rows: list[dict[str, float]] = []  # the selection by name; [] = no adapter
        self._per_row = False
        self._enabled = True
        self._executor: ThreadPoolExecutor | None = None
        self._eager_forward = model.forward
        self._forward_impl: Callable[..., Any] = self._eager_forward
        self._forward_params = list(inspect.signature(self._eager_forward).parameters)
        self.compiled = False
        self._trainable: TrainableAdapter | None = None
        self._frozen_base: list[nn.Parameter] = []  # base parameters we set requires_grad=False
        self._restore_on_eject: dict[str, Any] = {}
        model.forward = self._forward  # instance attribute: model(...) and generate() use it

    @property
    def targets(self) -> list[str]:
        """Names of the injected layers."""
        return list(self.arena.layouts)

    # -------------------------------------------------------------------- loading and saving
    def load(
        self,
        name: str,
        source: str | os.PathLike[str] | None = None,
        *,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        config: Mapping[str, Any] | Any = None,
        replace: bool = False,
        allow_pickle: bool = False,
        allow_nonfinite: bool = False,
        trainable: bool = False,
    ) -> AdapterInfo:
        """Load a PEFT LoRA adapter from a directory, a Hub id, or ``state_dict`` + ``config``.

        The adapter is validated completely, zero-padded to ``max_rank``, scaled and staged in
        host memory, then copied into a free device slot if there is one (else it waits on the
        host until activated). ``replace=True`` swaps new weights in under an existing name
        atomically: forwards see the old or the new adapter, never a mix.

        ``allow_pickle=True`` also reads ``adapter_model.bin`` (``torch.load(weights_only=True)``).
        ``trainable=True`` puts it in a device slot for continued training (see
        :meth:`add_adapter`); it needs one scaling for all modules.

        Raises:
            HotswapError: (a subclass) for any bad input; nothing changes.
        """
        self._check_name(name, replace)
        if trainable:
            self._check_can_train()
        staged = self._read_and_stage(
            source, state_dict, config, allow_pickle, allow_nonfinite, fold_scaling=not trainable
        )
        if trainable:
            uniform_scaling(staged.adapter)
        return self._commit(name, staged, replace, use_free_slot=True, trainable=trainable)

    def prefetch(self, name: str, source: str | os.PathLike[str], **load_kwargs: Any) -> Future:
        """Read, validate and stage an adapter on a background thread; returns a Future.

        The Future's result is the :class:`AdapterInfo` (tier "host"); a failure raises the
        same :class:`HotswapError` ``load`` would. Activation copies it into a device slot.
        """
        self._check_name(name, load_kwargs.get("replace", False))
        unknown = set(load_kwargs) - {"replace", "allow_pickle", "allow_nonfinite"}
        if unknown:
            raise HotswapError(
                f"prefetch accepts replace/allow_pickle/allow_nonfinite, not {sorted(unknown)} "
                f"(a trainable adapter needs a device slot: use load(..., trainable=True))"
            )
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hotswap-stage")
        return self._executor.submit(self._prefetch_job, name, source, load_kwargs)

    def _prefetch_job(self, name: str, source: Any, kwargs: dict[str, Any]) -> AdapterInfo:
        replace = kwargs.pop("replace", False)
        staged = self._read_and_stage(source, None, None, **kwargs)
        return self._commit(name, staged, replace, use_free_slot=False)

    def _commit(
        self,
        name: str,
        staged: StagedAdapter,
        replace: bool,
        use_free_slot: bool,
        trainable: bool = False,
    ) -> AdapterInfo:
        """Register a staged adapter; copy it to a device slot when it replaces a resident one
        (into a shadow slot when one can be freed) or, if ``use_free_slot``, when a slot is free.
        A trainable adapter always gets a slot (evicting one the selection does not read)."""
        with self._lock:
            self._check_name(name, replace)
            if trainable:
                self._check_can_train()
            self.registry.check_room(name)
            old = self.registry.records.get(name)
            slot = self._slot_for_load(old, use_free_slot)
            if trainable and slot is None:
                slot = self.registry.pick_slot(self._selected_slots())
                if slot is None:
                    raise SlotsBusyError(
                        f"no device slot can take trainable adapter {name!r}: every slot is read "
                        f"by the current selection or pinned"
                    )
            if slot is not None:
                self._copy_to_slot(slot, staged)
            record = self.registry.put(name, staged)
            if slot is not None:
                self.registry.assign(record, slot)
            if trainable:
                self._start_training(record)
            if slot is not None:
                self._write_selection()  # a replaced adapter may now live in a new slot
            self._stats.loads += 1
            return self._info(record)

    def save(self, name: str, directory: str | os.PathLike[str], overwrite: bool = False) -> str:
        """Write adapter ``name`` in PEFT's format (true rank, unscaled), atomically.

        Raises:
            UnknownAdapterError, AdapterFormatError: unknown name; non-empty target directory.
        """
        with self._lock:
            adapter = self.registry.get(name).staged.adapter
            if self._trainable is not None and self._trainable.name == name:
                adapter = snapshot(self._trainable, adapter)  # the trained values, now
        if adapter.base_model_name_or_path is None:
            base = getattr(getattr(self.model, "config", None), "name_or_path", None) or None
            adapter = dataclasses.replace(adapter, base_model_name_or_path=base)
        if adapter.task_type is None:  # e.g. add_adapter: PEFT then builds the matching wrapper
            adapter = dataclasses.replace(adapter, task_type=_task_type(self.model))
        return str(write_adapter_dir(adapter, directory, overwrite=overwrite))

    def unload(self, name: str, force: bool = False) -> None:
        """Forget adapter ``name``, freeing its device slot and host entry.

        Raises:
            HotswapError: the adapter is part of the current selection (pass ``force=True`` to
                drop it from the selection, its rows then use the base model).
        """
        with self._lock:
            self.registry.get(name)
            if any(name in row for row in self._rows):
                if not force:
                    raise HotswapError(
                        f"adapter {name!r} is active; activate another selection first or pass "
                        f"force=True"
                    )
                self._rows = [{n: w for n, w in row.items() if n != name} for row in self._rows]
            if self._trainable is not None and self._trainable.name == name:
                self._stop_training()
            self.registry.remove(name)
            self._write_selection()

    # -------------------------------------------------------------------------- selection
    def activate(self, spec: Activation) -> None:
        """Select adapters for every row: a name, ``{name: weight}`` (weighted sum), or None."""
        if spec is None:
            rows: list[dict[str, float]] = []
        else:
            rows = [self._row_spec(spec)]
        self._select(rows, per_row=False)

    def activate_rows(self, rows: Sequence[Activation]) -> None:
        """Select per batch row: ``rows[b]`` is a name, ``{name: weight}`` or None (base model).

        The next forwards must carry exactly ``len(rows)`` rows.
        """
        if isinstance(rows, (str, Mapping)) or not isinstance(rows, Sequence) or not rows:
            raise SelectionError(f"activate_rows expects a non-empty list of rows, got {rows!r}")
        self._select([self._row_spec(row) if row is not None else {} for row in rows], True)

    def enable(self) -> None:
        """Use the current selection again after :meth:`disable`."""
        with self._lock:
            self._enabled = True
            self._write_selection()

    def disable(self) -> None:
        """Run the base model, keeping the selection for :meth:`enable`."""
        with self._lock:
            self._enabled = False
            self._write_selection()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """``with rt.disabled():`` runs the base model inside the block."""
        with self._lock:
            was_enabled = self._enabled
            self.disable()
        try:
            yield
        finally:
            if was_enabled:
                self.enable()

    @property
    def active(self) -> list[dict[str, float]]:
        """The current selection by name: one row spec (uniform) or one per row."""
        return [dict(row) for row in self._rows]

    def _row_spec(self, spec: Activation) -> dict[str, float]:
        if isinstance(spec, str):
            return {spec: 1.0}
        if isinstance(spec, Mapping):
            row: dict[str, float] = {}
            for name, weight in spec.items():
                if not isinstance(name, str):
                    raise SelectionError(f"adapter names must be str, got {name!r}")
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                    math.isfinite(weight)
                ):
                    raise SelectionError(f"weight of {name!r} must be a finite number, got {weight!r}")
                row[name] = float(weight)
            return row
        raise SelectionError(f"an activation is a name, a {{name: weight}} dict or None, got {spec!r}")

    def _select(self, rows: list[dict[str, float]], per_row: bool) -> None:
        with self._lock:
            names = sorted({n for row in rows for n, w in row.items() if w != 0.0})
            records = [self.registry.get(n) for n in names]  # unknown name: raise before change
            self.selection.check(len(rows), names)  # before any copy
            protected = {r.slot for r in records if r.slot is not None}
            for record in records:
                self.registry.touch(record)
                if record.slot is not None:
                    self._stats.hits["device"] += 1
                    continue
                # Prefer a slot the current selection does not read, so a failed copy leaves
                # what is being served intact.
                slot = self.registry.pick_slot(protected, avoid=self._selected_slots())
                assert slot is not None  # max_active_adapters <= device_slots guarantees room
                self._copy_to_slot(slot, record.staged)
                self.registry.assign(record, slot)
                protected.add(slot)
                self._stats.hits["host"] += 1
            self._rows, self._per_row = rows, per_row
            self._write_selection()

    def _write_selection(self) -> None:
        if not self._enabled or not self._rows:
            self.selection.clear()
            return
        records = self.registry.records
        slot_rows = [
            {records[n].slot: w * records[n].weight_scale for n, w in row.items() if w != 0.0}
            for row in self._rows
        ]
        self.selection.write(slot_rows)

    # ------------------------------------------------------------------------ compile and run
    def compile(
        self,
        example_inputs: torch.Tensor | Mapping[str, Any] | None = None,
        *,
        warmup_inputs: Sequence[torch.Tensor | Mapping[str, Any]] = (),
        warmup: Callable[[nn.Module], Any] | None = None,
        fullgraph: bool = True,
        dynamic: bool | None = None,
        mode: str | None = None,
        guard: GuardMode = "raise",
        training: bool = False,
    ) -> None:
        """``torch.compile`` the model's forward in place, warm it up, then arm the guard.

        Args:
            example_inputs: an ``input_ids`` tensor or a dict of forward kwargs (may be omitted
                when ``warmup`` is given).
            warmup_inputs: more inputs (other batch sizes / lengths) to compile for up front.
            warmup: a callable run on the model during warm-up (e.g. a short ``generate`` with
                ``cache_implementation="static"``, so the prefill and decode graphs exist).
            fullgraph: a graph break raises :class:`GraphBreakError`.
            dynamic, mode: passed to ``torch.compile``. With ``mode="reduce-overhead"`` (CUDA
                graphs) each warm-up runs three times so every graph is recorded before arming.
            guard: what a recompile after warm-up does: "raise", "warn" or "count".
            training: warm up with autograd enabled *and* under ``torch.no_grad()`` (default:
                only under ``no_grad``, as inference serving runs; dynamo guards on grad mode).
                Add the trainable adapter before compiling: its gradient path is part of the
                graph.

        transformers' own auto-compile in ``generate`` (on accelerators with a static cache) is
        switched off on this model (``generation_config.disable_compile``): the runtime's
        compiled forward is what ``generate`` calls.
        """
        if self.compiled:
            raise HotswapError("the model is already compiled by this runtime")
        if example_inputs is None and warmup is None:
            raise HotswapError("rt.compile needs example_inputs, a warmup callable, or both")
        self.guard.mode = guard
        self.guard.install()
        storage = {f"arena[{dtype}]": arena for dtype, arena in self.arena.arenas.items()}
        storage.update(active_slots=self.selection.active_slots, row_weights=self.selection.row_weights)
        for tensor in storage.values():
            torch._dynamo.mark_static(tensor)  # fixed for life; keep them out of dynamic shapes
            torch._dynamo.mark_static_address(tensor)  # CUDA graphs read them in place, no copy
        self.guard.watch_storage(storage)
        generation_config = getattr(self.model, "generation_config", None)
        if generation_config is not None:
            self._restore_on_eject["disable_compile"] = generation_config.disable_compile
            generation_config.disable_compile = True
        self._forward_impl = torch.compile(
            self._eager_forward, fullgraph=fullgraph, dynamic=dynamic, mode=mode
        )
        grad_modes = [True, False] if training else [False]
        passes = 3 if mode is not None and "reduce-overhead" in mode else 1
        inputs = [example_inputs] if example_inputs is not None else []
        try:
            for grad_mode in grad_modes:
                with torch.set_grad_enabled(grad_mode):
                    for _ in range(passes):
                        for each in [*inputs, *warmup_inputs]:
                            self.model(**unview(as_kwargs(each)))
                        if warmup is not None:
                            warmup(self.model)
        except BaseException:
            self._forward_impl = self._eager_forward
            raise
        self.compiled = True
        self.guard.arm()

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:  # one calling convention, so model(x) and model(input_ids=x) share a graph
            kwargs = {**dict(zip(self._forward_params, args)), **kwargs}
            args = ()
        if self.compiled:
            kwargs = unview(kwargs)
        batch = batch_size(args, kwargs)
        with self._lock:
            if batch is not None:
                self._check_batch(batch)
            return self.guard.call(self._forward_impl, *args, **kwargs)

    def _check_batch(self, batch: int) -> None:
        if batch > self.config.max_batch_size:
            raise SelectionError(
                f"batch of {batch} rows exceeds RuntimeConfig.max_batch_size="
                f"{self.config.max_batch_size}"
            )
        if self._per_row and self._enabled and batch != len(self._rows):
            raise SelectionError(
                f"activate_rows set {len(self._rows)} rows but the batch has {batch}"
            )

    def eject(self) -> nn.Module:
        """Undo injection: put the original layers and forward back; the runtime is then unusable."""
        with self._lock:
            if self._trainable is not None:
                self._stop_training()
            for parameter in self._frozen_base:
                parameter.requires_grad_(True)
            self._injection.undo()
            self.model.__dict__.pop("forward", None)
            if "disable_compile" in self._restore_on_eject:
                self.model.generation_config.disable_compile = self._restore_on_eject["disable_compile"]
            self.guard.uninstall()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            return self.model

    # ------------------------------------------------------------------------------ reports
    def adapters(self) -> list[AdapterInfo]:
        """Every loaded adapter, least recently used first."""
        with self._lock:
            records = sorted(self.registry.records.values(), key=lambda r: r.last_used)
            return [self._info(r) for r in records]

    def stats(self) -> dict[str, Any]:
        """Counters: loads, swaps, hits per tier, evictions, bytes copied, swap latency p50/p99."""
        with self._lock:
            return self._stats.as_dict(evictions=self.registry.evictions)

    # ------------------------------------------------------------------------------ helpers
    def _check_name(self, name: Any, replace: bool) -> None:
        if not isinstance(name, str) or not name:
            raise HotswapError(f"adapter names are non-empty strings, got {name!r}")
        if not replace and name in self.registry.records:
            raise HotswapError(f"adapter {name!r} is already loaded (pass replace=True)")
        if replace and self._trainable is not None and self._trainable.name == name:
            raise HotswapError(f"adapter {name!r} is being trained; freeze or unload it first")

    def _read_and_stage(
        self,
        source: str | os.PathLike[str] | None,
        state_dict: Mapping[str, torch.Tensor] | None,
        config: Any,
        allow_pickle: bool = False,
        allow_nonfinite: bool = False,
        fold_scaling: bool = True,
    ) -> StagedAdapter:
        if (source is None) == (state_dict is None):
            raise HotswapError("pass exactly one of a source (directory or Hub id) or state_dict=")
        if source is not None:
            directory = resolve_source(source)
            config_dict, state = read_adapter_dir(directory, allow_pickle=allow_pickle)
            where = str(directory)
        else:
            if config is None:
                raise HotswapError("state_dict= needs config= (the adapter_config as a dict)")
            config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            config_dict = {k: getattr(v, "value", v) for k, v in config_dict.items()}  # enums
            state, where = dict(state_dict), "state_dict"
        adapter = parse_adapter(config_dict, state, where, allow_nonfinite=allow_nonfinite)
        return self.arena.stage(adapter, fold_scaling=fold_scaling)

    def _slot_for_load(self, old: AdapterRecord | None, use_free_slot: bool) -> int | None:
        """Where a load copies to: for a replacement of a resident adapter a different (shadow)
        slot if one can be freed, else its own slot; otherwise a free slot, if wanted."""
        if old is None or old.slot is None:
            return self.registry.free_slot() if use_free_slot else None
        protected = self._selected_slots() | {old.slot}
        shadow = self.registry.pick_slot(protected)
        return shadow if shadow is not None else old.slot

    def _selected_slots(self) -> set[int]:
        names = {n for row in self._rows for n in row}
        return {s for n in names if (s := self.registry.records[n].slot) is not None}

    def _copy_to_slot(self, slot: int, staged: StagedAdapter) -> None:
        try:
            seconds = self.arena.write_slot(slot, staged)
        except BaseException:
            self._recover_slot(slot)
            raise
        self._stats.record_swap(staged.nbytes, seconds)

    def _recover_slot(self, slot: int) -> None:
        """After a failed copy into ``slot``: if the selection reads it, copy its owner back from
        the host; otherwise (or if that fails too) the slot no longer holds its owner."""
        owner = self.registry.slot_owner[slot]
        if owner is not None and slot in self._selected_slots():
            try:
                self.arena.write_slot(slot, self.registry.records[owner].staged)
                return
            except Exception:
                self._rows = [{n: w for n, w in row.items() if n != owner} for row in self._rows]
        self.registry.vacate(slot)
        self._write_selection()

    def _info(self, record: AdapterRecord) -> AdapterInfo:
        adapter = record.staged.adapter
        return AdapterInfo(
            name=record.name,
            rank=adapter.rank,
            alpha=adapter.alpha,
            use_rslora=adapter.use_rslora,
            scaling=lora_scaling(adapter.rank, adapter.alpha, adapter.use_rslora),
            targets=tuple(adapter.modules),
            tier="device" if record.slot is not None else "host",
            bytes=record.staged.nbytes,
            version=record.version,
            source=adapter.source,
            rank_pattern=dict(adapter.rank_pattern),
            alpha_pattern=dict(adapter.alpha_pattern),
            trainable=self._trainable is not None and self._trainable.name == record.name,
        )


def _task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model class, where the name says it."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None
