"""The recompilation guard: counts compiles while warming up, catches every recompile afterwards.

How it sees compiles without touching process-wide dynamo settings: dynamo runs its compile-start
callbacks synchronously in the thread that triggered the compile. The guard registers one callback
that counts only while *this runtime's* forward is running in the current thread (a thread-local
flag set around the call), so other compiled functions in the process are neither affected nor
counted. Reasons come from dynamo's own guard-failure log (``torch._dynamo.utils.guard_failures``).

Modes after :meth:`RecompileGuard.arm`: ``"raise"`` raises :class:`RecompileError` once the
recompiling call returns (the compile has happened; the error makes it loud), ``"warn"`` logs a
warning, ``"count"`` only counts. Cost per forward: two thread-local writes and an int compare.
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
    """Counts compiles, recompiles and graph breaks of one runtime's compiled forward.

    Attributes:
        mode: "raise" | "warn" | "count" (settable).
        compiles: compiles during warm-up (expected).
        recompiles: compiles after :meth:`arm` (each one a bug or an unexpected input).
        graph_breaks: graph breaks dynamo counted while compiling (0 with fullgraph=True).
        reasons: guard-failure reasons of the recompiles, oldest first.
    """

    def __init__(self, mode: GuardMode = "raise") -> None:
        self.mode = mode
        self.compiles = 0
        self.recompiles = 0
        self.graph_breaks = 0
        self.reasons: list[str] = []
        self.armed = False
        self._local = threading.local()
        self._lock = threading.Lock()
        self._seen_failures: dict[Any, int] = {}
        self._callback: Callable[..., None] | None = None

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
        from torch._dynamo.callback import callback_handler

        def on_compile_start(*_args: Any) -> None:
            if getattr(self._local, "watching", False):
                self._local.events += 1

        self._callback = callback_handler.register_start_callback(on_compile_start)
        self._snapshot_failures()

    def uninstall(self) -> None:
        if self._callback is None:
            return
        from torch._dynamo.callback import callback_handler

        callback_handler.remove_start_callback(self._callback)
        self._callback = None

    def arm(self) -> None:
        """From now on every compile of the watched forward is a recompile."""
        self._snapshot_failures()
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    # -- the hot path -----------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` (the compiled forward) and account for any compile it triggered."""
        local = self._local
        outer = getattr(local, "watching", False)
        if outer:  # re-entrant call (e.g. generate -> forward): the outer call accounts
            return fn(*args, **kwargs)
        breaks_before = self._graph_break_total() if not self.armed else 0
        local.watching, local.events = True, 0
        try:
            out = fn(*args, **kwargs)
        except torch._dynamo.exc.Unsupported as exc:
            raise GraphBreakError(f"graph break while compiling the model: {exc}") from exc
        finally:
            local.watching = False
        if local.events:
            if self.armed:
                self._on_recompile(local.events)
            else:
                with self._lock:
                    self.compiles += local.events
                    self.graph_breaks += self._graph_break_total() - breaks_before
        return out

    # -- reporting ----------------------------------------------------------------------------
    def _on_recompile(self, events: int) -> None:
        reasons = self._new_failures() or [
            "no guard failure logged (a new frame or code path was compiled)"
        ]
        with self._lock:
            self.recompiles += events
            self.reasons.extend(reasons)
        message = f"hotswap_rt: the compiled model recompiled after rt.compile: {'; '.join(reasons)}"
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
            f"recompiles={self.recompiles} graph_breaks={self.graph_breaks}"
        ]
        lines += [f"  recompile reason: {reason}" for reason in self.reasons]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"RecompileGuard({self.report().splitlines()[0]})"
