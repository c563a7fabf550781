"""Find the layers to target (PEFT's matching rules) and swap them for LoRA slot layers.

Rules, as in PEFT's ``check_target_module_exists``:
- a list of names: a module matches when its full name equals an entry or ends with ``"." + entry``;
- a string: ``re.fullmatch(pattern, full_name)``;
- ``"all-linear"``: every ``nn.Linear`` / ``Conv1D`` except the model's output head.
``nn.Linear``, transformers ``Conv1D``, ``nn.Conv2d`` and ``nn.Embedding`` layers can be injected;
a layer that already is a slot layer counts as one (its wrapped base layer is not looked at).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from .config import name_matches
from .errors import TargetNotFoundError
from .layers import LINEAR_TYPES, SlotLayer, is_linear_layer, is_supported_layer

ALL_LINEAR = "all-linear"


def find_targets(
    model: nn.Module, target_modules: Sequence[str] | str, exclude_modules: Sequence[str] | str = ()
) -> list[str]:
    """Names of the layers to inject, in ``named_modules`` order.

    Raises:
        TargetNotFoundError: nothing matched, a named target is not a linear layer, or
            ``exclude_modules`` (given) excludes no module.
    """
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    head = _output_head_name(model) if all_linear else None
    matched: list[str] = []
    unsupported: list[str] = []
    injected: list[str] = []
    excluded = False
    for name, module in model.named_modules():
        if not name:
            continue
        if exclude_modules and name_matches(exclude_modules, name):
            excluded = True
            continue
        if any(name.startswith(prefix) for prefix in injected):
            continue  # inside a slot layer
        if isinstance(module, SlotLayer):
            injected.append(name + ".")
        if all_linear:
            if is_linear_layer(module) and name != head:
                matched.append(name)
        elif name_matches(target_modules, name):
            (matched if is_supported_layer(module) else unsupported).append(name)
    if unsupported:
        raise TargetNotFoundError(
            f"target_modules={target_modules!r} matches layers that are not {LINEAR_TYPES} (or "
            f"cannot carry LoRA): "
            f"{unsupported[:5]} ({type(model.get_submodule(unsupported[0])).__name__})"
        )
    if not matched:
        raise TargetNotFoundError(
            f"target_modules={target_modules!r} matches no {LINEAR_TYPES} layer of "
            f"{type(model).__name__}; linear layers include {_some_linear_names(model)}"
        )
    if exclude_modules and not excluded:  # PEFT warns; a setting that does nothing is refused here
        hint = (" (a string is a regex matched against the whole module name, as in PEFT: use a list "
                "of names or suffixes, or a pattern such as '.*down_proj')" if isinstance(exclude_modules, str)
                else "")
        raise TargetNotFoundError(f"exclude_modules={exclude_modules!r} matches no module of "
                                  f"{type(model).__name__}{hint}")
    return matched


def find_modules_to_save(model: nn.Module, names: Sequence[str], targets: Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` and ``nn.Embedding`` modules held in full per slot for
    ``names`` (PEFT's ``modules_to_save`` rule: exact name or suffix). A matched module made of
    such layers (a classification head of ``dense`` and ``out_proj`` linears, as RoBERTa's) is
    held as its layers: PEFT saves a module to save by its parameters' full names, so those
    layers are what an adapter's file holds.

    Raises:
        TargetNotFoundError: nothing matched, a match holds a parameter outside such layers
            (a norm, a bare parameter), or a layer is also a LoRA target (``targets``).
    """
    matched = [name for name, module in model.named_modules()
               if name and name_matches(list(names), name) and not isinstance(module, SlotLayer)]
    if not matched:
        raise TargetNotFoundError(f"modules_to_save={list(names)!r} matches no module; modules held in "
                                  f"full must be nn.Linear or nn.Embedding, or modules made of them")
    held: list[str] = []
    for name in matched:
        layers, stray = _full_layers(model.get_submodule(name), name)
        if stray:
            raise TargetNotFoundError(
                f"modules_to_save={list(names)!r} matches {name!r} "
                f"({type(model.get_submodule(name)).__name__}), whose parameters {stray[:3]} are not in an "
                f"nn.Linear or nn.Embedding; modules held in full must be nn.Linear or nn.Embedding, or "
                f"modules made of them")
        held += [layer for layer in layers if layer not in held]
    both = sorted(set(held) & set(targets))
    if both:
        raise TargetNotFoundError(f"{both[:3]} are both LoRA targets and modules_to_save")
    return held


def _full_layers(module: nn.Module, name: str) -> tuple[list[str], list[str]]:
    """The ``nn.Linear`` / ``nn.Embedding`` layers ``module`` (named ``name``) is or holds, and
    the names of its parameters that are in none of them."""
    if type(module) in (nn.Linear, nn.Embedding):
        return [name], []
    layers = [f"{name}.{child}" for child, sub in module.named_modules()
              if child and type(sub) in (nn.Linear, nn.Embedding)]
    inside = tuple(f"{layer}." for layer in layers)
    stray = [f"{name}.{param}" for param, _ in module.named_parameters()
             if not f"{name}.{param}".startswith(inside)]
    if not layers and not stray:
        stray = [f"(none: {name} holds no nn.Linear or nn.Embedding)"]
    return layers, stray


def _output_head_name(model: nn.Module) -> str | None:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def _some_linear_names(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if n and is_supported_layer(m) and ".base" not in n]
    return sorted({n.rsplit(".", 1)[-1] for n in names})[:12]


@dataclass
class Injection:
    """What :func:`replace_modules` changed, so :meth:`undo` can put the originals back."""

    model: nn.Module
    originals: dict[str, nn.Module]

    def undo(self) -> None:
        for name, original in self.originals.items():
            _set_submodule(self.model, name, original)
        self.originals = {}


def replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> Injection:
    """Set each named submodule to its replacement; return how to undo it."""
    originals = {name: model.get_submodule(name) for name in replacements}
    for name, module in replacements.items():
        _set_submodule(model, name, module)
    return Injection(model=model, originals=originals)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
