"""The forward gate: running forwards are readers of the selection and the slots it names.

A forward (or an ``rt.hold()`` block) enters the gate as a reader; it then runs without the
runtime lock, so loads, prefetches and copies into *other* slots proceed while it runs. Changing
what a forward reads (flipping the selection tensors, writing into a selected slot) is a writer:
it waits until no forward is running, and new forwards wait for a pending writer, so neither
side starves. A thread that is already a reader re-enters without waiting (``generate`` calls
the forward many times inside one ``hold``), and may not become a writer (that would wait for
itself forever).
"""

from __future__ import annotations

import threading

from .errors import HotswapError


class ForwardGate:
    """Readers-writer gate built on the runtime's lock.

    Args:
        lock: the runtime's re-entrant lock; every method except :meth:`exit` is called with
            it held (waiting releases it).
    """

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._cond = threading.Condition(lock)
        self._local = threading.local()
        self.readers = 0
        self._writers_waiting = 0

    def depth(self) -> int:
        """How many times the current thread has entered (0: not a reader)."""
        return getattr(self._local, "depth", 0)

    def enter(self) -> None:
        """Become a reader (lock held). Waits for pending writers unless already a reader."""
        depth = self.depth()
        if depth == 0:
            while self._writers_waiting:
                self._cond.wait()
            self.readers += 1
        self._local.depth = depth + 1

    def exit(self) -> None:
        """Stop being a reader (takes the lock itself)."""
        with self._lock:
            depth = self.depth() - 1
            self._local.depth = depth
            if depth == 0:
                self.readers -= 1
                if self.readers == 0:
                    self._cond.notify_all()

    def wait_idle(self) -> None:
        """Wait (lock held) until no forward is running; new forwards wait meanwhile.

        Raises:
            HotswapError: called from a thread that is itself inside a forward or ``hold``.
        """
        if self.readers == 0:
            return
        if self.depth():
            raise HotswapError(
                "cannot change the selection or a selected slot from inside a forward or an "
                "rt.hold() block of the same thread (it would wait for itself)"
            )
        self._writers_waiting += 1
        try:
            while self.readers:
                self._cond.wait()
        finally:
            self._writers_waiting -= 1
            self._cond.notify_all()
