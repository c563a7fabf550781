"""One forward of the engine: the inputs of a prefill or decode step and the call of the model.

::

    chunks[b] = (tokens, start)   left-padded to T        input_ids    [B, T]
                                                           position_ids [B, T]  (pads: 0)
                                                           write_at     [B, T]  (pads: scratch)
                                                           mask [B, 1, T, L]: key j visible to
                                                           a token at position p iff j <= p

Rows past ``len(chunks)`` (the bucket's padding) hold only padding tokens. Left padding puts
every row's last real token at ``T - 1``, so ``logits_to_keep=1`` gives each row's next-token
logits.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..runtime import HotswapRuntime
from ..selection import Activation
from .device_values import device_values
from .kv_cache import KVMemory, StepCache


KV_ALIGN = 64  # dynamic KV lengths are rounded up to this (fewer distinct shapes)
CHUNK_ALIGN = 16  # and chunk lengths to this (>= 2: a size-1 dimension would specialize)
BATCH_SHAPE_ID = "engine_batch"  # the unbacked batch symbol the inputs of one forward share


@dataclass(frozen=True)
class StepShapes:
    """The shapes forwards take: batch buckets, and the chunk and KV lengths of a step.

    Attributes:
        dynamic_lengths: chunk and KV lengths are dynamic dimensions (rounded up to
            ``CHUNK_ALIGN`` / ``KV_ALIGN``); otherwise every prefill is ``prefill_chunk`` long
            and attention reads the whole row (``max_len + 1``): static graphs.
        dynamic_batch: the decode buckets share one graph with a dynamic batch dimension, and
            the prefill buckets another (see ``EngineConfig.dynamic_batch``).
    """

    decode_buckets: tuple[int, ...]
    prefill_buckets: tuple[int, ...]
    max_len: int
    prefill_chunk: int
    dynamic_lengths: bool
    dynamic_batch: bool = False

    def chunk_length(self, longest: int) -> int:
        """T of a prefill forward whose longest chunk has ``longest`` tokens."""
        return _round_up(longest, CHUNK_ALIGN) if self.dynamic_lengths else self.prefill_chunk

    def kv_length(self, needed: int) -> int:
        """L of a forward whose rows reach position ``needed - 1``. Dynamic: never the whole
        buffer (the graphs assume a proper slice; positions are < max_len)."""
        return min(_round_up(needed, KV_ALIGN), self.max_len) if self.dynamic_lengths else self.max_len + 1


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


@dataclass(frozen=True)
class StepInputs:
    """The tensors of one forward (see the module doc)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    write_at: torch.Tensor
    mask: torch.Tensor

    def mark_dynamic(self, length: bool) -> None:
        """Compile with the KV length (and, if ``length``, the chunk length) dynamic."""
        if length:
            for tensor in (self.input_ids, self.position_ids, self.write_at):
                torch._dynamo.mark_dynamic(tensor, 1)
            torch._dynamo.mark_dynamic(self.mask, 2)
        torch._dynamo.mark_dynamic(self.mask, 3)

    def mark_dynamic_batch(self, largest: int, unbacked: bool) -> None:
        """Compile with the batch dimension dynamic.

        ``unbacked``: any batch from 1 to ``largest`` rows, one symbol shared by the four
        tensors. An unbacked size is never specialized to 1 as a dynamic one is, so a single row
        reuses the graph; the forward may not branch on the batch size (tracing it then fails:
        see :func:`~hotswap_rt.engine.warmup.compile_buckets`). Otherwise a dynamic size where
        the model allows it: 2 rows and up (dynamo gives a single row a graph of its own, and a
        forward that specializes on the batch size a graph per size, with no error)."""
        for tensor in (self.input_ids, self.position_ids, self.write_at, self.mask):
            if unbacked:
                torch._dynamo.decorators.mark_unbacked(tensor, 0, shape_id=BATCH_SHAPE_ID, min=1, max=largest)
            else:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)


