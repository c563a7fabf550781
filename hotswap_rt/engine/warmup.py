"""Compiling the engine's buckets: every batch bucket of decode and prefill is traced once at
start (a forward of padding rows only), then run again at other lengths to prove the lengths do
not specialize, before the recompilation guard is armed."""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch._dynamo
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from ..errors import HotswapError
from ..runtime import HotswapRuntime
from .step import CHUNK_ALIGN, KV_ALIGN, StepRunner, StepShapes, build_inputs

log = logging.getLogger(__name__)
Progress = Callable[[int, int, str], None]  # (graphs done, graphs in all, what)


def compile_buckets(rt: HotswapRuntime, runner: StepRunner, shapes: StepShapes, mode: str | None,
                    progress: Progress | None = None, eager_meanwhile: bool = False) -> None:
    """``rt.compile`` with a warm-up of every bucket (``progress`` per graph).
    ``eager_meanwhile``: on a thread of its own while the engine thread runs steps eagerly
    (``rt.compile(eager_meanwhile=True)``; the warm-up selects nothing).

    Raises:
        HotswapError: ``rt`` is already compiled, or its forward specializes on a length.
    """
    if rt.compiled:
        raise HotswapError("the engine compiles the runtime's buckets itself: pass a runtime "
                           "that is not compiled yet")
    graphs = len(shapes.decode_buckets) + len(shapes.prefill_buckets)  # at most (dynamic_batch: fewer)
    limit = torch._dynamo.config.recompile_limit
    if graphs + 1 > limit:
        log.info("raising torch._dynamo.config.recompile_limit from %d to %d (one graph per "
                 "bucket)", limit, graphs + 1)
        torch._dynamo.config.recompile_limit = graphs + 1

    def warm_up(model: torch.nn.Module) -> None:
        kinds = [(False, b) for b in shapes.decode_buckets] + [(True, b) for b in shapes.prefill_buckets]
        unbacked = {False: shapes.dynamic_batch, True: shapes.dynamic_batch}  # by prefill
        for done, (prefill, bucket) in enumerate(kinds, start=1):
            try:
                _padding_forward(runner, shapes, prefill, bucket, first=True, unbacked=unbacked[prefill],
                                 select=not eager_meanwhile)
            except _UNBACKED_FAILURES as error:
                if not unbacked[prefill]:
                    raise
                unbacked[prefill] = False  # this kind's buckets as before: a graph per size below 2
                log.warning("the model's forward needs to know the batch size (%s): %s buckets "
                            "compile a graph for one row and one for the others", _first_line(error),
                            "prefill" if prefill else "decode")
                _padding_forward(runner, shapes, prefill, bucket, first=True, unbacked=False,
                                 select=not eager_meanwhile)
            if progress is not None:
                progress(done, len(kinds), f"{'prefill' if prefill else 'decode'} x{bucket}")
        compiles = rt.guard.compiles
        for prefill, bucket in kinds:  # other lengths must reuse the graphs
            _padding_forward(runner, shapes, prefill, bucket, first=False, unbacked=False,
                             select=not eager_meanwhile)
        if rt.guard.compiles != compiles:
            raise HotswapError(
                "the model's compiled forward specializes on the sequence or KV length; run the "
                "engine with EngineConfig(dynamic_lengths=False)")
        if not eager_meanwhile:
            rt.activate(None)

    # Automatic dynamic shapes would merge the batch buckets into one dynamic graph.
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        rt.compile(warmup=warm_up, dynamic=None, mode=mode, guard="count", eager_meanwhile=eager_meanwhile)


def _padding_forward(runner: StepRunner, shapes: StepShapes, prefill: bool, bucket: int,
                     first: bool, unbacked: bool, select: bool) -> None:
    """A forward of padding rows only (they write the scratch position alone): traced at
    lengths inside the range steps use (``first``), then checked at other ones (the top).
    With ``shapes.dynamic_batch``, a traced batch is dynamic: ``unbacked``, any size up to the
    kind's largest bucket; else the sizes above one row. ``select``: the base model for every
    row first (else the selection is left to the engine thread's steps)."""
    dynamic = shapes.dynamic_lengths
    if prefill:
        length = (2 * CHUNK_ALIGN if first else CHUNK_ALIGN) if dynamic else shapes.prefill_chunk
    else:
        length = 1
    kv_length = shapes.max_len + 1
    if dynamic:
        kv_length = min(3 * KV_ALIGN, shapes.max_len - 1) if first else shapes.max_len
    inputs = build_inputs([], bucket, length, kv_length, runner.memory.scratch,
                          runner.memory.keys[0].device)
    if dynamic and first:
        inputs.mark_dynamic(length=prefill)
    if shapes.dynamic_batch and first and (unbacked or bucket > 1):  # the first compiles it
        inputs.mark_dynamic_batch((shapes.prefill_buckets if prefill else shapes.decode_buckets)[-1], unbacked)
    if select:
        runner.forward(prefill, inputs, [None] * bucket)
    else:
        runner.warm_up_forward(prefill, inputs)


# What tracing a forward that branches on an unbacked batch size raises (dynamo wraps the
# symbolic-shapes error in a UserError).
_UNBACKED_FAILURES = (torch._dynamo.exc.UserError, GuardOnDataDependentSymNode)


def _first_line(error: BaseException) -> str:
    return str(error).strip().split("\n", 1)[0]
