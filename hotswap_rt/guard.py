"""The recompilation guard: counts compiles while warming up, catches every recompile afterwards.

How it sees compiles without touching process-wide dynamo settings: dynamo runs its compile-start
callbacks synchronously in the thread that triggered the compile. The guard registers one callback
that counts only while *this runtime's* forward is running in the current thread (a thread-local
flag set around the call), so other compiled functions in the process are neither affected nor
counted. Reasons come from dynamo's own guard-failure log (``torch._dynamo.utils.guard_failures``).

What counts as what (dynamo tags each start event with a trigger):

* ``DYNAMO`` / ``LAZY_BACKWARD`` inside a watched call: a compile (warm-up) or a recompile (armed).
* ``CUDAGRAPH_RECORDING`` (``mode="reduce-overhead"``): a CUDA-graph recording during warm-up, a
  *re-record* when armed (``error_on_recompile`` does not see these).
* Autotuning events are part of a compile and are not counted.

Independently of dynamo, the guard remembers the data pointers of the slot storage (arena and
selection tensors) when armed and checks them before every watched call: a moved storage means
a compiled graph (and any CUDA graph) would read stale memory, so it is reported like a recompile.

Modes after :meth:`RecompileGuard.arm`: ``"raise"`` raises :class:`RecompileError` once the
recompiling call returns (the compile has happened; the error makes it loud; a moved storage
raises *before* the call), ``"warn"`` logs a warning, ``"count"`` only counts. Cost per forward:
a few thread-local writes, one data-pointer read per watched tensor and an int compare.

Limits: dynamo runs start callbacks only for the outermost of concurrent compiles in the process,
so a recompile that overlaps another thread's compile can go unseen; ``torch._dynamo.reset()``
drops every callback (the guard re-registers itself on its next call). Backward graphs compile
lazily inside ``loss.backward()``, outside any watched call, and are not counted.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Callable, Literal

import torch

from .errors import GraphBreakError, HotswapError, RecompileError

GuardMode = Literal["raise", "warn", "count"]
_MODES = ("raise", "warn", "count")
logger = logging.getLogger("hotswap_rt.guard")


def _dynamo_utils() -> Any:
    import torch._dynamo.utils as dynamo_utils

    return dynamo_utils


class RecompileGuard:
    """Counts compiles, recompiles, CUDA-graph re-records and graph breaks of one runtime's forward.

    Attributes:
        mode: "raise" | "warn" | "count" (settable).
        compiles: dynamo compiles during warm-up (expected).
        recordings: CUDA-graph recordings during warm-up (``mode="reduce-overhead"``).
        recompiles: dynamo compiles after :meth:`arm` (each one a bug or an unexpected input).
        rerecords: CUDA-graph recordings after :meth:`arm`.
        storage_moves: watched calls that found the slot storage at a new address after arming.
        graph_breaks: graph breaks dynamo counted while compiling (0 with fullgraph=True), plus
            armed calls that hit one and ran eagerly (:attr:`fallback`).
        reasons: reasons of everything counted after arming, oldest first.
        fallback: the eager forward, run instead of a call whose compile breaks the graph when
            armed in "count"/"warn" mode (set by the runtime; None: such calls raise).
    """

    def __init__(self, mode: GuardMode = "raise") -> None:
        self.mode = mode
        self.compiles = 0
        self.recordings = 0
        self.recompiles = 0
        self.rerecords = 0
        self.storage_moves = 0
        self.graph_breaks = 0
        self.reasons: list[str] = []
        self.armed = False
        self.fallback: Callable[..., Any] | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._seen_failures: dict[Any, int] = {}
        self._callback: Callable[..., None] | None = None
        self._storage: dict[str, torch.Tensor] = {}
        self._pointers: list[tuple[str, torch.Tensor, int]] = []

    @property
    def mode(self) -> GuardMode:
        return self._mode

    @mode.setter
    def mode(self, value: GuardMode) -> None:
        if value not in _MODES:
            raise HotswapError(f"guard mode must be one of {_MODES}, got {value!r}")
        self._mode = value

    # -- lifecycle ---------------------------------------------------------------------------
    def install(self) -> None:
        """Start listening to dynamo's compile events (idempotent)."""
        if self._callback is not None:
            return
        from torch._dynamo.callback import CallbackTrigger, callback_handler

        recording = CallbackTrigger.CUDAGRAPH_RECORDING
        counted = {CallbackTrigger.DYNAMO, CallbackTrigger.LAZY_BACKWARD}

        def on_compile_start(args: Any = None) -> None:
            local = self._local
            if not getattr(local, "watching", False):
                return
            trigger = getattr(args, "callback_trigger", CallbackTrigger.DYNAMO)
            if trigger == recording:
                local.recordings += 1
            elif trigger in counted:
                local.events += 1

        self._callback = callback_handler.register_start_callback(on_compile_start)
        self._snapshot_failures()

    def uninstall(self) -> None:
        if self._callback is None:
            return
        from torch._dynamo.callback import callback_handler

        if self._callback in callback_handler.start_callbacks:
            callback_handler.remove_start_callback(self._callback)
        self._callback = None

    def watch_storage(self, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors whose storage must never move once armed (the slot arena, the selection)."""
        self._storage = dict(tensors)

    def arm(self) -> None:
        """From now on every compile or recording of the watched forward is unexpected."""
        self._snapshot_failures()
        self._pointers = [(name, t, t.data_ptr()) for name, t in self._storage.items()]
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    # -- the hot path -----------------------------------------------------------------------
    @torch.compiler.disable(recursive=False)  # a user's torch.compile compiles ``fn``, not this
    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` (the compiled forward) and account for any compile it triggered. Armed in
        "count" or "warn" mode, a call whose new compile hits a graph break runs
        :attr:`fallback` (the eager forward) instead of failing, counted and reported."""
        local = self._local
        if getattr(local, "watching", False):  # re-entrant (e.g. generate -> forward)
            return fn(*args, **kwargs)
        self._ensure_registered()
        if self.armed:
            self._check_storage()
            breaks_before = 0
        else:
            breaks_before = self._graph_break_total()
        local.watching, local.events, local.recordings = True, 0, 0
        try:
            out = fn(*args, **kwargs)
        except torch._dynamo.exc.Unsupported as exc:
            if not (self.armed and self._mode != "raise" and self.fallback is not None):
                raise GraphBreakError(f"graph break while compiling the model: {exc}") from exc
            local.watching = False
            self._on_graph_break(exc)
            return self.fallback(*args, **kwargs)
        finally:
            local.watching = False
        if local.events or local.recordings:
            if self.armed:
                self._on_recompile(local.events, local.recordings)
            else:
                with self._lock:
                    self.compiles += local.events
                    self.recordings += local.recordings
                    self.graph_breaks += self._graph_break_total() - breaks_before
        return out

    def _on_graph_break(self, exc: BaseException) -> None:
        reason = f"graph break at serve time, call ran eagerly: {str(exc).splitlines()[0][:300]}"
        with self._lock:
            self.graph_breaks += 1
            self.reasons.append(reason)
        if self._mode == "warn":
            logger.warning("hotswap_rt: %s", reason)

    def _ensure_registered(self) -> None:
        """Re-register after ``torch._dynamo.reset()`` dropped the callback."""
        if self._callback is None:
            return
        from torch._dynamo.callback import callback_handler

        if self._callback not in callback_handler.start_callbacks:
            callback_handler.register_start_callback(self._callback)

    def _check_storage(self) -> None:
        moved = [name for name, tensor, pointer in self._pointers if tensor.data_ptr() != pointer]
        if not moved:
            return
        self._pointers = [(name, t, t.data_ptr()) for name, t, _ in self._pointers]
        reason = (
            f"slot storage moved to a new address ({', '.join(moved)}): compiled graphs and CUDA "
            f"graphs captured the old one (was the model moved with .to() after injection?)"
        )
        with self._lock:
            self.storage_moves += 1
            self.reasons.append(reason)
        self._report(reason)

    # -- reporting ----------------------------------------------------------------------------
    def _on_recompile(self, events: int, recordings: int) -> None:
        reasons: list[str] = []
        if events:
            reasons += self._new_failures() or [
                "no guard failure logged (a new frame or code path was compiled)"
            ]
        if recordings:
            reasons.append(
                f"CUDA graph re-recorded {recordings} time(s) (new shape, or an input whose "
                f"address changed)"
            )
        with self._lock:
            self.recompiles += events
            self.rerecords += recordings
            self.reasons.extend(reasons)
        self._report("; ".join(reasons))

    def _report(self, reason: str) -> None:
        message = f"hotswap_rt: the compiled model recompiled after rt.compile: {reason}"
        if self.mode == "raise":
            raise RecompileError(message)
        if self.mode == "warn":
            logger.warning(message)

    def _snapshot_failures(self) -> None:
        failures = _dynamo_utils().guard_failures
        self._seen_failures = {code: len(items) for code, items in list(failures.items())}

    def _new_failures(self) -> list[str]:
        reasons: list[str] = []
        for code, items in list(_dynamo_utils().guard_failures.items()):
            seen = self._seen_failures.get(code, 0)
            if len(items) > seen:
                name = getattr(code, "co_name", str(code))
                reasons.extend(f"{name}: {reason}" for reason in items[seen:])
                self._seen_failures[code] = len(items)
        return reasons

    @staticmethod
    def _graph_break_total() -> int:
        counter: Counter = _dynamo_utils().counters["graph_break"]
        return sum(counter.values())

    def report(self) -> str:
        lines = [
            f"mode={self.mode} armed={self.armed} compiles={self.compiles} "
            f"recordings={self.recordings} recompiles={self.recompiles} "
            f"rerecords={self.rerecords} storage_moves={self.storage_moves} "
            f"graph_breaks={self.graph_breaks}"
        ]
        lines += [f"  after compile: {reason}" for reason in self.reasons]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"RecompileGuard({self.report().splitlines()[0]})"
