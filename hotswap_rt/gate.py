"""The forward gate: running forwards are readers of the selection and the slots it names.

A forward (or an ``rt.hold()`` block) enters the gate as a reader and then runs without any
runtime lock, so the slow parts of loads and prefetches (reading, validating, staging) proceed
meanwhile. Every change to runtime state happens inside :meth:`ForwardGate.writing`, entered
*before* the runtime lock: it waits until no forward is running and keeps new forwards out until
the change is done, so a forward never sees a slot or the selection mid-change. A thread that is
already a reader re-enters without waiting (``generate`` inside ``hold``) and may not write (it
would wait for itself forever).
"""

from __future__ import annotations

import threading

from .errors import HotswapError


class ForwardGate:
    """Readers-writer gate with its own lock. Writers have priority over new readers, but not
    for ever: once :attr:`READER_PATIENCE_WRITES` writes have ended while readers waited, those
    readers go in before the next write starts (so a thread changing the selection in a loop
    cannot starve the forwards, while a few changes that come between forwards go first)."""

    # Letting waiting readers in after every write doubled the p99 of threads that each change
    # the selection and then run a forward (ad hoc, 4 threads: 58 ms against 23-29 ms); a time
    # limit (5 ms) kept that p99 but let a looping writer add ~8 ms to every step of a 0.4 ms
    # decode loop; 4 writes keep the p99 (23-26 ms) and add ~2 ms, as every write did.
    READER_PATIENCE_WRITES = 4

    def __init__(self) -> None:
        # the condition's own lock, entered directly where nothing waits (Condition's Python-level
        # __enter__/__exit__ cost ~0.2 us more per use)
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._local = _Depth()
        self.readers = 0
        self._writers = 0  # writers waiting or writing
        self._writing = 0  # writers past begin_write (the runtime lock orders them)
        self._readers_waiting = 0
        self._writes_while_readers_wait = 0  # since the longest-waiting reader started to wait
        self._admitted = 0  # waiting readers let in ahead of the next write (see end_write)
        # threads blocked in _cond.wait(): a wake-up is sent only when someone waits
        # (notify_all alone costs ~1 us, on every switch)
        self._waiting = 0

    def depth(self) -> int:
        """How many times the current thread has entered (0: not a reader)."""
        return self._local.depth

    def enter(self) -> None:
        """Become a reader; waits while a write is pending unless already a reader."""
        depth = self.depth()
        if depth == 0:
            with self._mutex:
                if self._writing or (self._writers and not self._admitted):
                    self._wait_to_read()
                if self._admitted:
                    self._admitted -= 1
                self.readers += 1
        self._local.depth = depth + 1

    def _wait_to_read(self) -> None:
        """Wait (the mutex held) until no write runs and none is pending, or this reader's
        turn has come (:meth:`end_write`). A reader that leaves by an exception gives its turn
        back, so no writer waits for a reader that will not come."""
        if not self._readers_waiting:
            self._writes_while_readers_wait = 0
        self._readers_waiting += 1
        try:
            while self._writing or (self._writers and not self._admitted):
                self._wait()
        except BaseException:
            self._readers_waiting -= 1
            self._admitted = min(self._admitted, self._readers_waiting)
            if self._waiting:
                self._cond.notify_all()
            raise
        self._readers_waiting -= 1

    def exit(self) -> None:
        depth = self.depth() - 1
        self._local.depth = depth
        if depth == 0:
            with self._mutex:
                self.readers -= 1
                if self.readers == 0 and self._waiting:
                    self._cond.notify_all()

    def writing(self) -> "Writing":
        """``with gate.writing():`` runs the block with no forward running and none starting.

        Raises:
            HotswapError: (on entering) the calling thread is itself inside a forward or
                ``hold``.
        """
        return Writing(self)

    def begin_write(self) -> None:
        """Wait until no forward runs and keep new ones out (see :meth:`writing`)."""
        if self._local.depth:
            raise HotswapError(
                "cannot change the selection or a selected slot from inside a forward or an "
                "rt.hold() block of the same thread (it would wait for itself)"
            )
        with self._mutex:
            self._writers += 1
            try:
                while self.readers or self._admitted:  # readers whose turn came go first
                    self._wait()
            except BaseException:
                self._writers -= 1
                if self._waiting:
                    self._cond.notify_all()
                raise
            self._writing += 1

    def end_write(self) -> None:
        self._mutex.acquire()  # not `with`: nothing below raises, and this runs on every change
        self._writers -= 1
        self._writing -= 1
        if self._readers_waiting:
            self._writes_while_readers_wait += 1
            if (not self._writing and not self._admitted
                    and self._writes_while_readers_wait >= self.READER_PATIENCE_WRITES):
                self._admitted = self._readers_waiting  # they waited long enough: their turn
                self._writes_while_readers_wait = 0  # the next turn: after as many writes again
        if self._waiting:
            self._cond.notify_all()
        self._mutex.release()

    def _wait(self) -> None:
        """Wait on the condition (its lock held), counted in ``_waiting``."""
        self._waiting += 1
        try:
            self._cond.wait()
        finally:
            self._waiting -= 1


class _Depth(threading.local):
    """Per thread: how many times it entered the gate (a class default, so reading it in a
    thread that never entered costs no failed attribute lookup, ~0.4 us)."""

    depth = 0


class Writing:
    """The context manager of :meth:`ForwardGate.writing` (a class: a generator-based one costs
    ~1 us more on every switch)."""

    __slots__ = ("gate",)

    def __init__(self, gate: ForwardGate) -> None:
        self.gate = gate

    def __enter__(self) -> None:
        self.gate.begin_write()

    def __exit__(self, *exc: object) -> None:
        self.gate.end_write()
