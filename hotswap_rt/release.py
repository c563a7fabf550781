"""Drop a value on a background thread, so what its last reference frees costs the caller nothing.

A load staged from a memory-mapped adapter file (``RuntimeConfig.map_adapter_files``) ends by
dropping the parsed factors, views of the map: the last of them unmaps the file, and ``munmap``
of a map whose pages were read (the kernel clears every page table entry) took ~0.11 ms of a
~2.9 ms load at Llama-7B widths (ad hoc: loads that kept the factors alive, alternating with
plain ones). :func:`release_later` hands such a value to one daemon thread, which drops it while
the caller returns; CPython runs ``munmap`` without the GIL, so the caller's next Python is not
held up. The map lives a moment longer; nothing reads it after staging.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import traceback
from collections.abc import Iterator

_pending: queue.Queue = queue.Queue()
_thread: threading.Thread | None = None
_start_lock = threading.Lock()


def release_later(value: object) -> None:
    """Drop ``value`` on the release thread (started on first use). The caller must hold no
    other reference to it for the work to move there (else whoever drops the last one does it)."""
    global _thread
    if _thread is None:
        with _start_lock:
            if _thread is None:
                thread = threading.Thread(target=_release_forever, name="hotswap_rt-release", daemon=True)
                thread.start()
                _thread = thread
    _pending.put(value)


def wait_for_releases() -> None:
    """Return once every value handed to :func:`release_later` so far has been dropped (e.g.
    before asserting that a file is no longer mapped, or before rewriting in place a file a
    load mapped, which would otherwise wait for the map's read lease, :mod:`hotswap_rt.file_lease`)."""
    _pending.join()


def clear_failed_frames(error: BaseException) -> None:
    """Clear the locals of the finished frames ``error`` (and each exception it chains) passed
    through, so that the exception, kept (a notebook's last traceback, a logged error), holds
    no views of a load's memory map: the map, and its read lease (which keeps writers of the
    file waiting, :mod:`hotswap_rt.file_lease`), go with the load that failed. The frame
    handling the error is still running and keeps its own locals."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        chained = pending.pop()
        if chained is None or id(chained) in seen:
            continue
        seen.add(id(chained))
        traceback.clear_frames(chained.__traceback__)
        pending += [chained.__cause__, chained.__context__]


@contextlib.contextmanager
def frames_cleared_on_failure(enabled: bool = True) -> Iterator[None]:
    """``with frames_cleared_on_failure(maps_files):`` around a call that may map adapter
    files: if it raises, :func:`clear_failed_frames` (when ``enabled``), then the error goes on.
    Locals of the frame holding the ``with`` are kept: call a function inside it."""
    try:
        yield
    except BaseException as error:
        if enabled:
            clear_failed_frames(error)
        raise


def _release_forever() -> None:
    while True:
        value = _pending.get()
        del value  # the last reference: its memory (a file's map) is freed on this thread
        _pending.task_done()


def _forget_thread_after_fork() -> None:
    """A forked child has no release thread: it starts its own on first use, with a fresh queue
    (the parent's may hold values and a lock taken mid-put)."""
    global _pending, _thread, _start_lock
    _pending, _thread, _start_lock = queue.Queue(), None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_thread_after_fork)