def build_inputs(chunks: list[tuple[list[int], int]], rows: int, length: int, kv_length: int,
                 scratch: int, device: torch.device) -> StepInputs:
    """Inputs for ``chunks`` (``(tokens, start position)`` per row) in a ``[rows, length]``
    batch attending over ``kv_length`` positions. Each row is left-padded (token 0 at position
    0, written to ``scratch``); built as Python lists, one tensor each (writing rows into
    tensors op by op cost ~1 ms for 16 decode rows on a CPU, ad hoc)."""
    id_rows, position_rows, write_rows = [], [], []
    for tokens, start in chunks:
        pad = length - len(tokens)
        positions = list(range(start, start + len(tokens)))
        id_rows.append([0] * pad + list(tokens))
        position_rows.append([0] * pad + positions)
        write_rows.append([scratch] * pad + positions)
    for _ in range(rows - len(chunks)):  # padding rows
        id_rows.append([0] * length)
        position_rows.append([0] * length)
        write_rows.append([scratch] * length)
    input_ids, positions, write_at = (device_values(values, device, torch.long)
                                      for values in (id_rows, position_rows, write_rows))
    keys = torch.arange(kv_length, device=device)
    mask = keys.view(1, 1, 1, -1) <= positions.view(rows, 1, length, 1)
    return StepInputs(input_ids, positions, write_at, mask)


def cache_argument(forward: Callable[..., Any], model: torch.nn.Module) -> str:
    """The name ``forward`` takes the KV cache by: ``cache`` (transformers 5.x) or
    ``past_key_values`` (older releases). A forward that names neither (an override taking
    ``**kwargs``) passes it on: the nearest forward up the model's classes that names one
    decides (transformers 5 still takes ``past_key_values``, deprecated)."""
    overrides = [vars(klass)["forward"] for klass in type(model).__mro__ if "forward" in vars(klass)]
    for candidate in [forward, *overrides]:
        parameters = inspect.signature(candidate).parameters
        for name in ("cache", "past_key_values"):
            if name in parameters:
                return name
    return "past_key_values"


class StepRunner:
    """Runs prefill and decode forwards of ``rt``'s model over the KV memory.

    Args:
        rt: the runtime (its model, selection and compiled forward).
        memory: the KV rows; decode rows start at 0, prefill rows at ``prefill_offset``.
    """

    def __init__(self, rt: HotswapRuntime, memory: KVMemory, prefill_offset: int) -> None:
        self.rt = rt
        self.memory = memory
        self.decode_cache = StepCache(memory, 0)
        self.prefill_cache = StepCache(memory, prefill_offset)
        # a compile on another thread while steps run (warm_up_forward) sets its own
        self._warm_up_caches = (StepCache(memory, 0), StepCache(memory, prefill_offset))
        self.cache_arg = cache_argument(rt.internals.forward.eager, rt.model)  # the KV cache keyword

    @torch.no_grad()
    def forward(self, prefill: bool, inputs: StepInputs, adapters: list[Activation]) -> torch.Tensor:
        """Select one adapter spec per row (``len(adapters)`` = the bucket) and run the model;
        the next-token logits ``[B, V]``."""
        self.rt.activate_rows(adapters)
        return self._call(self.prefill_cache if prefill else self.decode_cache, inputs)

    @torch.no_grad()
    def warm_up_forward(self, prefill: bool, inputs: StepInputs) -> None:
        """A forward of padding rows that selects nothing, with caches of its own: the warm-up
        of a compile on another thread while :meth:`forward` runs steps (its padding rows write
        only the KV memory's scratch position, which no step reads)."""
        self._call(self._warm_up_caches[1 if prefill else 0], inputs)

    def _call(self, cache: StepCache, inputs: StepInputs) -> torch.Tensor:
        cache.write_at, cache.mask = inputs.write_at, inputs.mask
        output = self.rt.model(
            input_ids=inputs.input_ids, position_ids=inputs.position_ids,
            attention_mask=inputs.mask, use_cache=True, logits_to_keep=1,
            **{self.cache_arg: cache},
        )
        return output.logits[:, -1]
