"""The inference thread: it owns the compiled runtime and batches requests for any adapters.

Requests (:class:`~hotswap_rt.serve.generation.Row`) arrive from any thread through
:meth:`Engine.submit`. The engine thread waits up to ``batch_wait_s`` after the first waiting
request for more, then takes up to ``max_batch_size`` rows in arrival order whose adapters are
ready (device- or host-resident), as long as their distinct adapters fit in the device slots,
selects one adapter per row (``activate_rows``) and runs one ``generate`` for all of them. A
request whose adapter is on disk starts a background prefetch at once and waits without
blocking the others. Rows join at batch boundaries: a batch runs until its last row finishes.

Adapter loads and unloads from the HTTP side run on this thread between batches
(:meth:`Engine.call`), so a batch never sees its adapters change under it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

import torch

from ..errors import HotswapError, SlotsBusyError
from ..runtime import HotswapRuntime
from .generation import BatchShape, Row, Tokenizer, run_batch

log = logging.getLogger(__name__)


class Engine:
    """Owns ``rt`` on one thread; see the module doc.

    Args:
        on_batch: called after each batch with ``(rows, seconds)`` (metrics).
        mixed_batches: let rows of different adapters share a batch (False: one adapter per
            batch, the PEFT-style baseline the load benchmark compares with).
    """

    def __init__(
        self,
        rt: HotswapRuntime,
        tokenizer: Tokenizer,
        shape: BatchShape,
        batch_wait_s: float,
        compile: bool = True,
        on_batch: Callable[[list[Row], float], None] | None = None,
        mixed_batches: bool = True,
    ) -> None:
        self.rt = rt
        self.tokenizer = tokenizer
        self.shape = shape
        self.batch_wait_s = batch_wait_s
        self.device = next(rt.model.parameters()).device
        self._compile = compile
        self._on_batch = on_batch
        self._mixed_batches = mixed_batches
        self._waiting: deque[Row] = deque()
        self._commands: deque[tuple[Callable[[HotswapRuntime], Any], Future]] = deque()
        self._prefetching: dict[str, Future] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.running_adapters: set[str] = set()
        self._thread = threading.Thread(target=self._main, name="hotswap-engine", daemon=True)

    # ------------------------------------------------------------------------------- lifecycle
    def start(self, timeout: float | None = None) -> None:
        """Start the thread; return once the model is compiled and warmed up."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the engine did not finish compiling in time")
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout=30)

    # --------------------------------------------------------------------------- from any thread
    def submit(self, row: Row) -> None:
        """Queue ``row``; start staging its adapter if it is on disk."""
        if row.adapter is not None:
            self._prefetch_if_cold(row.adapter)
        with self._wake:
            if self._stopping:
                raise HotswapError("the server is shutting down")
            self._waiting.append(row)
            self._wake.notify_all()

    def call(self, fn: Callable[[HotswapRuntime], Any]) -> Future:
        """Run ``fn(rt)`` on the engine thread between batches; its result or error in a Future."""
        future: Future = Future()
        with self._wake:
            self._commands.append((fn, future))
            self._wake.notify_all()
        return future

    def waiting_adapters(self) -> set[str]:
        with self._wake:
            return {row.adapter for row in self._waiting if row.adapter is not None}

    def queue_depth(self) -> int:
        with self._wake:
            return len(self._waiting)

    # ----------------------------------------------------------------------------- engine thread
    def _main(self) -> None:
        try:
            if self._compile:
                self.rt.activate_rows([None] * self.shape.rows)
                self.rt.compile(warmup=self._warmup, guard="count")
        except BaseException as exc:  # reported by start()
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            with self._wake:
                while not (self._stopping or self._commands or self._ready_rows_possible()):
                    self._wake.wait(timeout=0.05 if self._waiting else None)
                if self._stopping:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for fn, future in commands:
                self._run_command(fn, future)
            if self._waiting:
                try:
                    self._gather_and_run()
                except Exception:  # noqa: BLE001 - the engine thread must outlive any batch
                    log.exception("batch formation failed; the rows stay queued")
                    with self._wake:
                        self._wake.wait(timeout=0.05)
        self._fail_waiting("the server is shutting down")

    def _warmup(self, model: torch.nn.Module) -> None:
        rows = [Row([self.tokenizer.eos_token_id or 0], None, 3, lambda kind, value: None)
                for _ in range(self.shape.rows)]
        run_batch(model, rows, self.shape, self.tokenizer, self.device)

    def _ready_rows_possible(self) -> bool:
        return any(self._is_ready(row) for row in self._waiting)

    def _run_command(self, fn: Callable[[HotswapRuntime], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(self.rt))
        except BaseException as exc:
            future.set_exception(exc)

    def _gather_and_run(self) -> None:
        deadline = time.monotonic() + self.batch_wait_s
        with self._wake:
            while (len(self._waiting) < self.shape.rows and not self._stopping
                   and not self._commands and time.monotonic() < deadline):
                self._wake.wait(timeout=max(deadline - time.monotonic(), 0))
            batch = self._take_batch()
        if not batch:
            return
        try:
            self._activate(batch)
        except SlotsBusyError:
            batch = self._keep_what_fits(batch)
            if not batch:
                return
        except HotswapError as exc:  # e.g. an adapter that fails to re-read: row by row
            log.warning("activate_rows failed (%s); requeueing the batch row by row", exc)
            self._requeue_or_fail(batch, exc)
            return
        self._run(batch)

    def _run(self, batch: list[Row]) -> None:
        """Generate for ``batch`` (its adapters already selected); a failure ends each of its
        rows with the error. Clears the selection afterwards."""
        self.running_adapters = {row.adapter for row in batch if row.adapter is not None}
        start = time.perf_counter()
        try:
            run_batch(self.rt.model, batch, self.shape, self.tokenizer, self.device)
        except Exception as exc:  # noqa: BLE001 - reported to every row of this batch
            log.exception("generate failed")
            for row in batch:
                if not row.finished:
                    row.emit("error", f"generation failed: {exc}")
                    row.finish("error")
        finally:
            self.running_adapters = set()
            self._clear_selection()
        if self._on_batch is not None:
            self._on_batch(batch, time.perf_counter() - start)

    def _clear_selection(self) -> None:
        """No batch runs now: select no adapter, so no slot counts as in use (a lease or load
        between batches may then take any slot that is not pinned or leased)."""
        try:
            self.rt.activate_rows([None] * self.shape.rows)
        except HotswapError:  # pragma: no cover - all-None rows always fit
            log.exception("could not clear the selection")

    def _take_batch(self) -> list[Row]:
        """Rows to run now, in arrival order (caller holds ``_wake``)."""
        known = {info.name for info in self.rt.adapters()}
        batch: list[Row] = []
        adapters: set[str] = set()
        kept: deque[Row] = deque()
        while self._waiting:
            row = self._waiting.popleft()
            if row.cancelled.is_set():
                row.finish("cancelled")
                continue
            if row.adapter is not None and row.adapter not in known:
                row.emit("error", f"adapter {row.adapter!r} was unloaded before the request ran")
                row.finish("error")
                continue
            if self._mixed_batches:  # base-model rows take no slot
                fits = row.adapter is None or row.adapter in adapters or \
                    len(adapters) < self.rt.config.device_slots
            else:  # the baseline: every row of a batch has the same adapter (or none)
                fits = not batch or row.adapter == batch[0].adapter
            if len(batch) < self.shape.rows and fits and self._is_ready(row):
                batch.append(row)
                if row.adapter is not None:
                    adapters.add(row.adapter)
            else:
                kept.append(row)
        self._waiting = kept
        return batch

    def _is_ready(self, row: Row) -> bool:
        if row.cancelled.is_set() or row.adapter is None:
            return True
        future = self._prefetching.get(row.adapter)
        return future is None or future.done()

    def _prefetch_if_cold(self, name: str) -> None:
        info = next((i for i in self.rt.adapters() if i.name == name), None)
        if info is None or info.tier != "disk" or info.source is None:
            return
        with self._wake:
            if name in self._prefetching and not self._prefetching[name].done():
                return
            try:
                future = self.rt.prefetch(name, info.source, replace=True)
            except HotswapError as exc:  # the activation will restage (and report) it
                log.warning("prefetch of %r not started: %s", name, exc)
                return
            self._prefetching[name] = future
        future.add_done_callback(lambda _: self.notify())

    def notify(self) -> None:
        """Wake the engine thread (something it waits on may have changed)."""
        with self._wake:
            self._wake.notify_all()

    def _keep_what_fits(self, batch: list[Row]) -> list[Row]:
        """Not every adapter of ``batch`` can have a slot now (the others are pinned or leased,
        as under Ray's multiplexing): keep the rows of device-resident adapters and base rows,
        add the other adapters one by one, in arrival order, while their activation succeeds,
        and fill up with queued rows of resident adapters (the rows that hold the leases must
        not wait behind rows that wait for a lease). The rest wait for a slot to be released,
        until their timeout. Returns the rows now selected (possibly none)."""
        resident = {info.name for info in self.rt.adapters() if info.tier == "device"}
        kept = [r for r in batch if r.adapter is None or r.adapter in resident]
        later: list[Row] = []
        for adapter in dict.fromkeys(r.adapter for r in batch if r not in kept):
            rows = [r for r in batch if r.adapter == adapter]
            try:
                self._activate(kept + rows)
                kept += rows
            except SlotsBusyError:
                later += rows
        with self._wake:  # fill up with queued rows that need no new slot
            for row in [r for r in self._waiting if r.adapter is None or r.adapter in resident]:
                if len(kept) >= self.shape.rows:
                    break
                if not row.cancelled.is_set():
                    self._waiting.remove(row)
                    kept.append(row)
            self._waiting.extendleft(reversed(later))
            if not kept:
                self._wake.wait(timeout=0.02)  # a lease release or a new request wakes us
                return []
        self._activate(kept)
        return kept

    def _activate(self, rows: list[Row]) -> None:
        self.rt.activate_rows([r.adapter for r in rows] + [None] * (self.shape.rows - len(rows)))

    def _requeue_or_fail(self, batch: list[Row], error: HotswapError) -> None:
        if len(batch) == 1:
            batch[0].emit("error", str(error))
            batch[0].finish("error")
            return
        with self._wake:
            self._waiting.extendleft(reversed(batch[1:]))
        self._run_single(batch[0])

    def _run_single(self, row: Row) -> None:
        try:
            self._activate([row])
        except HotswapError as exc:  # this row's adapter is the problem: it fails alone
            row.emit("error", str(exc))
            row.finish("error")
            return
        self._run([row])

    def _fail_waiting(self, message: str) -> None:
        with self._wake:
            rows, self._waiting = list(self._waiting), deque()
        for row in rows:
            row.emit("error", message)
            row.finish("error")
