"""Read leases (Linux): keep writers out of a file while this process reads it through a map.

A file memory-mapped for reading must not be truncated while its pages are read: a page past
the new end raises ``SIGBUS``, which ends the process (Python cannot recover from it). A read
lease (``fcntl(F_SETLEASE, F_RDLCK)``) closes that hole: as long as the descriptor it was taken
on is open, another ``open`` of the file for writing (PEFT's ``save_pretrained`` opens it with
``O_TRUNC``) or a ``truncate`` waits until the lease is released (or fails with ``EAGAIN`` if
opened non-blocking, as coreutils' ``truncate`` does), for at most
``/proc/sys/fs/lease-break-time`` seconds (45 by default), after which the kernel revokes it.

The kernel tells the lease holder of such a writer with a signal, ``SIGIO`` unless set with
``F_SETSIG``, and ``SIGIO``'s default action ends the process: the lease is taken with its
signal set to one this process ignores (``SIGURG``, else ``SIGWINCH``, while Python has no
handler for it), so a waiting writer only waits for the release. Nothing reacts to the signal:
the holders here read a file for a few milliseconds and then close it.

The descriptor, and with it the lease, lives as long as what reads the file (:func:`close_with`:
the map). A forked child closes its copies at once, from the moment they are open: the lease
belongs to the open file, which a child shares, so a child that kept it (a worker forked
during a load) would hold writers off until it exits.

A lease needs Linux, a file this process owns (or ``CAP_LEASE``), no descriptor of the file open
for writing anywhere (``EAGAIN``) and a file system with leases (not e.g. NFS): where one cannot
be taken, :func:`open_leased` says so and the caller reads the file instead of mapping it.
"""

from __future__ import annotations

import os
import signal
import weakref
from typing import Any

fcntl: Any
try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_QUIET_SIGNALS = tuple(getattr(signal, name) for name in ("SIGURG", "SIGWINCH") if hasattr(signal, name))


def take_read_lease(fd: int) -> bool:
    """Take a read lease on the file open (read-only) as ``fd``, held until ``fd`` is closed.

    Returns:
        False where none can be taken: not Linux, the file is open for writing somewhere, not
        owned by this process's user, on a file system without leases, or Python handles both
        quiet signals (a lease break would call its handler).
    """
    set_lease = getattr(fcntl, "F_SETLEASE", None)
    set_signal = getattr(fcntl, "F_SETSIG", None)
    if set_lease is None or set_signal is None:
        return False
    quiet = _quiet_signal()
    if quiet is None:
        return False
    try:
        fcntl.fcntl(fd, set_signal, quiet)  # before the lease: a break never sends SIGIO
        fcntl.fcntl(fd, set_lease, fcntl.F_RDLCK)
    except OSError:  # EAGAIN (open for writing), EACCES (not ours), EINVAL (no leases here)
        return False
    return True


def _quiet_signal() -> int | None:
    """A signal whose delivery does nothing here: ignored by default, and not handled from
    Python (``signal.getsignal`` is the default or ``SIG_IGN``); None if there is none."""
    for signum in _QUIET_SIGNALS:
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.SIG_IGN):
            return signum
    return None


_opened: set[int] = set()  # leased descriptors not yet given to close_with
_held: dict[int, weakref.finalize] = {}  # fd -> what closes it (plain dict/set operations: atomic)


def open_leased(path: str | os.PathLike[str]) -> int | None:
    """Open ``path`` read-only and take a read lease on it (:func:`take_read_lease`); the
    descriptor, or None (closed again) where no lease can be taken. From the moment it is
    open, a process forked meanwhile closes its copy at once. Hand it to :func:`close_with`
    or :func:`close_now`.

    Raises:
        OSError: the file cannot be opened."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    _opened.add(fd)
    if not take_read_lease(fd):
        close_now(fd)
        return None
    return fd


def close_with(owner: object, fd: int) -> None:
    """Close ``fd`` (releasing its lease) once ``owner`` is freed, or at once in a process
    forked meanwhile (there ``owner`` is left alone: the child never reads through it)."""
    _held[fd] = weakref.finalize(owner, _close, fd)
    _opened.discard(fd)


def close_now(fd: int) -> None:
    """Close an :func:`open_leased` descriptor no owner holds."""
    _opened.discard(fd)  # before the close: the number may be reused at once
    os.close(fd)


def _close(fd: int) -> None:
    _held.pop(fd, None)  # before the close: the number may be reused at once
    os.close(fd)


def _close_all_in_child() -> None:
    for fd, finalizer in list(_held.items()):
        if finalizer.detach() is not None:
            os.close(fd)
    for fd in list(_opened):
        os.close(fd)
    _held.clear()
    _opened.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_all_in_child)
