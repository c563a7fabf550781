"""Keeping freed host memory in the process (glibc's malloc), so that tensors allocated afresh
every step reuse pages already mapped instead of faulting in new ones.

A CPU generation step allocates and frees tensors of megabytes: the logits ``[B, V]``, the
sampler's scores and probabilities (16 rows of a 152k vocabulary are 9.7 MB each). glibc's
malloc serves blocks that large from fresh ``mmap`` s, or gives the top of its heap back to the
kernel once they are freed, so every step's tensors land on new pages, and each 4 KiB page
faults when it is first written. Whether it settles into reusing them depends on what was
allocated before: on a 2-core VM a 16-row sampler step at a 152k vocabulary faulted ~7,000
pages a step, most of its time (``python -m benchmarks.freed_memory`` at 59afaf6, when the
sampler still copied its scores each step), and the next build's steps did not.

:func:`keep_freed_memory` tells malloc, through ``mallopt``, to serve blocks below
:data:`MMAP_THRESHOLD` (32 MiB, the largest glibc takes) from its heap and to give the heap's
top back only past :data:`TRIM_THRESHOLD` (256 MiB): a freed step's memory is then the next
step's, already mapped. Both are needed: either alone left most faults. It applies to the
whole process, from then on, and is not undone; the price is memory the process keeps once
freed (up to the trim threshold at the top of each of malloc's arenas) instead of returning.
The engine calls it on a CPU by default (``EngineConfig.keep_freed_memory``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
import threading
from typing import Callable

from .errors import HotswapError

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 32 << 20
"""Blocks smaller than this come from malloc's heap, not from an ``mmap`` of their own."""
TRIM_THRESHOLD = 256 << 20
"""Free memory at the top of malloc's heap returned to the kernel only past this."""

# mallopt's parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

_lock = threading.Lock()
_kept = False


@functools.cache  # finding the C library may run a process (ldconfig): once
def glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None where the C library is not glibc (another OS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl has a mallopt that does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def can_keep_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` works here (glibc on Linux)."""
    return glibc_mallopt() is not None


def keeps_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` has run in this process."""
    return _kept


def keep_freed_memory() -> None:
    """Set malloc to keep freed memory for reuse (see the module doc); idempotent.

    Raises:
        HotswapError: the C library is not glibc, or it refused a setting.
    """
    global _kept
    with _lock:
        if _kept:
            return
        mallopt = glibc_mallopt()
        if mallopt is None:
            raise HotswapError("keeping freed memory needs glibc's malloc (Linux); this C library "
                               "is not glibc: pass EngineConfig(keep_freed_memory=False)")
        # the mmap threshold first: setting it also turns off glibc's dynamic thresholds
        for name, parameter, value in (("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                       ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
            if mallopt(parameter, value) != 1:
                raise HotswapError(f"glibc's mallopt refused {name}={value}")
        _kept = True
    log.info("malloc keeps freed memory for reuse (M_MMAP_THRESHOLD %d MiB, M_TRIM_THRESHOLD %d MiB): "
             "per-step tensors reuse mapped pages", MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20)
