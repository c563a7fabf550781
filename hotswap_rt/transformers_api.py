"""transformers' own adapter methods, served by a runtime: :func:`enable_hotswap`.

::

    rt = hotswap_rt.enable_hotswap(model, max_rank=64)      # the one added line
    model.load_adapter("path/or/hub-id", adapter_name="a")   # transformers' API from here on
    model.load_adapter("other", adapter_name="b")
    model.set_adapter(["a", "b"])                            # contributions sum
    model = torch.compile(model)                             # the user's own compile
    model.load_adapter("new", adapter_name="a")              # same name: a hotswap, 0 recompiles

After :func:`enable_hotswap`, the model's ``load_adapter``, ``enable_peft_hotswap``,
``add_adapter``, ``set_adapter``, ``enable_adapters``, ``disable_adapters``, ``active_adapters``,
``get_adapter_state_dict``, ``delete_adapter``, ``save_pretrained`` and ``push_to_hub`` are
instance attributes that call :class:`AdapterMethods` (transformers' ``PeftAdapterMixin``
semantics, as PEFT's tuner layers implement them). Where the runtime cannot do what transformers
would, they raise a :class:`~hotswap_rt.HotswapError` that says so.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from .config import RuntimeConfig
from .errors import HotswapError
from .hub import push_adapter_folder
from .peft_format import config_as_dict, resolve_source
from .runtime import HotswapRuntime

METHODS = ("load_adapter", "enable_peft_hotswap", "add_adapter", "set_adapter", "enable_adapters",
           "disable_adapters", "active_adapters", "get_adapter_state_dict", "delete_adapter",
           "save_pretrained", "push_to_hub")
DEFAULT_NAME = "default"  # transformers' and PEFT's name for an unnamed adapter
# LoraConfig fields add_adapter cannot honour, with the value that means "not used".
_ADD_UNSUPPORTED = {
    "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    "layers_to_transform": None, "layers_pattern": None, "lora_bias": False, "bias": "none",
    "exclude_modules": None, "target_parameters": None, "trainable_token_indices": None,
    "layer_replication": None, "lora_dropout": 0.0,
}
_INITS = {True: "kaiming", "gaussian": "gaussian"}


def enable_hotswap(
    model: nn.Module,
    *,
    max_rank: int = 64,
    device_slots: int = 4,
    host_slots: int = 16,
    max_batch_size: int = 64,
    max_active_adapters: int | None = None,
    max_adapters_per_row: int | None = None,
    target_modules: Sequence[str] | str | None = None,
    exclude_modules: Sequence[str] = (),
    scale_vectors: bool = False,
    target_parameters: Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
) -> HotswapRuntime:
    """Serve ``model``'s transformers adapter methods from a :class:`HotswapRuntime`.

    Args:
        model: a transformers model (or any module); modified in place.
        max_rank, device_slots, host_slots, max_batch_size, max_active_adapters,
        max_adapters_per_row, exclude_modules: as in :class:`RuntimeConfig`.
        scale_vectors, target_parameters, modules_to_save: as in :class:`RuntimeConfig`
            (``scale_vectors=True`` lets IA3 / DoRA / LoRA-bias adapters load after your
            ``torch.compile``; lazy injection infers the other two from the adapters loaded
            before it).
        target_modules: None (default): lazy injection, the union of what the loaded adapters
            target, fixed once the model is compiled; or PEFT-style targets injected at once.

    Returns:
        The runtime (``rt.guard`` counts the compiles of the model's forward, also under the
        user's own ``torch.compile``; ``rt.eject()`` restores the model and its methods).
    """
    config = RuntimeConfig(target_modules=target_modules, max_rank=max_rank, device_slots=device_slots,
                           host_slots=host_slots, max_batch_size=max_batch_size,
                           max_active_adapters=max_active_adapters,
                           max_adapters_per_row=max_adapters_per_row, exclude_modules=exclude_modules,
                           scale_vectors=scale_vectors, target_parameters=target_parameters,
                           modules_to_save=modules_to_save)
    rt = HotswapRuntime(model, config)
    rt.guard.mode = "count"
    rt.guard.install()  # counts compiles of the forward whoever compiles it
    AdapterMethods(rt).install()
    return rt


class AdapterMethods:
    """transformers' ``PeftAdapterMixin`` methods over ``rt`` (see the module doc).

    State beyond the runtime's: the load order (PEFT's choice of a new active adapter after a
    delete), and whether loading under an existing name hotswaps (on from the start: the runtime
    exists to hotswap, as if ``enable_peft_hotswap`` had been called; ``hotswap=False`` still
    refuses an existing name).
    """

    def __init__(self, rt: HotswapRuntime) -> None:
        self.rt = rt
        self.model = rt.model
        self.hotswap_enabled = True
        self.order: list[str] = []  # adapter names, first loaded first

    def install(self) -> None:
        """Bind the methods onto the model instance; :meth:`HotswapRuntime.eject` removes them."""
        for name in METHODS:
            setattr(self.model, name, getattr(self, name))
        self.rt.on_eject(self.uninstall)

    def uninstall(self) -> None:
        for name in METHODS:
            self.model.__dict__.pop(name, None)

    # ---------------------------------------------------------------------------- loading
    def load_adapter(
        self,
        peft_model_id: str | os.PathLike[str] | None = None,
        adapter_name: str | None = None,
        peft_config: Mapping[str, Any] | Any = None,
        adapter_state_dict: Mapping[str, torch.Tensor] | None = None,
        low_cpu_mem_usage: bool = False,
        is_trainable: bool = False,
        hotswap: bool | Literal["auto"] = "auto",
        local_files_only: bool = False,
        adapter_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """transformers' ``load_adapter``: from a directory or Hub id, or ``peft_config`` +
        ``adapter_state_dict``. Loading under an existing name hotswaps it (``hotswap="auto"``
        or True; ``hotswap=False`` makes it an error, as transformers does without
        ``enable_peft_hotswap``): the new weights replace the old in the same name, atomically,
        on the layers that exist (a layer the new adapter lacks gives zero). The
        first adapter loaded becomes active, as in transformers. ``low_cpu_mem_usage`` holds
        either way (adapters are copied into preallocated slots).

        Raises:
            HotswapError: a bad name or adapter, or an argument the runtime does not take
                (``adapter_kwargs``, ``load_config``, download options); nothing changes.
        """
        if adapter_kwargs or kwargs:
            raise HotswapError(f"load_adapter: {sorted({*(adapter_kwargs or {}), *kwargs})} are not "
                               f"supported by hotswap_rt (pass a local directory or a cached Hub id)")
        name = adapter_name if adapter_name is not None else DEFAULT_NAME
        if not isinstance(name, str) or not name:
            raise HotswapError(f"adapter_name must be a non-empty string, got {name!r}")
        loaded = self._loaded()
        if hotswap == "auto":
            hotswap = self.hotswap_enabled and name in loaded
        elif not isinstance(hotswap, bool):
            raise HotswapError(f"hotswap must be True, False or 'auto', got {hotswap!r}")
        if hotswap and name not in loaded:
            raise HotswapError("To hotswap an adapter, there must already be an existing adapter with "
                               f"the same adapter name ({name!r} is not loaded).")
        if not hotswap and name in loaded:
            raise HotswapError(f"Adapter with name {name} already exists. Please use a different name "
                               f"(or hotswap=True).")
        if (peft_model_id is None) == (adapter_state_dict is None):
            raise HotswapError("load_adapter needs a peft_model_id, or a peft_config and an "
                               "adapter_state_dict")
        if adapter_state_dict is not None and peft_config is None:
            raise HotswapError("load_adapter: adapter_state_dict needs peft_config")
        source = None
        if peft_model_id is not None:
            if peft_config is not None:
                raise HotswapError("load_adapter: pass peft_config only with adapter_state_dict")
            source = resolve_source(peft_model_id, local_files_only=local_files_only)
        first = not self._active_names()
        self.rt.load(name, source, state_dict=adapter_state_dict, config=peft_config, replace=hotswap,
                     trainable=is_trainable, inject=not hotswap)
        if name not in self.order:
            self.order.append(name)
        if first and not hotswap:
            self.rt.activate(name)

    def enable_peft_hotswap(self, target_rank: int = 128,
                            check_compiled: Literal["error", "warn", "ignore"] = "error") -> None:
        """transformers' switch for hotswapping; with hotswap_rt it is on already, so this only
        checks its arguments as transformers does.

        Raises:
            HotswapError: ``target_rank`` exceeds the runtime's ``max_rank`` (slots are sized
                once, by :func:`enable_hotswap`); called after an adapter was loaded with
                ``check_compiled="error"``.
        """
        if check_compiled not in ("error", "warn", "ignore"):
            raise HotswapError(f"check_compiled should be one of 'error', 'warn', or 'ignore', got "
                               f"{check_compiled!r}")
        if not isinstance(target_rank, int) or target_rank < 1:
            raise HotswapError(f"target_rank must be a positive int, got {target_rank!r}")
        if target_rank > self.rt.config.max_rank:
            raise HotswapError(f"target_rank={target_rank} exceeds the runtime's max_rank="
                               f"{self.rt.config.max_rank}: pass max_rank to enable_hotswap")
        if self._loaded():
            if check_compiled == "error":
                raise HotswapError("Call `enable_peft_hotswap` before loading the first adapter.")
            if check_compiled == "warn":
                warnings.warn("enable_peft_hotswap after loading adapters: with hotswap_rt every slot "
                              "is at max_rank already, so nothing recompiles", stacklevel=2)
        self.hotswap_enabled = True

    def add_adapter(self, adapter_config: Any, adapter_name: str | None = None) -> None:
        """transformers' ``add_adapter``: a new trainable LoRA (B = 0) from a ``LoraConfig``, made
        active. One trainable adapter at a time (freeze it with ``rt.freeze(name)``).

        Raises:
            HotswapError: a name in use, a non-LoRA config, or a LoraConfig field the runtime's
                training cannot honour (dropout, DoRA, patterns, ``init_lora_weights=False``, ...).
        """
        name = adapter_name or DEFAULT_NAME
        if name in self._loaded():
            raise HotswapError(f"Adapter with name {name} already exists. Please use a different name.")
        config = config_as_dict(adapter_config)
        if config.get("peft_type", "LORA") != "LORA":
            raise HotswapError(f"add_adapter: only LoRA configs are supported, got {config['peft_type']!r}")
        refused = {key: config[key] for key, unused in _ADD_UNSUPPORTED.items()
                   if config.get(key, unused) not in (unused, None, {}, [], False, "none", 0.0)}
        init = _INITS.get(config.get("init_lora_weights", True))
        if init is None:
            refused["init_lora_weights"] = config.get("init_lora_weights")
        if refused:
            raise HotswapError(f"add_adapter: hotswap_rt cannot train with {refused}")
        targets = config.get("target_modules")
        if targets is None:
            targets = _default_targets(self.model)
        elif not isinstance(targets, str):
            targets = sorted(targets)
        self.rt.add_adapter(name, rank=config.get("r", 8), alpha=config.get("lora_alpha", 8),
                            use_rslora=bool(config.get("use_rslora", False)), targets=targets,
                            trainable=True, init=init)
        self.order.append(name)
        self.rt.activate(name)

    # -------------------------------------------------------------------------- selection
    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` (or every name of a list, contributions summed) the active
        adapter(s). Adapters disabled with :meth:`disable_adapters` stay disabled."""
        loaded = self._require_loaded()
        names = _names(adapter_name, "set_adapter")
        missing = [n for n in names if n not in loaded]
        if missing:
            raise HotswapError(f"Adapter(s) {missing} not found. Loaded adapters: {sorted(loaded)}")
        self.rt.activate({n: 1.0 for n in names} if names else None)

    def enable_adapters(self) -> None:
        self._require_loaded()
        self.rt.enable()

    def disable_adapters(self) -> None:
        """The base model, until :meth:`enable_adapters`; the active adapters are kept."""
        self._require_loaded()
        self.rt.disable()

    def active_adapters(self) -> list[str]:
        self._require_loaded()
        return self._active_names()

    def get_adapter_state_dict(self, adapter_name: str | None = None,
                               state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The adapter's weights as transformers returns them: ``<module>.lora_A.weight`` ...
        (no ``base_model.model.`` prefix), true rank, unscaled. Default: the first active one."""
        self._require_loaded()
        if state_dict is not None:
            raise HotswapError("get_adapter_state_dict(state_dict=...) is not supported: the weights "
                               "live in the runtime's slots")
        if adapter_name is None:
            active = self._active_names()
            if not active:
                raise HotswapError("no active adapter: pass adapter_name")
            adapter_name = active[0]
        prefix = "base_model.model."
        return {key[len(prefix):]: value for key, value in self.rt.adapter_state_dict(adapter_name).items()}

    def delete_adapter(self, adapter_names: str | list[str]) -> None:
        """Unload adapters. Deleting an active one leaves the other active ones active, else (as
        PEFT does) activates the alphabetically first remaining adapter, with a warning."""
        loaded = self._require_loaded()
        names = _names(adapter_names, "delete_adapter")
        missing = [n for n in names if n not in loaded]
        if missing:
            raise HotswapError(f"The following adapter(s) are not present and cannot be deleted: "
                               f"{', '.join(missing)}")
        for name in names:
            was_active = self._active_names()
            self.rt.unload(name, force=True)
            self.order.remove(name)
            still = [n for n in was_active if n != name]
            if name in was_active and not still and self.order:
                successor = sorted(self.order)[0]
                warnings.warn(f"Adapter {name} was active which is now deleted. Setting active adapter "
                              f"to {successor}.", stacklevel=2)
                self.rt.activate(successor)

    # ------------------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """As transformers does for a model with adapters: the active adapter's
        ``adapter_config.json`` and ``adapter_model.safetensors`` (and the generation config)
        into ``save_directory``, other files there left alone.

        Raises:
            HotswapError: no adapter loaded (``rt.eject()`` first to save the base model), more
                than one active adapter, or an option other than ``is_main_process``.
        """
        is_main = kwargs.pop("is_main_process", True)
        if kwargs:
            raise HotswapError(f"save_pretrained: {sorted(kwargs)} are not supported by hotswap_rt")
        name = self._the_active_adapter("save_pretrained")
        if not is_main:
            return
        self._write(name, save_directory)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None,
                    commit_description: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None,
                    create_pr: bool = False, **kwargs: Any) -> str:
        """As transformers does for a model with an adapter: what :meth:`save_pretrained` writes,
        uploaded to ``repo_id`` (created if needed) with ``huggingface_hub``; returns the commit
        URL. The Hub URL is ``HF_ENDPOINT``'s.

        Raises:
            HotswapError: an option transformers has that is not supported here (``tags``,
                sharding, ...), or what :meth:`save_pretrained` refuses."""
        if kwargs:
            raise HotswapError(f"push_to_hub: {sorted(kwargs)} are not supported by hotswap_rt")
        name = self._the_active_adapter("push_to_hub")
        return push_adapter_folder(
            lambda directory: self._write(name, directory), repo_id, commit_message=commit_message,
            commit_description=commit_description, private=private, token=token, revision=revision,
            create_pr=create_pr,
        )

    # ------------------------------------------------------------------------------ helpers
    def _write(self, name: str, directory: str | os.PathLike[str]) -> None:
        """Adapter ``name``'s two files, and the generation config of a generative model."""
        self.rt.save(name, directory, into_existing=True)
        generation_config = getattr(self.model, "generation_config", None)
        can_generate = getattr(self.model, "can_generate", None)
        if generation_config is not None and callable(can_generate) and can_generate():
            generation_config.save_pretrained(directory)

    def _the_active_adapter(self, what: str) -> str:
        """The one active adapter ``what`` saves.

        Raises:
            HotswapError: none loaded, or not exactly one active."""
        if not self._loaded():
            raise HotswapError(f"{what}: no adapter is loaded; to save the base model, rt.eject() "
                               f"it first")
        active = self._active_names()
        if len(active) != 1:
            raise HotswapError(f"{what} saves one active adapter; active: {active}. Call "
                               f"set_adapter(name) first, or rt.save(name, dir)")
        return active[0]

    def _loaded(self) -> set[str]:
        return {info.name for info in self.rt.adapters()}

    def _require_loaded(self) -> set[str]:
        loaded = self._loaded()
        if not loaded:
            raise HotswapError("No adapter loaded. Please load an adapter first.")
        return loaded

    def _active_names(self) -> list[str]:
        """Adapters the selection names, in the order they were selected."""
        names: list[str] = []
        for row in self.rt.active:
            names.extend(n for n, w in row.items() if w != 0.0 and n not in names)
        return names


def _default_targets(model: nn.Module) -> list[str]:
    """PEFT's default LoRA targets for the model's type (``target_modules=None`` in LoraConfig)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults
    except ImportError:
        defaults = {}
    if model_type not in defaults:
        raise HotswapError(f"add_adapter: LoraConfig.target_modules is None and there is no default "
                           f"for model type {model_type!r}: name the target modules")
    return list(defaults[model_type])


def _names(value: Any, method: str) -> list[str]:
    """An adapter name or a list of names (transformers' forms) as a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, dict)) and all(isinstance(name, str) for name in value):
        return list(value)
    raise HotswapError(f"{method}: expected an adapter name or a list of names, got {value!r}")
