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
    """Readers-writer gate with its own lock; writers have priority over new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._local = threading.local()
        self.readers = 0
        self._writers = 0  # writers waiting or writing

    def depth(self) -> int:
        """How many times the current thread has entered (0: not a reader)."""
        return getattr(self._local, "depth", 0)

    def enter(self) -> None:
        """Become a reader; waits while a write is pending unless already a reader."""
        depth = self.depth()
        if depth == 0:
            with self._cond:
                while self._writers:
                    self._cond.wait()
                self.readers += 1
        self._local.depth = depth + 1

    def exit(self) -> None:
        depth = self.depth() - 1
        self._local.depth = depth
        if depth == 0:
            with self._cond:
                self.readers -= 1
                if self.readers == 0:
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
        if self.depth():
            raise HotswapError(
                "cannot change the selection or a selected slot from inside a forward or an "
                "rt.hold() block of the same thread (it would wait for itself)"
            )
        with self._cond:
            self._writers += 1
            while self.readers:
                self._cond.wait()

    def end_write(self) -> None:
        with self._cond:
            self._writers -= 1
            self._cond.notify_all()


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
