"""What ``model.forward`` becomes once a runtime is attached, and compiling it.

::

    model(...) -> ModelForward.__call__: one calling convention (positional -> keywords),
                  views copied (compiled), enter the forward gate, check the batch against the
                  selection, guard.call(compiled or eager forward)

The runtime installs a :class:`ModelForward` as the model's instance attribute ``forward``, so
``model(...)`` and ``model.generate(...)`` both go through it. :meth:`ModelForward.compile`
``torch.compile``s the original forward, warms it up and arms the recompilation guard.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Mapping, Sequence

import torch
import torch._dynamo
import torch._inductor
from torch import nn

from .cuda_graph_threads import prepare_thread_for_cuda_graphs
from .errors import HotswapError
from .gate import ForwardGate
from .guard import GuardMode, RecompileGuard
from .inputs import (
    ExampleInput, as_kwargs, batch_argument, batch_size, bind_positional, positional_names, unview,
)
from .selection import Selector


# Process-wide registries that transformers' forward reads by the model's own class: dynamo
# guards on their size, so any *other* model class instantiated after compiling (a second model
# in the same server, a test fixture) would recompile every compiled model. What the forward
# reads from them is fixed for the model's class.
_PROCESS_REGISTRIES = ("_CAN_RECORD_REGISTRY",)


def drop_process_registry_guards(entries: Sequence[Any]) -> list[bool]:
    """``torch.compile``'s ``guard_filter_fn``: keep every guard except those on
    :data:`_PROCESS_REGISTRIES` (dynamo's ``GuardFilterEntry.name`` is the guarded source)."""
    return [not any(registry in entry.name for registry in _PROCESS_REGISTRIES) for entry in entries]


class ModelForward:
    """The model's forward, run under the gate and the guard (see the module doc).

    Args:
        model: the injected model; its original ``forward`` is kept (:meth:`restore`).
        gate: forwards are its readers.
        guard: counts compiles and recompiles of the compiled forward.
        selector: checks each batch against what the selection tensors were written for.
        batch_input: the argument whose dim 0 is the batch (None: found, see
            :func:`~hotswap_rt.inputs.batch_argument`).
    """

    def __init__(
        self, model: nn.Module, gate: ForwardGate, guard: RecompileGuard, selector: Selector,
        batch_input: str | None = None,
    ) -> None:
        self.model = model
        self.gate = gate
        self.guard = guard
        self.selector = selector
        self.eager = model.forward
        self.impl: Callable[..., Any] = self.eager  # the compiled forward once compiled
        self.params = positional_names(self.eager)
        self.batch_candidates = batch_argument(self.params, batch_input)
        self.compiled = False
        self.cuda_graphs = False  # compiled with CUDA graphs: each calling thread is prepared
        # compile(eager_meanwhile=True): the thread whose forwards are the warm-up, and the
        # compiled forward they call; every other thread runs the eager forward meanwhile
        self._warm_up_thread: int | None = None
        self._compiling: Callable[..., Any] = self.eager
        self._restore_disable_compile: Any = None
        model.forward = self  # instance attribute: model(...) and generate() use it

    # Skipped by dynamo, but not what it calls: under the user's own ``torch.compile(model)`` (or
    # ``torch.compile(model.forward)``) the gate and the checks run in Python and the model's
    # original forward is what gets compiled, so no guard lands on this object's state.
    @torch.compiler.disable(recursive=False)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:  # one calling convention, so model(x) and model(input_ids=x) share a graph
            kwargs = bind_positional(args, kwargs, self.params)
        warm_up_thread = self._warm_up_thread
        if warm_up_thread is not None and warm_up_thread == threading.get_ident():
            # a warm-up forward of compile(eager_meanwhile=True): it selects nothing and other
            # threads change the selection meanwhile, so no gate and no batch check
            return self.guard.call(self._compiling, **kwargs)
        impl = self.impl  # read before `compiled`, which the end of a compile sets first
        if self.compiled:
            kwargs = unview(kwargs)
        batch = batch_size(kwargs, self.batch_candidates)
        if self.cuda_graphs:
            prepare_thread_for_cuda_graphs()
        self.gate.enter()  # from here on the selection and the slots it reads cannot change
        try:
            if batch is not None:
                self.selector.check_batch(batch)
            return self.guard.call(impl, **kwargs)
        finally:
            self.gate.exit()

    def compile(
        self,
        example_inputs: ExampleInput | None,
        warmup_inputs: Sequence[ExampleInput],
        warmup: Callable[[nn.Module], Any] | None,
        static_storage: Mapping[str, torch.Tensor],
        *,
        fullgraph: bool,
        dynamic: bool | None,
        mode: str | None,
        guard: GuardMode,
        training: bool,
        variants: Sequence[Callable[[], None]] = (),
        eager_meanwhile: bool = False,
    ) -> None:
        """``torch.compile`` the original forward, run the warm-up, arm the guard (see
        :meth:`HotswapRuntime.compile` for the arguments). ``static_storage``: tensors the graph
        reads in place for life (slot arena, selection): static shape and address, watched by
        the guard. ``variants``: callables that each switch the model to another graph (rank
        buckets); the whole warm-up runs once under each. ``eager_meanwhile``: forwards of
        other threads run the eager forward until the warm-up is done; the warm-up's own run
        outside the gate, unchecked against the selection (:func:`check_eager_meanwhile`, by
        :meth:`HotswapRuntime.compile` before anything changes, says where it works). A failed
        warm-up leaves the forward eager."""
        if self.compiled or self._warm_up_thread is not None:
            raise HotswapError("the model is already compiled (or compiling) by this runtime")
        if example_inputs is None and warmup is None:
            raise HotswapError("rt.compile needs example_inputs, a warmup callable, or both")
        options = _compile_options(warmup_inputs, warmup, fullgraph=fullgraph, dynamic=dynamic, mode=mode,
                                   training=training)  # checked before anything changes
        self.guard.mode = guard
        self.guard.install()
        for tensor in static_storage.values():
            torch._dynamo.mark_static(tensor)  # fixed for life; keep them out of dynamic shapes
            torch._dynamo.mark_static_address(tensor)  # CUDA graphs read them in place, no copy
        self.guard.watch_storage(dict(static_storage))
        generation_config = getattr(self.model, "generation_config", None)
        if generation_config is not None:  # generate() must call our compiled forward
            if self._restore_disable_compile is None:  # the user's own value, not ours of a failed try
                self._restore_disable_compile = generation_config.disable_compile
            generation_config.disable_compile = True
        compiled = torch.compile(self.eager, fullgraph=fullgraph, dynamic=dynamic, options=options)
        if eager_meanwhile:
            self._compiling = compiled
            self._warm_up_thread = threading.get_ident()
        else:
            self.impl = compiled
        self.cuda_graphs = bool(options.get("triton.cudagraphs"))
        self.guard.fallback = self.eager
        passes = 3 if mode is not None and "reduce-overhead" in mode else 1
        # One cache entry per graph: make room for every variant while they compile (the limit
        # is checked only when dynamo compiles; entries past it stay in use afterwards).
        limit = max(torch._dynamo.config.recompile_limit, 8 * len(variants))
        try:
            with torch._dynamo.config.patch(recompile_limit=limit):
                self._warm_up(example_inputs, warmup_inputs, warmup, training, passes, variants)
        except BaseException:
            self.impl = self._compiling = self.eager
            self._warm_up_thread = None
            self.cuda_graphs = False
            raise
        # in this order: the guard is armed before any other thread runs the compiled forward,
        # and one that reads the compiled forward finds `compiled` set (its inputs unviewed)
        self.guard.arm()
        self.compiled = True
        self.impl = compiled
        self._warm_up_thread = None
        self._compiling = self.eager

    def _warm_up(self, example_inputs: ExampleInput | None, warmup_inputs: Sequence[ExampleInput],
                 warmup: Callable[[nn.Module], Any] | None, training: bool, passes: int,
                 variants: Sequence[Callable[[], None]]) -> None:
        """Run every warm-up input and ``warmup`` (``passes`` times) under each grad mode and
        each variant."""
        grad_modes = [True, False] if training else [False]
        inputs = [example_inputs] if example_inputs is not None else []
        for variant in variants or [lambda: None]:
            variant()
            for grad_mode in grad_modes:
                with torch.set_grad_enabled(grad_mode):
                    for _ in range(passes):
                        for each in [*inputs, *warmup_inputs]:
                            self.model(**unview(as_kwargs(each, self.params)))
                        if warmup is not None:
                            warmup(self.model)

    def restore(self) -> None:
        """Put the model's own forward (and generation config) back."""
        self.model.__dict__.pop("forward", None)
        if self._restore_disable_compile is not None:
            self.model.generation_config.disable_compile = self._restore_disable_compile
        self.guard.uninstall()


def check_eager_meanwhile(graphs_per_shape: int, options: Mapping[str, Any]) -> None:
    """Refuse ``eager_meanwhile`` where it cannot work: several graphs per shape (rank
    buckets, a per-row and a stacked path: the warm-up switches the layers' graph, which other
    threads' forwards would follow) or CUDA graphs (recording while other threads launch work)."""
    if graphs_per_shape > 1:
        raise HotswapError(
            f"rt.compile(eager_meanwhile=True) needs one graph per input shape; this runtime "
            f"compiles {graphs_per_shape} (RuntimeConfig.rank_buckets, or a per-row and a stacked "
            f"path): compile without eager_meanwhile")
    if options.get("triton.cudagraphs"):
        raise HotswapError("rt.compile(eager_meanwhile=True) cannot record CUDA graphs while other "
                           "threads run: use another mode (e.g. mode=None or 'max-autotune-no-cudagraphs')")


def _compile_options(warmup_inputs: Any, warmup: Any, *, fullgraph: Any, dynamic: Any, mode: Any,
                     training: Any) -> dict[str, Any]:
    """``torch.compile``'s options for :meth:`ModelForward.compile`, after checking its
    arguments (a bad one is a :class:`HotswapError` before anything changes, not an error deep
    in dynamo or the warm-up)."""
    for name, value in (("fullgraph", fullgraph), ("training", training)):
        if not isinstance(value, bool):
            raise HotswapError(f"rt.compile: {name} must be a bool, got {value!r}")
    if dynamic is not None and not isinstance(dynamic, bool):
        raise HotswapError(f"rt.compile: dynamic must be None, True or False, got {dynamic!r}")
    if warmup is not None and not callable(warmup):
        raise HotswapError(f"rt.compile: warmup must be a callable taking the model, got {warmup!r}")
    if not isinstance(warmup_inputs, (list, tuple)):
        raise HotswapError(f"rt.compile: warmup_inputs must be a list of inputs, got {warmup_inputs!r}")
    # a mode is a preset of options; both cannot be passed
    return {"guard_filter_fn": drop_process_registry_guards, **mode_options(mode, dynamic, "rt.compile: mode")}


def mode_options(mode: str | None, dynamic: bool | None, name: str) -> dict[str, Any]:
    """The ``torch.compile`` options ``mode`` stands for (none for None); a mode torch does not
    know is a :class:`HotswapError` naming the setting (``name``)."""
    if mode is None:
        return {}
    try:
        return dict(torch._inductor.list_mode_options(mode, dynamic))
    except (RuntimeError, TypeError, KeyError, ValueError) as exc:
        raise HotswapError(f"{name}={mode!r} is not a torch.compile mode ({exc})") from None
