"""How the runtime normalizes the inputs of the model's forward before the compiled graph sees them."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .errors import HotswapError


def as_kwargs(inputs: torch.Tensor | Mapping[str, Any]) -> dict[str, Any]:
    """An ``input_ids`` tensor or a dict of forward kwargs, as kwargs."""
    if isinstance(inputs, torch.Tensor):
        return {"input_ids": inputs}
    if isinstance(inputs, Mapping):
        return dict(inputs)
    raise HotswapError(f"example inputs must be an input_ids tensor or a dict, got {type(inputs)}")


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


def batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
    """Rows of the batch: dim 0 of ``input_ids`` or ``inputs_embeds``, if given."""
    for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return None
