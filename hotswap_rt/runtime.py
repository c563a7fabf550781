"""``HotswapRuntime``: the public API, composed of one object per concern.

::

    load(name, dir)   Stager.read_and_stage (outside the lock)       -> host rows
                      Residency.commit   -> arena.write_slot (free slot or shadow slot)
                      Selector.write     -> selection tensors
    activate(spec)    Residency.prepare  (waits for prefetches, re-reads disk; outside the lock)
                      Residency.ensure_resident -> arena.write_slot (LRU slot)
                      Selector.set + write      -> selection tensors
    model(...)        ModelForward: enter the forward gate, guard.call(compiled forward)

Every method validates everything before it changes anything, does slow work (reading files,
waiting for prefetches, staging) before taking the lock, and then makes one short change inside
``_mutation()``: it waits until no forward runs (the forward gate), takes the runtime lock, and
calls the composed objects. Forwards never hold the lock while they run. A load that changes
nothing a forward reads (a new adapter into the ring or a free slot) takes the lock only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .arena import LayerLayout, LayerShape, SlotArena
from .config import AdapterInfo, RuntimeConfig, check_flags, name_matches, names_or_regex
from .errors import (
    AdapterChangedError, HotswapError, IncompatibleAdapterError, SelectionError, SlotsBusyError,
    TargetNotFoundError)
from .forward import ModelForward, check_eager_meanwhile, mode_options
from .gate import ForwardGate
from .guard import GuardMode, RecompileGuard
from .hub import push_adapter_folder
from .experts import EXPERT_PARAMS, ExpertFactors, LoraSlotExperts, expert_param_shape, find_target_parameters
from .inject import find_modules_to_save, find_targets, replace_modules
from .inputs import ExampleInput, bind_positional
from .layers import LINEAR_TYPES, SlotLayer, is_conv1d, layer_shape, make_slot_layer
from .peft_format import (
    FileStamp, ParsedAdapter, adapter_files_stamp, adapter_state_dict, changed_files, resolve_source,
    task_type_for, with_tensors_copied, write_adapter_dir, write_adapter_files)
from .registry import AdapterRecord, AdapterRegistry, Origin
from .release import frames_cleared_on_failure, release_later
from .residency import AdapterLease, Residency
from .selection import Activation, Selection, Selector, row_spec
from .staging import BackgroundLoads, StagedAdapter, Stager
from .training import Init, Trainer, check_args, new_adapter, snapshot, uniform_scaling
from .unfused_experts import fuse_per_expert_modules


@dataclass(frozen=True)
class RuntimeInternals:
    """The composed objects of a runtime, for tests and debugging tools. Read them; changing
    anything through them bypasses the forward gate and the lock."""

    arena: SlotArena
    registry: AdapterRegistry
    residency: Residency
    selection: Selection
    selector: Selector
    stager: Stager
    layers: dict[str, SlotLayer]
    forward: ModelForward


class HotswapRuntime:
    """Serve many LoRA adapters from one (compiled) transformers model without recompiling.

    Args:
        model: any transformers model (or ``nn.Module`` whose forward takes ``input_ids``).
            Modified in place: targeted layers become slot layers (:class:`SlotLayer`).
        config: slot sizes and targets; defaults to :class:`RuntimeConfig()`.

    Raises:
        TargetNotFoundError: ``config.target_modules`` matches no linear layer.
    """

    def __init__(self, model: nn.Module, config: RuntimeConfig | None = None) -> None:
        served = [name for name, module in model.named_modules()
                  if isinstance(module, (SlotLayer, LoraSlotExperts))]
        if served or isinstance(model.__dict__.get("forward"), ModelForward):
            raise HotswapError(f"this model is already served by a HotswapRuntime (injected layers: "
                               f"{served[:4]}); eject() that runtime first")
        self.config = config = config or RuntimeConfig()
        self.model = model
        self._ejected = False  # see eject()
        self.lazy = config.target_modules is None  # inject what the adapters target, as they come
        names = [] if self.lazy else find_targets(model, config.target_modules, config.exclude_modules)
        full = [] if config.modules_to_save is None else find_modules_to_save(
            model, config.modules_to_save, names)
        params = [] if config.target_parameters is None else find_target_parameters(
            model, config.target_parameters)
        if config.target_parameters is not None and not params:
            raise TargetNotFoundError(f"target_parameters={list(config.target_parameters)!r} matches no "
                                      f"expert parameter of a fused-experts module of {type(model).__name__}")
        shapes = {name: self._layer_shape(name, full=name in full) for name in names + full + params}
        device = _device_of(model, [self._weights_of(name) for name in shapes])
        self._arena = SlotArena({}, config.max_rank, config.device_slots, device,
                                vectors=config.scale_vectors)
        self._selection = Selection(config.max_batch_size, config.max_active_adapters, device,
                                    config.adapters_per_row,
                                    config.device_slots if config.reads_slots_in_place else None,
                                    config.rank_buckets or (),
                                    overflow_stacked=config.mixes_overflow == "stacked",
                                    per_row_at_compile=config.per_row_auto,
                                    per_row_decode_reduce=config.reduces_per_row_decode(device))
        self._selector = Selector(self._selection, self._arena.slot_rank)
        self._layers: dict[str, SlotLayer] = {}
        self._injection = replace_modules(model, {})
        self._inject_layers(shapes)
        self._lock = threading.RLock()
        self._gate = ForwardGate()
        self._exclusive = _Mutation(self._gate, self._lock)  # holds no state: one for all changes
        self._stager = Stager(self._arena, self._base_weight,
                              to_model=lambda adapter: fuse_per_expert_modules(adapter, self.model))
        self._background = BackgroundLoads()
        self._residency = Residency(
            self._arena, AdapterRegistry(config.host_slots, config.device_slots), self._selector,
            self._background, self._read_origin, self._lock, keep_factors=config.keep_factors,
        )
        self._trainer = Trainer(model, self._layers, self._arena)
        self.guard = RecompileGuard()
        self._forward = ModelForward(model, self._gate, self.guard, self._selector, config.batch_input)
        self._eject_hooks: list[Callable[[], None]] = []
        # files of adapters whose factors are dropped once staged are staged from a memory map
        self._maps_files = config.map_adapter_files and not config.keep_factors

    def on_eject(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` when :meth:`eject` restores the model (e.g. to remove methods bound
        onto it)."""
        self._eject_hooks.append(hook)

    def _layer_shape(self, name: str, full: bool = False) -> LayerShape:
        """What a slot row holds for the layer ``name`` (``full``: a ``modules_to_save`` module;
        ``<experts module>.<param>``: an expert parameter, PEFT's ``target_parameters``).

        Raises:
            AttributeError: no such module or parameter; TypeError: not one a slot can hold.
        """
        try:
            module = self.model.get_submodule(name)
        except AttributeError:
            module_name, _, param = name.rpartition(".")
            if param not in EXPERT_PARAMS:
                raise
            return expert_param_shape(self.model.get_submodule(module_name), param)
        if isinstance(module, SlotLayer):
            raise TypeError(f"{name!r} is already a slot layer of another runtime")
        return layer_shape(module, full=full)

    def _weights_of(self, name: str) -> torch.Tensor:
        """The base weight a layer ``name`` adds to (its device is the slots')."""
        try:
            module = self.model.get_submodule(name)
        except AttributeError:  # an expert parameter
            module_name, _, param = name.rpartition(".")
            experts = self.model.get_submodule(module_name)
            return getattr(getattr(experts, "base", experts), param)
        return getattr(module, "base", module).weight

    def _inject_layers(self, shapes: Mapping[str, LayerShape]) -> None:
        """Give every layer of ``shapes`` a slot layer (expert parameters: an
        :class:`ExpertFactors` in their experts module's :class:`LoraSlotExperts`): grow the
        arena, wrap the layers, point every slot layer at the (possibly new) arena tensors."""
        if not shapes:
            return
        devices = {self._weights_of(name).device for name in shapes} | {self._arena.device}
        if len(devices) != 1:
            raise HotswapError(f"targeted layers span several devices {devices}; not supported")
        self._arena.extend(shapes)
        arena, replacements, new_layers = self._arena, {}, {}
        for name, shape in shapes.items():
            layout = arena.layouts[name]
            placed = (arena.arenas[layout.dtype], layout, arena.vector_sizes[layout.dtype],
                      self.config.max_rank, self._selection)
            if shape.kind != "experts":
                new_layers[name] = replacements[name] = make_slot_layer(self.model.get_submodule(name), *placed)
                continue
            module_name, _, param = name.rpartition(".")
            wrapper = replacements.get(module_name) or self.model.get_submodule(module_name)
            if not isinstance(wrapper, LoraSlotExperts):
                wrapper = replacements[module_name] = LoraSlotExperts(wrapper, self._selection)
            new_layers[name] = ExpertFactors(wrapper.base, *placed)
            wrapper.add(param, new_layers[name])
        self._injection.originals.update(replace_modules(self.model, replacements).originals)
        self._layers.update(new_layers)  # the Trainer holds this dict
        self._point_layers_at_arena()

    def _point_layers_at_arena(self) -> None:
        """After the arena grew (new tensors, new offsets): every slot layer reads it anew."""
        arena = self._arena
        for name, layer in self._layers.items():
            layout = arena.layouts[name]
            layer.set_arena(arena.arenas[layout.dtype], layout, arena.vector_sizes[layout.dtype])

    def _plan_injection(self, modules: Sequence[str], full: Sequence[str] = ()) -> dict[str, LayerLayout]:
        """The layers a lazy runtime must inject for an adapter on ``modules`` (LoRA) and
        ``full`` (``modules_to_save``): layouts with offset -1, for checking shapes; {} when all
        are injected (or the runtime is not lazy, where :meth:`Stager.check` refuses what is
        missing).

        Raises:
            IncompatibleAdapterError: a module is not in the model, not a supported layer,
                excluded, or the model is compiled (a new layer would recompile it).
        """
        missing = [name for name in [*modules, *full] if name not in self._arena.layouts]
        if not self.lazy or not missing:
            return {}
        if self.compiled:
            raise IncompatibleAdapterError(
                f"the adapter targets layers that are not injected: {missing[:8]}; the model is "
                f"compiled, and injecting them would recompile it. Load an adapter on these layers "
                f"before compiling, or give RuntimeConfig.target_modules"
            )
        if self._trainer.adapter is not None:
            raise HotswapError(
                f"cannot inject new layers {missing[:8]} while adapter {self._trainer.adapter.name!r} "
                f"is trainable (its parameters alias the slot arena); freeze or unload it first"
            )
        plan: dict[str, LayerLayout] = {}
        for name in missing:
            try:
                shape = self._layer_shape(name, full=name in full)
            except AttributeError:
                raise IncompatibleAdapterError(f"the adapter targets {name!r}, which is not a "
                                               f"module of {type(self.model).__name__}") from None
            except TypeError as exc:
                raise IncompatibleAdapterError(f"the adapter targets {name!r}, which cannot be "
                                               f"injected (not {LINEAR_TYPES} or an expert parameter): "
                                               f"{exc}") from None
            if self.config.exclude_modules and name_matches(self.config.exclude_modules, name):
                raise IncompatibleAdapterError(f"the adapter targets {name!r}, which is in exclude_modules")
            plan[name] = LayerLayout.of(name, shape, -1)
        return plan

    def _read_and_commit(self, source: Any, state_dict: Any, config: Any, allow_pickle: bool,
                         allow_nonfinite: bool, fold_scaling: bool, inject: bool,
                         check_commit: Callable[[], None],
                         commit: Callable[[StagedAdapter, tuple[FileStamp, ...]], AdapterInfo]) -> AdapterInfo:
        """:meth:`_read_files_and_commit`; when it fails, the frames it went through let go of
        a mapped file (:func:`~hotswap_rt.release.frames_cleared_on_failure`), so a kept
        exception holds no map, nor the read lease that keeps writers of the file waiting."""
        with frames_cleared_on_failure(self._maps_files):
            return self._read_files_and_commit(source, state_dict, config, allow_pickle, allow_nonfinite,
                                               fold_scaling, inject, check_commit, commit)

    def _read_files_and_commit(self, source: Any, state_dict: Any, config: Any, allow_pickle: bool,
                               allow_nonfinite: bool, fold_scaling: bool, inject: bool,
                               check_commit: Callable[[], None],
                               commit: Callable[[StagedAdapter, tuple[FileStamp, ...]], AdapterInfo],
                               ) -> AdapterInfo:
        """Read and check an adapter, stage it and ``commit`` it with the stamp of the files it
        was read from (``()`` for a state dict); a lazy runtime first injects the layers it
        needs (``inject``; ``check_commit()`` first, which raises if the commit would fail),
        see :meth:`_inject_stage_commit`.

        The files are stamped (:func:`adapter_files_stamp`) before they are read and again once
        nothing more is read from them: after the read, or, for a memory-mapped file, after
        staging (whose copies read its pages). Rewritten in place meanwhile, the adapter could
        hold old and new bytes mixed: it is refused (:class:`AdapterChangedError`), before any
        change. A mapped load that changes the layout first (layers injected, scale vectors
        added) copies its factors out of the map before that change and is checked then.

        Raises:
            HotswapError: (a subclass) for any bad input; nothing changes."""
        # NaN/Inf: checked in one pass over the staged rows, unless a lazy runtime may inject
        # layers for this adapter first (then every check runs before anything changes)
        defer = not allow_nonfinite and not self.lazy
        # (a source with a state dict too: left to the read, which refuses the pair)
        directory = resolve_source(source) if source is not None and state_dict is None else None
        stamp = adapter_files_stamp(directory) if directory is not None else ()
        # a trainable load (fold_scaling False) keeps its factors: read into memory, never mapped
        mapped = fold_scaling and self._maps_files and directory is not None
        adapter = self._stager.read(source if directory is None else directory, state_dict, config,
                                    allow_pickle, allow_nonfinite, defer_finite=defer, mapped=mapped)
        if mapped and self._changes_layout(adapter):  # the change comes before staging: read
            mapped_adapter, adapter, mapped = adapter, with_tensors_copied(adapter), False  # it all now
            release_later(mapped_adapter)
            del mapped_adapter
        if directory is not None and not mapped:
            _check_read_unchanged(directory, stamp)

        def commit_unchanged(staged: StagedAdapter) -> AdapterInfo:
            if mapped:
                _check_read_unchanged(directory, stamp)
            return commit(staged, stamp)

        try:
            return self._check_inject_stage_commit(adapter, fold_scaling, inject, defer, check_commit,
                                                   commit_unchanged)
        finally:
            if mapped:  # its factors are views of the file's map, which their last reference
                release_later(adapter)  # unmaps: on the release thread, not on the way out
                del adapter

    def _check_inject_stage_commit(self, adapter: ParsedAdapter, fold_scaling: bool, inject: bool, defer: bool,
                                   check_commit: Callable[[], None],
                                   commit: Callable[[StagedAdapter], AdapterInfo]) -> AdapterInfo:
        """The rest of :meth:`_read_and_commit` once ``adapter`` is read."""
        if not fold_scaling:  # trainable: refused before any layer is injected for it
            if adapter.has_vectors:
                raise IncompatibleAdapterError(
                    f"{adapter.source or 'state_dict'}: IA3 / DoRA / lora_bias adapters cannot be trained "
                    f"in a slot; load them for inference")
            uniform_scaling(adapter)
        self._check_saved_base_weights(adapter)
        if not inject:
            missing = [name for name in [*adapter.modules, *adapter.saved_modules]
                       if name not in self._arena.layouts]
            if missing:
                raise IncompatibleAdapterError(
                    f"{adapter.source or 'state_dict'}: modules {missing[:8]} are not injected "
                    f"layers (a hotswap only replaces what exists; load it as a new adapter)")
        return self._inject_stage_commit(
            list(adapter.modules), adapter, check_commit,
            # a partial, not a lambda: a failed stage's traceback then holds no closure over the
            # adapter (whose factors may be views of a leased map: clear_failed_frames)
            functools.partial(self._stager.stage, adapter, fold_scaling=fold_scaling, check_finite=defer),
            commit)

    def _inject_stage_commit(self, modules: Sequence[str], adapter: ParsedAdapter | None,
                             check_commit: Callable[[], None], stage: Callable[[], StagedAdapter],
                             commit: Callable[[StagedAdapter], AdapterInfo]) -> AdapterInfo:
        """``commit(stage())``; when a lazy runtime must first inject layers on ``modules`` (or
        add scale vectors) for ``adapter``, ``adapter`` is checked against the layers it would
        have, then the injection, staging and commit run as one change (``check_commit()``
        first, which raises if the commit would fail): forwards and other changes wait from
        the injection to the commit. Otherwise another thread could take the last host entry
        (or the name) between ``check_commit()`` and the commit, and the failed commit would
        leave layers injected for an adapter that was refused. Only loads that inject wait so
        (before compiling); the rest stage beside forwards and other loads. With nothing to
        inject or add, nothing is checked here: :meth:`Stager.stage` checks the adapter first
        (~20 us of Python a load)."""
        full = list(adapter.saved_modules) if adapter is not None else []
        plan, add_vectors = self._plan_injection(modules, full), self._vectors_to_add(adapter)
        if not plan and not add_vectors:
            return commit(stage())
        if adapter is not None:  # before waiting for forwards: a refused adapter changes nothing
            self._stager.check(adapter, plan, vectors_planned=add_vectors)
        with self._mutation():
            check_commit()
            plan = self._plan_injection(modules, full)  # again: another load may have injected some
            self._inject_layers({name: layout.shape for name, layout in plan.items()})
            if self._vectors_to_add(adapter):
                self._arena.enable_vectors()
                self._point_layers_at_arena()
            for record in self._residency.registry.records.values():
                if record.staged is not None:
                    self._stager.fit_rows(record.staged)
            return commit(stage())

    def _changes_layout(self, adapter: ParsedAdapter) -> bool:
        """Whether loading ``adapter`` would inject layers or add scale vectors (before staging
        it, see :meth:`_inject_stage_commit`). Layers and vectors are only ever added, so a
        False stays False. An adapter that cannot be loaded: False (it is refused later)."""
        try:
            plan = self._plan_injection(list(adapter.modules), list(adapter.saved_modules))
        except HotswapError:
            return False
        return bool(plan) or self._vectors_to_add(adapter)

    def _check_saved_base_weights(self, adapter: ParsedAdapter) -> None:
        """Base weights saved with the adapter (PEFT's ``save_embedding_layers``) must equal the
        model's own: we add LoRA to the model's weights and cannot swap a resized or trained
        embedding per adapter.

        Raises:
            IncompatibleAdapterError: a saved weight is for no such layer or differs."""
        for name, saved in adapter.saved_base_weights.items():
            try:
                layer = self.model.get_submodule(name)
            except AttributeError:
                layer = None
            base = layer.base if isinstance(layer, SlotLayer) else layer
            weight = getattr(base, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.shape != saved.shape or not torch.equal(
                weight.detach().cpu(), saved.to(weight.dtype)
            ):
                raise IncompatibleAdapterError(
                    f"{adapter.source or 'state_dict'}: the adapter carries its own weights for "
                    f"{name!r} (PEFT's save_embedding_layers) that differ from the model's (a "
                    f"resized or trained embedding); only LoRA on the model's own weights is served"
                )

    def _vectors_to_add(self, adapter: ParsedAdapter | None) -> bool:
        """Whether loading ``adapter`` adds scale vectors to the arena: it needs them, the arena
        has none, and they can still be added (not compiled, nothing training; else
        :meth:`Stager.check` refuses the adapter)."""
        if adapter is None or not adapter.has_vectors or self._arena.vectors:
            return False
        return not self.compiled and self._trainer.adapter is None

    def _base_weight(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Injected layer ``name``'s base weight as ``[d_out, d_in]`` (an Embedding's as
        ``[embedding_dim, num_embeddings]``; a Conv2d's ``[C_out, C_in, kh, kw]``) and its bias
        (DoRA)."""
        base = self._layers[name].base
        weight = base.weight.detach()
        bias = getattr(base, "bias", None)
        transposed = is_conv1d(base) or isinstance(base, nn.Embedding)
        return (weight.t() if transposed else weight), (None if bias is None else bias.detach())

    @property
    def targets(self) -> list[str]:
        """Names of the injected layers."""
        return list(self._arena.layouts)

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one device slot (every injected layer at ``max_rank``, all dtypes)."""
        return self._arena.slot_nbytes

    @property
    def compiled(self) -> bool:
        """Compiled by :meth:`compile`, or a forward was compiled by the user's own
        ``torch.compile`` (the guard counted a compile)."""
        return self._forward.compiled or self.guard.compiles > 0

    @property
    def internals(self) -> RuntimeInternals:
        """The composed objects (see :class:`RuntimeInternals`): for tests and tools only."""
        return RuntimeInternals(
            self._arena, self._residency.registry, self._residency, self._selection,
            self._selector, self._stager, self._layers, self._forward,
        )

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
        inject: bool = True,
    ) -> AdapterInfo:
        """Load a PEFT LoRA adapter from a directory, a Hub id, or ``state_dict`` + ``config``.

        The adapter is validated completely, zero-padded to ``max_rank``, scaled and staged in
        host memory, then copied into a free device slot if there is one (else it waits on the
        host until activated). ``replace=True`` swaps new weights in under an existing name
        atomically: forwards see the old or the new adapter, never a mix.

        ``allow_pickle=True`` also reads ``adapter_model.bin`` (``torch.load(weights_only=True)``).
        ``trainable=True`` puts it in a device slot for continued training (see
        :meth:`add_adapter`); it needs one scaling for all modules.

        Lazy injection (``RuntimeConfig(target_modules=None)``): layers the adapter targets that
        are not injected yet are injected first (refused once compiled); such a load runs from
        the injection to its commit as one change (forwards and other changes wait), so a
        refused load never leaves layers injected. ``inject=False`` refuses such an adapter
        instead (PEFT's hotswap semantics: only layers that exist).

        Raises:
            HotswapError: (a subclass) for any bad input; nothing changes.
        """
        check_flags("load", replace=replace, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite,
                    trainable=trainable, inject=inject)
        self._check_name(name, replace)
        if trainable:
            self._trainer.check_can_train()
        # a trainable adapter's values leave its files at the first step: it is never read again
        # from them (no disk tier; `save` writes the slot's values)
        readable = source is not None and not trainable

        def commit(staged: StagedAdapter, stamp: tuple[FileStamp, ...]) -> AdapterInfo:
            origin = Origin.of(staged, allow_pickle, allow_nonfinite, stamp) if readable else None
            return self._commit(name, staged, origin, replace, use_free_slot=True, trainable=trainable)

        return self._read_and_commit(
            source, state_dict, config, allow_pickle, allow_nonfinite, fold_scaling=not trainable,
            inject=inject, check_commit=lambda: self._residency.check_commit(name, trainable), commit=commit)

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
        check_flags("prefetch", **load_kwargs)
        replace = load_kwargs.pop("replace", False)
        allow_pickle = load_kwargs.get("allow_pickle", False)
        allow_nonfinite = load_kwargs.get("allow_nonfinite", False)

        def commit(staged: StagedAdapter, stamp: tuple[FileStamp, ...]) -> AdapterInfo:
            origin = Origin.of(staged, allow_pickle, allow_nonfinite, stamp)
            return self._commit(name, staged, origin, replace, use_free_slot=False, prefetched=True)

        def job() -> AdapterInfo:
            try:
                return self._read_and_commit(source, None, None, allow_pickle, allow_nonfinite,
                                             fold_scaling=True, inject=True,
                                             check_commit=lambda: self._residency.check_commit(name),
                                             commit=commit)
            except HotswapError:
                raise
            except Exception as exc:  # an OSError mid-read, ...: still a HotswapError to callers
                raise HotswapError(f"prefetch of {name!r} from {source!r} failed: {exc!r}") from exc

        with self._lock:
            self._check_name(name, replace)
            return self._background.submit(name, job)

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
        """Register a staged adapter (see :meth:`Residency.commit`); a trainable one always
        gets a slot and starts training there. Most commits copy beside the forwards
        (:meth:`_commit_beside_forwards`); the others run with no forward running."""
        if not trainable and not self._gate.depth():
            info = self._commit_beside_forwards(name, staged, origin, replace, use_free_slot, prefetched)
            if info is not None:
                return info
        with self._mutation():
            self._check_name(name, replace, prefetched)
            self._stager.fit_rows(staged)  # layers may have been injected since it was staged
            if trainable:
                self._trainer.check_can_train()
            record = self._residency.commit(
                name, staged, staged.describe(name), origin, use_free_slot=use_free_slot,
                trainable=trainable,
            )
            if trainable:
                assert record.slot is not None
                scaling = self._trainer.start(name, record.slot, staged.adapter).scaling
                self._residency.set_training(record, scaling)
            self._write_selection()  # a replaced adapter may now live in a new slot
            return self._info(record)

    def _commit_beside_forwards(self, name: str, staged: StagedAdapter, origin: Origin | None, replace: bool,
                                use_free_slot: bool, prefetched: bool) -> AdapterInfo | None:
        """Commit while forwards (and other changes) go on, when the copy touches no slot
        forwards read: a new adapter (or one replacing an adapter in no device slot) goes into
        the ring and a free slot at most, and no selection names it; one replacing a resident
        adapter goes into a shadow slot, the old version served from its own slot until the
        gate is taken, briefly, to point the selection at the new one. The slot is reserved
        under the lock, copied into outside it, and taken under it again (the name checked
        again: another thread may have loaded it meanwhile). Before compiling, the slot layout
        can still change (layers injected, scale vectors added): the copy then stays under the
        lock.
        None (nothing done): it would have to overwrite the slot it is served from."""
        record = None
        with self._lock:
            self._check_not_ejected()
            old = self._residency.registry.records.get(name)
            if old is not None and old.slot is not None and not self._residency.shadow_slot_for(name):
                return None
            self._check_name(name, replace, prefetched)
            self._stager.fit_rows(staged)  # layers may have been injected since it was staged
            if not self.compiled:
                record = self._residency.commit(name, staged, staged.describe(name), origin,
                                                use_free_slot=use_free_slot, ordered=False)
                info, moved = self._info(record), self._lease_until_selected(record)
            else:
                slot = self._residency.reserve_slot(name, use_free_slot)
                layout = self._arena.layout_token()
        if record is None:
            copied = None
            if slot is not None:
                try:
                    copied = (slot, self._arena.write_slot(slot, staged.rows, ordered=False))
                except BaseException:
                    with self._lock:
                        self._residency.release_reserved(slot, written=False)
                    raise
            with self._lock:
                relaid = copied is not None and self._arena.layout_token() != layout  # unexpected once compiled
                try:
                    self._check_not_ejected()
                    self._check_name(name, replace, prefetched)
                    old = self._residency.registry.records.get(name)
                    # the copy is stale, or the adapter became resident meanwhile with no copy made
                    # (committing now could copy over its served slot): the gated commit does it
                    if relaid or (copied is None and old is not None and old.slot is not None):
                        return None
                    record = self._residency.commit(name, staged, staged.describe(name), origin,
                                                    use_free_slot=False, ordered=False, copied=copied)
                finally:
                    if slot is not None:
                        self._residency.release_reserved(slot, written=not relaid)
                info, moved = self._info(record), self._lease_until_selected(record)
        if moved:  # the selection still reads the slot the adapter left: point it at the new one
            try:
                with self._mutation():
                    self._write_selection()
            finally:
                self._residency.release_lease(record)
        return info

    def _lease_until_selected(self, record: AdapterRecord) -> bool:
        """Under the lock, after a commit beside the forwards: whether the selection still reads
        a slot the commit moved the adapter out of (:attr:`AdapterRegistry.stale`); then the
        adapter is leased, so no other change evicts it before the selection follows it."""
        if not self._residency.registry.stale:
            return False
        record.leases += 1
        return True

    def check(
        self, source: str | os.PathLike[str], *, allow_pickle: bool = False,
        allow_nonfinite: bool = False,
    ) -> AdapterInfo:
        """Read and validate an adapter against this runtime exactly as ``load`` would, and
        describe it (tier "disk"), without registering it or changing anything.

        Raises:
            HotswapError: what ``load`` would raise for this source.
        """
        check_flags("check", allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
        with frames_cleared_on_failure(self._maps_files):  # a kept exception holds no map
            return self._check(source, allow_pickle, allow_nonfinite)

    def _check(self, source: str | os.PathLike[str], allow_pickle: bool, allow_nonfinite: bool) -> AdapterInfo:
        adapter = self._stager.read(source, None, None, allow_pickle, allow_nonfinite,
                                    mapped=self._maps_files)
        self._check_saved_base_weights(adapter)
        plan = self._plan_injection(list(adapter.modules), list(adapter.saved_modules))
        add_vectors = self._vectors_to_add(adapter)
        if plan or add_vectors:  # checked as if injected; sized as its host row would be
            self._stager.check(adapter, plan, vectors_planned=add_vectors)
            info = dataclasses.replace(StagedAdapter(adapter, {}, {}).describe(resolve_source(source).name),
                                       bytes=self._stager.row_nbytes(adapter, plan))
        else:
            info = self._stager.stage(adapter).describe(resolve_source(source).name)
        return dataclasses.replace(info, tier="disk")

    def save(self, name: str, directory: str | os.PathLike[str], overwrite: bool = False, *,
             into_existing: bool = False) -> str:
        """Write adapter ``name`` in PEFT's format (true rank, unscaled), atomically.

        ``into_existing=True`` writes the two files into ``directory`` (created if needed),
        replacing only them, as transformers' ``save_pretrained`` does; otherwise the directory
        must be empty or absent (``overwrite=True`` replaces it whole).

        A directory-loaded adapter's values are read again from its files (the host ring keeps
        only its staged rows, unless ``RuntimeConfig.keep_factors``).

        Raises:
            UnknownAdapterError, AdapterFormatError: unknown name; non-empty target directory.
            AdapterChangedError: its files changed since it was loaded.
        """
        check_flags("save", overwrite=overwrite, into_existing=into_existing)
        adapter = self._saved_values(name)
        if into_existing:
            return str(write_adapter_files(adapter, directory))
        return str(write_adapter_dir(adapter, directory, overwrite=overwrite))

    def push_to_hub(self, name: str, repo_id: str, *, commit_message: str | None = None,
                    commit_description: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None,
                    create_pr: bool = False, endpoint: str | None = None) -> str:
        """Upload adapter ``name`` (the files :meth:`save` writes) to the Hub repo ``repo_id``
        (created if needed) with ``huggingface_hub``; returns the commit (or PR) URL.
        ``endpoint`` overrides the Hub URL (default ``HF_ENDPOINT``)."""
        self.info(name)  # an unknown name fails before any request
        return push_adapter_folder(
            lambda directory: self.save(name, directory, into_existing=True), repo_id,
            commit_message=commit_message, commit_description=commit_description, private=private,
            token=token, revision=revision, create_pr=create_pr, endpoint=endpoint,
        )

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s factors as PEFT saves them: ``base_model.model.<module>.lora_A.weight``
        ``[r, d_in]`` and ``...lora_B.weight`` ``[d_out, r]``, true rank, unscaled, CPU (a
        trainable adapter's current values; a directory-loaded adapter's read again from its
        files, as :meth:`save` does).

        Raises:
            UnknownAdapterError: no adapter of that name is loaded.
            AdapterChangedError: its files changed since it was loaded.
        """
        return adapter_state_dict(self._saved_values(name))

    def _saved_values(self, name: str) -> ParsedAdapter:
        """What :meth:`save` writes for ``name``: the trained values of a trainable adapter, a
        disk-tier adapter read again, the base model and task type filled in."""
        with self._lock:
            record = self._residency.get(name)
            staged = record.staged
            adapter = None
            if record.training:
                assert staged is not None and self._trainer.adapter is not None
                adapter = snapshot(self._trainer.adapter, staged.adapter)  # the trained values
        if adapter is None:
            if staged is None or staged.adapter is None:  # disk tier, or the ring keeps rows only:
                adapter = self._residency.read_again(record, self._read_factors)  # checked unchanged
            else:
                adapter = staged.adapter
        if adapter.base_model_name_or_path is None:
            base = getattr(getattr(self.model, "config", None), "name_or_path", None) or None
            adapter = dataclasses.replace(adapter, base_model_name_or_path=base)
        if adapter.task_type is None:  # e.g. add_adapter: PEFT then builds the matching wrapper
            adapter = dataclasses.replace(adapter, task_type=task_type_for(self.model))
        return adapter

    def unload(self, name: str, force: bool = False) -> None:
        """Forget adapter ``name``, freeing its device slot and host entry.

        Raises:
            HotswapError: the adapter is part of the current selection (pass ``force=True`` to
                drop it from the selection, its rows then use the base model), or leased.
        """
        check_flags("unload", force=force)
        with self._mutation():
            record = self._residency.get(name)
            if record.leases and not force:
                raise SlotsBusyError(
                    f"adapter {name!r} has {record.leases} outstanding lease(s); release them "
                    f"or pass force=True"
                )
            if self._selector.uses(name):
                if not force:
                    raise HotswapError(
                        f"adapter {name!r} is active; activate another selection first or pass "
                        f"force=True"
                    )
                self._selector.drop(name)
            if self._trainer.is_training(name):
                self._trainer.stop()
            self._residency.remove(name)
            self._write_selection()

    # -------------------------------------------------------------------------- selection
    def activate(self, spec: Activation) -> None:
        """Select adapters for every row: a name, ``{name: weight}`` (weighted sum), or None."""
        if type(spec) is str and self._activate_loaded(spec):
            return
        self._select([] if spec is None else [row_spec(spec)], per_row=False)

    def _activate_loaded(self, name: str) -> bool:
        """``activate(name)`` for an adapter already in the host ring or a slot, with no load of
        it in flight: what :meth:`_select` checks first always holds for one name at weight 1
        (one row, one adapter, nothing to wait for or re-read), so this goes straight to the
        change. A swap's Python cost is most of a small adapter's swap; this skips ~15 calls
        (~10 us when the caches are cold). While other threads' forwards run, a host-ring
        adapter is copied beside them (:meth:`_activate_beside_forwards`). False: anything
        else, for :meth:`_select`."""
        if self._is_selected([{name: 1.0}], False):
            return True
        records = self._residency.registry.records
        record = records.get(name)
        if record is None or (record.staged is None and record.slot is None) or self._background.knows(name):
            return False
        gate = self._gate
        if record.slot is None and gate.readers and not gate.depth() and self._activate_beside_forwards(name):
            return True
        with self._exclusive:  # _mutation() without its ejected check: _is_selected made it
            record = records.get(name) or self._residency.get(name)  # unloaded meanwhile: raises
            self._residency.ensure_resident([record], {}, replaces_selection=True)
            self._selector.set([{name: 1.0}], per_row=False)
            self._write_selection()
        return True

    def _activate_beside_forwards(self, name: str) -> bool:
        """``activate(name)`` of an adapter in the host ring while other threads' forwards run:
        its copy into a slot the selection does not read is made outside the gate, so those
        forwards go on, and the gate is taken only to select it (the slot is reserved under the
        lock meanwhile, as a load beside the forwards does). False (nothing selected): every
        slot it could take is read by the selection, or the adapter was replaced, unloaded or
        made resident during the copy, or the slots were re-laid (the gated path then does it).
        A failed copy leaves the selection as it was; the slot is cleared at its next write."""
        arena, residency = self._arena, self._residency
        with self._lock:
            record = residency.registry.records.get(name)
            if record is None or record.slot is not None or record.staged is None:
                return False
            slot = residency.reserve_slot_to_activate(record)
            if slot is None:
                return False
            staged, layout = record.staged, arena.layout_token()
        written = False
        try:
            seconds = arena.write_slot(slot, staged.rows, ordered=False)
            written = True
            with self._mutation():
                if (residency.registry.records.get(name) is not record or record.staged is not staged
                        or record.slot is not None or arena.layout_token() != layout):
                    return False
                residency.adopt_copy(record, slot, seconds)
                self._selector.set([{name: 1.0}], per_row=False)
                self._write_selection()
            return True
        finally:
            with self._lock:
                residency.release_reserved(slot, written=written and arena.layout_token() == layout)

    def activate_rows(self, rows: Sequence[Activation]) -> None:
        """Select per batch row: ``rows[b]`` is a name, ``{name: weight}`` or None (base model).

        The next forwards must carry exactly ``len(rows)`` rows.
        """
        if isinstance(rows, (str, Mapping)) or not isinstance(rows, Sequence) or not rows:
            raise SelectionError(f"activate_rows expects a non-empty list of rows, got {rows!r}")
        self._select([row_spec(row) if row is not None else {} for row in rows], True)

    def enable(self) -> None:
        """Use the current selection again after :meth:`disable` (its adapters may have left
        their device slots meanwhile: they are brought back first)."""
        prestaged = self._residency.prepare(self._selector.names())
        with self._mutation():
            records = [self._residency.get(n) for n in self._selector.names()]
            self._residency.ensure_resident(records, prestaged)
            self._selector.enabled = True
            self._write_selection()

    def disable(self) -> None:
        """Run the base model, keeping the selection for :meth:`enable`."""
        with self._mutation():
            self._selector.enabled = False
            self._write_selection()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """``with rt.disabled():`` runs the base model inside the block."""
        with self._mutation():
            was_enabled = self._selector.enabled
            self.disable()
        try:
            yield
        finally:
            if was_enabled:
                self.enable()

    @property
    def active(self) -> list[dict[str, float]]:
        """The current selection by name: one row spec (uniform) or one per row."""
        return [dict(row) for row in self._selector.rows]

    def _select(self, rows: list[dict[str, float]], per_row: bool) -> None:
        if self._is_selected(rows, per_row):
            return
        names = sorted({n for row in rows for n, w in row.items() if w != 0.0})
        with self._lock:  # unknown names first: nothing is waited for or copied
            records = self._residency.registry.records
            for name in names:
                if name not in records and not self._background.knows(name):
                    self._residency.get(name)  # raises UnknownAdapterError
        self._selection.check(len(rows), names)
        self._selection.check_rows(rows)
        prestaged = self._residency.prepare(names)  # outside the lock: prefetches, disk reads
        with self._mutation():
            records = [self._residency.get(n) for n in names]  # unknown name: raise before change
            self._selector.check_weights(rows, lambda name: self._residency.get(name).weight_scale)
            self._residency.ensure_resident(records, prestaged, replaces_selection=True)
            self._selector.set(rows, per_row)
            self._write_selection()

    def _is_selected(self, rows: list[dict[str, float]], per_row: bool) -> bool:
        """Whether ``rows`` already are the selection, so selecting them changes nothing (its
        adapters are resident and the tensors hold it, or a change in flight is writing them
        under the gate, which the next forward waits for). Read without the lock: the engine
        selects its rows before every step, and a load copying under the lock must not stall
        it. Not while a prefetch of one of its names is in flight (selecting a name waits for
        that). Raises if the runtime was ejected."""
        self._check_not_ejected()
        selector = self._selector
        if selector.per_row != per_row or selector.rows != rows:
            return False
        knows = self._background.knows
        return not any(knows(name) for row in rows for name in row)

    def _write_selection(self, force: bool = False) -> None:
        self._selector.write(self._residency.slot_and_scale, force)
        self._residency.selection_written()

    def _mutation(self) -> _Mutation:
        """Exclusive access for a change: wait until no forward runs (keeping new ones out),
        *then* take the runtime lock. In that order a writer never holds the lock while it
        waits for a forward, so a forwarding thread may still call read-only methods.

        Raises:
            HotswapError: the runtime was ejected (its model no longer reads the slots)."""
        self._check_not_ejected()
        return self._exclusive

    def _check_not_ejected(self) -> None:
        if self._ejected:
            raise HotswapError("this runtime was ejected (rt.eject()): the model is restored and no longer "
                               "reads its slots; create a new runtime to serve adapters again")

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

    # ------------------------------------------------------------------------ residency
    def pin(self, name: str) -> AdapterInfo:
        """Bring ``name`` into a device slot and keep it there until :meth:`unpin`."""
        prestaged = self._residency.prepare([name])
        with self._mutation():
            record = self._residency.get(name)
            self._residency.ensure_resident([record], prestaged)
            self._residency.pin(record)
            return self._info(record)

    def unpin(self, name: str) -> AdapterInfo:
        """Let ``name``'s slot be reused again (least-recently-used)."""
        with self._lock:
            record = self._residency.get(name)
            self._residency.pin(record, pinned=False)
            return self._info(record)

    def lease(self, name: str) -> AdapterLease:
        """Bring ``name`` into a device slot and keep it there while the lease is held.

        Raises:
            SlotsBusyError: every slot is pinned, leased or read by the current selection.
        """
        prestaged = self._residency.prepare([name])
        with self._mutation():
            record = self._residency.get(name)
            self._residency.ensure_resident([record], prestaged)
            return self._residency.lease(record)

    # ------------------------------------------------------------------------ training
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
        check_flags("add_adapter", use_rslora=use_rslora, trainable=trainable)
        check_args(rank, alpha, init, self._arena.max_rank)  # before any layer is injected
        if targets is not None:
            targets = names_or_regex(targets, "add_adapter: targets")
        self._check_name(name, replace=False)
        if trainable:
            self._trainer.check_can_train()
        modules = find_targets(self.model, targets) if self.lazy and targets is not None else []
        return self._inject_stage_commit(
            modules, None, lambda: self._residency.check_commit(name, trainable),
            lambda: self._stager.stage(new_adapter(self._arena, rank, alpha, use_rslora, targets, init),
                                       fold_scaling=not trainable),
            lambda staged: self._commit(name, staged, None, False, use_free_slot=True, trainable=trainable))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly what an optimizer should update: the trainable adapter's A and B of every
        layer it targets (unpadded views of its device slot, trained in place).

        Raises:
            HotswapError: no adapter is trainable.
        """
        with self._lock:
            return self._trainer.parameters()

    def freeze(self, name: str) -> AdapterInfo:
        """Turn trainable adapter ``name`` into an inference adapter in place: its scaling is
        folded into B, the slot layers stop attaching its parameters, and its slot may be
        reused. The old parameters are detached from the slot (they keep a copy of the trained
        values), so an optimizer still holding them can no longer change what is served."""
        with self._mutation():
            record = self._residency.get(name)
            if not self._trainer.is_training(name):
                raise HotswapError(f"adapter {name!r} is not trainable")
            assert self._trainer.adapter is not None and record.staged is not None
            staged = self._stager.stage(snapshot(self._trainer.adapter, record.staged.adapter))
            self._trainer.stop()
            self._residency.set_training(record, None)
            self._residency.rewrite(record, staged)
            self._write_selection()
            return self._info(record)

    # ------------------------------------------------------------------------ compile and run
    def compile(
        self,
        *example_args: Any,
        warmup_inputs: Sequence[ExampleInput] = (),
        warmup: Callable[[nn.Module], Any] | None = None,
        fullgraph: bool = True,
        dynamic: bool | None = None,
        mode: str | None = None,
        guard: GuardMode = "raise",
        training: bool = False,
        eager_meanwhile: bool = False,
        **example_kwargs: Any,
    ) -> None:
        """``torch.compile`` the model's forward in place, warm it up, then arm the guard.

        Args:
            example_args, example_kwargs: one call of the model's forward to compile for, as it
                would be called (``rt.compile(input_ids)``, ``rt.compile(sample, timestep,
                encoder_hidden_states=h)``); a single dict positional argument is taken as the
                keyword arguments. May be omitted when ``warmup`` is given.
            warmup_inputs: more calls (other batch sizes / lengths) to compile for up front: each
                a tensor (the first argument), a tuple (positional arguments) or a dict.
            warmup: a callable run on the model during warm-up (e.g. a short ``generate`` with
                ``cache_implementation="static"``, so the prefill and decode graphs exist).
            fullgraph: a graph break raises :class:`GraphBreakError`.
            dynamic, mode: passed to ``torch.compile``; with ``mode="reduce-overhead"`` (CUDA
                graphs) each warm-up runs three times so every graph is recorded before arming.
            guard: what a recompile after warm-up does: "raise", "warn" or "count".
            training: also warm up with autograd on (add the trainable adapter first).
            eager_meanwhile: for a compile on a thread of its own while other threads keep
                running the model (a server answering during its start): their forwards run
                the eager forward until the warm-up is done, then the compiled one. The warm-up
                must not change the selection (its forwards run outside the gate, unchecked
                against it, while other threads change it: their outputs are meaningless, only
                the graphs count). Refused with more than one graph per input shape
                (:attr:`graphs_per_shape`) and with CUDA graphs.

        The compile options are keyword-only; a forward argument with one of their names must
        go in a dict (``rt.compile({"mode": ...})``). ``generate`` calls the runtime's compiled
        forward (transformers' own auto-compile is switched off on this model).
        """
        self._check_not_ejected()
        if len(example_args) == 1 and isinstance(example_args[0], Mapping) and not example_kwargs:
            example: ExampleInput | None = dict(example_args[0])
        elif example_args or example_kwargs:
            example = bind_positional(example_args, example_kwargs, self._forward.params)
        else:
            example = None
        storage = {f"arena[{dtype}]": arena for dtype, arena in self._arena.arenas.items()}
        storage.update(self._selection.tensors())
        selection = self._selection
        if not isinstance(eager_meanwhile, bool):
            raise HotswapError(f"rt.compile: eager_meanwhile must be a bool, got {eager_meanwhile!r}")
        if eager_meanwhile:
            check_eager_meanwhile(self.graphs_per_shape, mode_options(mode, dynamic, "rt.compile: mode"))
        adds_per_row = selection.per_row_at_compile and not selection.per_row_capable
        if adds_per_row:  # RuntimeConfig's auto: per row from now on, the stacked graph for mixes
            self._set_per_row(True)
        # one graph per rank bucket, and per read path when a selection may switch paths
        # (held while the warm-up runs, whatever selections it writes)
        buckets = selection.rank_buckets or (selection.rank_bucket,)
        paths = (True, False) if selection.overflow_stacked else (selection.per_row_capable,)
        variants = [functools.partial(selection.use_variant, variant)
                    for variant in itertools.product(buckets, paths)]
        compiled = False
        try:
            self._forward.compile(
                example, warmup_inputs, warmup, storage, fullgraph=fullgraph, dynamic=dynamic,
                mode=mode, guard=guard, training=training,
                variants=variants if len(variants) > 1 else [], eager_meanwhile=eager_meanwhile,
            )
            compiled = True
        finally:
            selection.use_variant(None)  # what the written selection needs
            if adds_per_row and not compiled:  # the model runs as before the call
                self._set_per_row(False)

    @property
    def graphs_per_shape(self) -> int:
        """How many graphs :meth:`compile` compiles for each input shape: one per rank bucket,
        times two where a selection may switch between the per-row and the stacked product."""
        selection = self._selection
        adds_per_row = selection.per_row_at_compile and not selection.per_row_capable
        paths = 2 if selection.overflow_stacked or adds_per_row else 1
        return len(selection.rank_buckets or (selection.rank_bucket,)) * paths

    def _set_per_row(self, enabled: bool) -> None:
        """Turn the auto per-row product on (or back off) and write the selection for it."""
        with self._mutation():
            self._selection.enable_per_row(enabled)
            self._write_selection(force=True)

    def eject(self) -> nn.Module:
        """Undo injection: put the original layers and forward back (once: ejecting again returns
        the model). The runtime then refuses every change (``HotswapError``); what it reports
        (``adapters``, ``info``, ``stats``) and ``save`` / ``adapter_state_dict`` still work."""
        if self._ejected:
            return self.model
        with self._mutation():
            self._trainer.restore_base()
            self._injection.undo()
            self._forward.restore()
            for hook in self._eject_hooks:
                hook()
            self._background.shutdown()
            self._ejected = True
            return self.model

    # ------------------------------------------------------------------------------ reports
    def adapters(self) -> list[AdapterInfo]:
        """Every loaded adapter, least recently used first."""
        with self._lock:
            records = sorted(self._residency.registry.records.values(), key=lambda r: r.last_used)
            return [self._info(r) for r in records]

    def info(self, name: str) -> AdapterInfo:
        """One adapter's :class:`AdapterInfo`.

        Raises:
            UnknownAdapterError: no adapter of that name is loaded.
        """
        with self._lock:
            return self._info(self._residency.get(name))

    def stats(self) -> dict[str, Any]:
        """Counters: loads, swaps, hits per tier, evictions, bytes copied, swap latency p50/p99."""
        with self._lock:
            registry = self._residency.registry
            return self._residency.stats.as_dict(
                evictions=registry.evictions, host_evictions=registry.host_evictions
            )

    # ------------------------------------------------------------------------------ helpers
    def _check_name(self, name: Any, replace: bool, prefetched: bool = False) -> None:
        self._check_not_ejected()  # before any read or staging work
        if not isinstance(name, str) or not name:
            raise HotswapError(f"adapter names are non-empty strings, got {name!r}")
        if self._background.in_flight(name) and not prefetched:
            raise HotswapError(f"a prefetch of {name!r} is in flight; wait for its Future first")
        if not replace and name in self._residency.registry.records:
            raise HotswapError(f"adapter {name!r} is already loaded (pass replace=True)")
        if replace and self._trainer.is_training(name):
            raise HotswapError(f"adapter {name!r} is being trained; freeze or unload it first")

    def _read_factors(self, origin: Origin) -> ParsedAdapter:
        """An adapter's factors read again from its files (validated as a load does)."""
        return self._stager.read(origin.directory, None, None, origin.allow_pickle, origin.allow_nonfinite)

    def _read_origin(self, origin: Origin) -> StagedAdapter:
        with frames_cleared_on_failure(self._maps_files):  # a kept exception holds no map
            return self._stager.read_and_stage(
                origin.directory, None, None, origin.allow_pickle, origin.allow_nonfinite,
                mapped=self._maps_files)

    def _info(self, record: AdapterRecord) -> AdapterInfo:
        return dataclasses.replace(
            record.info,
            tier=record.tier,
            version=record.version,
            trainable=record.training,
            weights_id=record.weights_id,
            pinned=record.pinned,
            leases=record.leases,
            slot=record.slot,
        )


class _Mutation:
    """:meth:`HotswapRuntime._mutation`'s context manager (a class: cheaper than a generator on
    every switch). It keeps no state of its own, so one instance serves every change, nested
    ones and other threads' included."""

    __slots__ = ("gate", "lock")

    def __init__(self, gate: ForwardGate, lock: threading.RLock) -> None:
        self.gate, self.lock = gate, lock

    def __enter__(self) -> None:
        self.gate.begin_write()
        try:
            self.lock.acquire()
        except BaseException:
            self.gate.end_write()
            raise

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
        self.gate.end_write()


def _check_read_unchanged(directory: Path, stamp: tuple[FileStamp, ...]) -> None:
    """Raise unless ``directory``'s adapter files still have the ``stamp`` taken before they
    were read (see :meth:`HotswapRuntime._read_and_commit`).

    Raises:
        AdapterChangedError: naming the files that changed."""
    changed = changed_files(directory, stamp)
    if changed:
        raise AdapterChangedError(
            f"{directory}: {changed} changed (or appeared, or went) while the adapter was read, so "
            f"it may hold old and new bytes mixed (a file rewritten in place?): nothing was loaded; "
            f"load it again once the files are written (a writer that renames a finished file "
            f"over the old one, as this runtime's save does, never shows a half-written file)")


def _device_of(model: nn.Module, weights: Sequence[torch.Tensor]) -> torch.device:
    """Where the slots live: the targeted layers' device (else the model's first parameter's)."""
    for weight in weights:
        return weight.device
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")

