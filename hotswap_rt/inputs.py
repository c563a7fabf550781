"""How the runtime normalizes the inputs of the model's forward before the compiled graph sees them."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import torch

from .errors import HotswapError

# What one example / warm-up input may be: the first argument, a dict of keyword arguments, or a
# tuple of positional arguments.
ExampleInput = torch.Tensor | Mapping[str, Any] | tuple


def positional_names(forward: Callable[..., Any]) -> list[str]:
    """The names positional arguments of ``forward`` bind to, in order."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [n for n, p in inspect.signature(forward).parameters.items() if p.kind in kinds]


def bind_positional(args: Sequence[Any], kwargs: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """``args`` as keywords by ``names``, merged with ``kwargs`` (one calling convention, so
    ``model(x)`` and ``model(input_ids=x)`` share a graph).

    Raises:
        HotswapError: more positional arguments than the forward names, or one given twice.
    """
    if len(args) > len(names):
        raise HotswapError(f"the forward takes {len(names)} positional argument(s) {list(names)}, "
                           f"got {len(args)}")
    bound = dict(zip(names, args))
    twice = sorted(set(bound) & set(kwargs))
    if twice:
        raise HotswapError(f"argument(s) {twice} given both positionally and by keyword")
    return {**bound, **kwargs}


def as_kwargs(inputs: ExampleInput, names: Sequence[str]) -> dict[str, Any]:
    """One example input as keyword arguments: a tensor is the first argument (``input_ids``
    of a transformers model), a tuple the positional arguments, a dict the keywords."""
    if isinstance(inputs, torch.Tensor):
        return bind_positional((inputs,), {}, names)
    if isinstance(inputs, tuple):
        return bind_positional(inputs, {}, names)
    if isinstance(inputs, Mapping):
        return dict(inputs)
    raise HotswapError(
        f"an example input must be a tensor (the first argument), a tuple of positional "
        f"arguments or a dict of keyword arguments, got {type(inputs).__name__}"
    )


def unview(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Replace tensor views (``ids[:1]``) by copies: dynamo compiles views into a separate graph
    guarded on their base, so a slice and a fresh tensor of one shape would recompile."""
    if not any(isinstance(v, torch.Tensor) and v._is_view() for v in kwargs.values()):
        return kwargs
    return {
        k: v.clone(memory_format=torch.contiguous_format)
        if isinstance(v, torch.Tensor) and v._is_view()
        else v
        for k, v in kwargs.items()
    }


def batch_argument(names: Sequence[str], told: str | None) -> list[str]:
    """Where to look for the batch, in order: the argument named by ``RuntimeConfig.batch_input``,
    else ``input_ids``, ``inputs_embeds``, then the forward's first parameter."""
    if told is not None:
        return [told]
    return list(dict.fromkeys(["input_ids", "inputs_embeds", *names[:1]]))


def batch_size(kwargs: Mapping[str, Any], candidates: Sequence[str]) -> int | None:
    """Rows of the batch: dim 0 of the first candidate argument given as a tensor."""
    for name in candidates:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return None
