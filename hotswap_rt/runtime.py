"""``HotswapRuntime``: the public facade tying injection, arena, registry, selection and guard.

::

    load(name, dir)  -> parse + validate + stage (host row)  -> registry  -> free device slot?
    activate(...)    -> ensure each adapter has a device slot (LRU)      -> write selection tensors
    model(...)       -> enter the forward gate, guard.call(compiled forward) -> slots read arena

Bookkeeping and slot copies happen under one re-entrant lock. Forwards do not hold it while they
run: they are readers of the forward gate (:mod:`hotswap_rt.gate`), so copies into slots they do
not read proceed meanwhile, while a selection flip or a write into a slot they read waits for them.
Slow work (reading files, validating, staging) runs outside the lock. Each method validates
everything before it changes anything. Residency (tiers, pins, leases) lives in
:mod:`hotswap_rt.runtime_residency`, training in :mod:`hotswap_rt.runtime_training`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch._dynamo
from torch import nn

from .arena import SlotArena, StagedAdapter
from .config import AdapterInfo, RuntimeConfig, lora_scaling
from .errors import HotswapError, SelectionError, SlotsBusyError
from .gate import ForwardGate
from .guard import GuardMode, RecompileGuard
from .inject import find_targets, replace_modules
from .inputs import as_kwargs, batch_size, unview
from .layers import LoraSlotLinear, base_layer_shape
from .peft_format import parse_adapter, read_adapter_dir, resolve_source, write_adapter_dir
from .registry import AdapterRecord, AdapterRegistry, Origin
from .runtime_residency import ResidencyMixin
from .runtime_training import TrainingMixin
from .selection import Selection
from .stats import SwapStats
from .training import TrainableAdapter, snapshot, uniform_scaling

Activation = str | Mapping[str, float] | None


class HotswapRuntime(ResidencyMixin, TrainingMixin):
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
        self._gate = ForwardGate()
        self._pending: dict[str, Future] = {}  # in-flight prefetches by name
        self._failed: dict[str, HotswapError] = {}  # background failures not yet reported
        self._written: list[dict[int, float]] | None = None  # what the selection tensors hold
        self._served_rows: int | None = None  # rows the tensors were written for (per-row)
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
        origin = _origin(staged, allow_pickle, allow_nonfinite) if source is not None else None
        return self._commit(name, staged, origin, replace, use_free_slot=True, trainable=trainable)

    def prefetch(self, name: str, source: str | os.PathLike[str], **load_kwargs: Any) -> Future:
        """Read, validate and stage an adapter into the host ring on a background thread.

        Returns a Future whose result is the :class:`AdapterInfo` (tier "host"). A failure
        raises the same :class:`HotswapError` ``load`` would, from the Future *and* from the
        next ``activate``/``lease``/``pin`` of that name; nothing half-staged is ever visible.
        Activating a name whose prefetch is in flight waits for it.
        """
        unknown = set(load_kwargs) - {"replace", "allow_pickle", "allow_nonfinite"}
        if unknown:
            raise HotswapError(
                f"prefetch accepts replace/allow_pickle/allow_nonfinite, not {sorted(unknown)} "
                f"(a trainable adapter needs a device slot: use load(..., trainable=True))"
            )
        with self._lock:
            self._check_name(name, load_kwargs.get("replace", False))
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hotswap-stage")
            future = self._executor.submit(self._prefetch_job, name, source, dict(load_kwargs))
            self._pending[name] = future
            self._failed.pop(name, None)
        future.add_done_callback(lambda done: self._prefetch_done(name, done))
        return future

    def _prefetch_job(self, name: str, source: Any, kwargs: dict[str, Any]) -> AdapterInfo:
        replace = kwargs.pop("replace", False)
        try:
            staged = self._read_and_stage(source, None, None, **kwargs)
            origin = _origin(staged, kwargs.get("allow_pickle", False),
                             kwargs.get("allow_nonfinite", False))
            return self._commit(name, staged, origin, replace, use_free_slot=False, prefetched=True)
        except HotswapError:
            raise
        except Exception as exc:  # an OSError mid-read, ...: still a HotswapError to callers
            raise HotswapError(f"prefetch of {name!r} from {source!r} failed: {exc!r}") from exc

    def _prefetch_done(self, name: str, future: Future) -> None:
        with self._lock:
            if self._pending.get(name) is future:
                del self._pending[name]
            error = None if future.cancelled() else future.exception()
            if isinstance(error, HotswapError):
                self._failed[name] = error

    def _commit(
        self,
        name: str,
        staged: StagedAdapter,
        origin: Origin | None,
        replace: bool,
        use_free_slot: bool,
        trainable: bool = False,
        prefetched: bool = False,
    ) -> AdapterInfo:
        """Register a staged adapter; copy it to a device slot when it replaces a resident one
        (into a shadow slot when one can be freed) or, if ``use_free_slot``, when a slot is free.
        A trainable adapter always gets a slot (evicting one the selection does not read)."""
        with self._mutation():
            self._check_name(name, replace, prefetched)
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
            record = self.registry.put(name, staged, self._describe(name, staged), origin)
            self._failed.pop(name, None)
            if slot is not None:
                self.registry.assign(record, slot)
            if trainable:
                self._start_training(record)
            if slot is not None:
                self._write_selection()  # a replaced adapter may now live in a new slot
            self._stats.loads += 1
            return self._info(record)

    def check(
        self, source: str | os.PathLike[str], *, allow_pickle: bool = False,
        allow_nonfinite: bool = False,
    ) -> AdapterInfo:
        """Read and validate an adapter against this runtime exactly as ``load`` would, and
        describe it (tier "disk"), without registering it or changing anything.

        Raises:
            HotswapError: what ``load`` would raise for this source.
        """
        staged = self._read_and_stage(source, None, None, allow_pickle, allow_nonfinite)
        return dataclasses.replace(self._describe(resolve_source(source).name, staged),
                                   tier="disk")

    def save(self, name: str, directory: str | os.PathLike[str], overwrite: bool = False) -> str:
        """Write adapter ``name`` in PEFT's format (true rank, unscaled), atomically.

        Raises:
            UnknownAdapterError, AdapterFormatError: unknown name; non-empty target directory.
        """
        with self._lock:
            record = self.registry.get(name)
            staged = record.staged
            training = self._trainable if record.training else None
            if training is not None:
                assert staged is not None  # a trainable adapter never leaves its slot or ring
                adapter = snapshot(training, staged.adapter)  # the trained values, now
        if training is None:
            if staged is None:  # disk tier: read it again (validated like any load)
                staged, _ = self._restage(record)
            adapter = staged.adapter
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
        with self._mutation():
            record = self.registry.get(name)
            if record.leases and not force:
                raise SlotsBusyError(
                    f"adapter {name!r} has {record.leases} outstanding lease(s); release them "
                    f"or pass force=True"
                )
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
            self._failed.pop(name, None)
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
        """Use the current selection again after :meth:`disable` (its adapters may have left
        their device slots meanwhile: they are brought back first)."""
        names = sorted({n for row in self._rows for n in row})
        prestaged = self._prepare(names)
        with self._mutation():
            records = [self.registry.get(n) for n in sorted({n for row in self._rows for n in row})]
            self._ensure_resident(records, prestaged)
            self._enabled = True
            self._write_selection()

    def disable(self) -> None:
        """Run the base model, keeping the selection for :meth:`enable`."""
        with self._mutation():
            self._enabled = False
            self._write_selection()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """``with rt.disabled():`` runs the base model inside the block."""
        with self._mutation():
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
        names = sorted({n for row in rows for n, w in row.items() if w != 0.0})
        with self._lock:  # unknown names first: nothing is waited for or copied
            for name in names:
                if name not in self._pending and name not in self._failed:
                    self.registry.get(name)
        self.selection.check(len(rows), names)
        prestaged = self._prepare(names)  # outside the lock: prefetches, disk reads
        with self._mutation():
            records = [self.registry.get(n) for n in names]  # unknown name: raise before change
            self._ensure_resident(records, prestaged, replaces_selection=True)
            self._rows, self._per_row = rows, per_row
            self._write_selection()

    def _write_selection(self) -> None:
        """Write the selection tensors for ``_rows`` (inside a mutation); skipped when they
        already hold exactly that.

        Raises:
            SelectionError: more distinct slots than ``max_active_adapters`` (before any write).
        """
        records = self.registry.records
        slot_rows = [] if not self._enabled else [
            {records[n].slot: w * records[n].weight_scale for n, w in row.items() if w != 0.0}
            for row in self._rows
        ]
        slot_rows = [row for row in slot_rows if row] if len(slot_rows) == 1 else slot_rows
        served_rows = len(self._rows) if self._per_row and self._enabled else None
        if slot_rows == self._written and served_rows == self._served_rows:
            return
        if not any(slot_rows):
            self.selection.clear()
        else:
            self.selection.write(slot_rows)
        self._written, self._served_rows = slot_rows, served_rows

    @contextlib.contextmanager
    def _mutation(self) -> Iterator[None]:
        """Exclusive access for a change: wait until no forward runs (keeping new ones out),
        *then* take the runtime lock. In that order a writer never holds the lock while it
        waits for a forward, so a forwarding thread may still call read-only methods."""
        with self._gate.writing(), self._lock:
            yield

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """``with rt.hold():`` keeps the selection (and the slots it reads) fixed for the block,
        e.g. across the many forwards of one ``generate``. Other threads' changes wait; this
        thread must not change the selection inside the block."""
        self._gate.enter()
        try:
            yield
        finally:
            self._gate.exit()

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
        self._gate.enter()  # from here on the selection and the slots it reads cannot change
        try:
            if batch is not None:
                self._check_batch(batch)
            return self.guard.call(self._forward_impl, *args, **kwargs)
        finally:
            self._gate.exit()

    def _check_batch(self, batch: int) -> None:
        if batch > self.config.max_batch_size:
            raise SelectionError(
                f"batch of {batch} rows exceeds RuntimeConfig.max_batch_size="
                f"{self.config.max_batch_size}"
            )
        rows = self._served_rows  # what the selection tensors were written for
        if rows is not None and batch != rows:
            raise SelectionError(f"activate_rows set {rows} rows but the batch has {batch}")

    def eject(self) -> nn.Module:
        """Undo injection: put the original layers and forward back; the runtime is then unusable."""
        with self._mutation():
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
            return self._stats.as_dict(
                evictions=self.registry.evictions, host_evictions=self.registry.host_evictions
            )

    # ------------------------------------------------------------------------------ helpers
    def _check_name(self, name: Any, replace: bool, prefetched: bool = False) -> None:
        if not isinstance(name, str) or not name:
            raise HotswapError(f"adapter names are non-empty strings, got {name!r}")
        pending = self._pending.get(name)
        if pending is not None and not pending.done() and not prefetched:
            raise HotswapError(f"a prefetch of {name!r} is in flight; wait for its Future first")
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

    def _info(self, record: AdapterRecord) -> AdapterInfo:
        return dataclasses.replace(
            record.info,
            tier=record.tier,
            version=record.version,
            trainable=self._trainable is not None and self._trainable.name == record.name,
            pinned=record.pinned,
            leases=record.leases,
        )

    @staticmethod
    def _describe(name: str, staged: StagedAdapter) -> AdapterInfo:
        """The static part of an adapter's :class:`AdapterInfo` (kept when it drops to disk)."""
        adapter = staged.adapter
        return AdapterInfo(
            name=name,
            rank=adapter.rank,
            alpha=adapter.alpha,
            use_rslora=adapter.use_rslora,
            scaling=lora_scaling(adapter.rank, adapter.alpha, adapter.use_rslora),
            targets=tuple(adapter.modules),
            tier="host",
            bytes=staged.nbytes,
            version=0,
            source=adapter.source,
            rank_pattern=dict(adapter.rank_pattern),
            alpha_pattern=dict(adapter.alpha_pattern),
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


def _origin(staged: StagedAdapter, allow_pickle: bool, allow_nonfinite: bool) -> Origin | None:
    """Where a directory-loaded adapter can be read again (its source is the resolved dir)."""
    source = staged.adapter.source
    return None if source is None else Origin(Path(source), allow_pickle, allow_nonfinite)
