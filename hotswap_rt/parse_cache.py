"""Adapters of one structure are validated once.

A server loads many adapters trained with one configuration on one base model: the same config,
the same keys, dtypes and shapes, other values. Everything :func:`parse_adapter` checks except
NaN/Inf is a function of that structure, so an adapter whose structure was parsed before is
rebuilt around its own tensors from what the first parse found (a *recipe*: which key holds each
module's A and B, and every other field), skipping the per-key validation (~250 us of Python for
the 56 tensors of a 4-layer all-linear adapter; ~85 us with a recipe, its lookup included).

Only adapters whose modules hold the state dict's tensors as they are get a recipe: plain LoRA
factors (linear or embedding) with no vectors, saved modules or saved base weights. Any other
adapter (conv, experts, DoRA, bias, IA3, ``modules_to_save``) is parsed every time. A recipe
holds no tensor.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .peft_format import LoraModule, ParsedAdapter, all_finite, nonfinite_error, parse_adapter

# what a recipe keeps of a module (all but its factors) and of the adapter (all but these two)
_MODULE_FIELDS = tuple(f.name for f in dataclasses.fields(LoraModule) if f.name not in ("lora_A", "lora_B"))
_ADAPTER_FIELDS = tuple(f.name for f in dataclasses.fields(ParsedAdapter)
                        if f.name not in ("modules", "source"))
Structure = tuple[str, tuple[tuple[str, torch.dtype, torch.Size], ...]]


@dataclass(frozen=True)
class _Recipe:
    """How to rebuild an adapter of one structure around a new state dict.

    Attributes:
        modules: ``(module name, key of its A, key of its B, its other fields)`` in the parsed
            adapter's order.
        fields: the adapter's fields but ``modules`` and ``source`` (dicts are copied per build).
    """

    modules: tuple[tuple[str, str, str, dict[str, Any]], ...]
    fields: dict[str, Any]

    def build(self, state_dict: Mapping[str, torch.Tensor], source: str | None) -> ParsedAdapter:
        modules = {name: _module(fields, state_dict[key_a], state_dict[key_b])
                   for name, key_a, key_b, fields in self.modules}
        copied = {name: dict(value) if isinstance(value, dict) else value
                  for name, value in self.fields.items()}
        return ParsedAdapter(modules=modules, source=source, **copied)


def _module(fields: dict[str, Any], lora_A: torch.Tensor, lora_B: torch.Tensor) -> LoraModule:
    """``LoraModule(lora_A=lora_A, lora_B=lora_B, **fields)`` for ``fields`` a recipe took from
    a module :func:`parse_adapter` built (so they need no check), without the frozen
    dataclass's ``__init__``: it sets each of the 12 fields through ``object.__setattr__``
    (~5 us a module, 65 of a recipe's ~80 us for the 14 modules of a 2-layer all-linear
    adapter; filling the instance's ``__dict__`` takes ~1 us)."""
    module = object.__new__(LoraModule)
    values = vars(module)
    values.update(fields)
    values["lora_A"], values["lora_B"] = lora_A, lora_B
    return module


class ParseCache:
    """:func:`parse_adapter` that keeps a recipe per structure (at most ``capacity``; all are
    dropped when full)."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._recipes: dict[Structure, _Recipe] = {}

    def parse(self, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], source: str | None,
              allow_nonfinite: bool = False, check_finite: bool = True) -> ParsedAdapter:
        """What ``parse_adapter(config, state_dict, source, allow_nonfinite, check_finite)``
        returns or raises."""
        structure = _structure(config, state_dict)
        recipe = None if structure is None else self._recipes.get(structure)
        if recipe is None:
            adapter = parse_adapter(config, state_dict, source, allow_nonfinite=allow_nonfinite,
                                    check_finite=check_finite)
            recipe = _recipe_of(adapter, state_dict)
            if structure is not None and recipe is not None:
                if len(self._recipes) >= self.capacity:
                    self._recipes.clear()
                self._recipes[structure] = recipe
            return adapter
        if check_finite and not allow_nonfinite:  # as parse_adapter: the first key in order
            for key, tensor in state_dict.items():
                if not all_finite(tensor):
                    raise nonfinite_error(source or "state_dict", key)
        return recipe.build(state_dict, source)

    def clear(self) -> None:
        """Forget every recipe (the next adapter of each structure is parsed key by key)."""
        self._recipes.clear()


def _structure(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> Structure | None:
    """What a parse depends on besides the values: the config and each key's dtype and shape
    (None when the config is not plain JSON or a value is not a dense tensor with values: no
    recipe, :func:`parse_adapter` then says what is wrong)."""
    try:
        config_text = json.dumps(config, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        return None
    tensors = []
    for key, tensor in state_dict.items():
        if type(key) is not str or not isinstance(tensor, torch.Tensor) or tensor.is_meta or (
                tensor.layout is not torch.strided):
            return None
        tensors.append((key, tensor.dtype, tensor.shape))
    return config_text, tuple(tensors)


def _recipe_of(adapter: ParsedAdapter, state_dict: Mapping[str, torch.Tensor]) -> _Recipe | None:
    """The recipe of ``adapter`` parsed from ``state_dict``, or None unless every key is one
    module's A or B, held as it is."""
    if adapter.saved_base_weights or adapter.saved_modules or 2 * len(adapter.modules) != len(state_dict):
        return None
    key_of = {id(tensor): key for key, tensor in state_dict.items()}
    if len(key_of) != len(state_dict):  # one tensor under two keys
        return None
    modules = []
    for name, module in adapter.modules.items():
        key_a, key_b = key_of.get(id(module.lora_A)), key_of.get(id(module.lora_B))
        if module.has_vectors or key_a is None or key_b is None:
            return None
        modules.append((name, key_a, key_b, {field: getattr(module, field) for field in _MODULE_FIELDS}))
    fields = {field: getattr(adapter, field) for field in _ADAPTER_FIELDS}
    return _Recipe(modules=tuple(modules), fields=fields)
