"""Host memory for adapters (their file data and their host rows), reused once nothing holds it.

A cold load reads an adapter's file into one buffer and stages it into a host row (``[V + r * W]``
per dtype, its true size). A fresh allocation of a few megabytes is often fresh memory: the
allocator maps new pages (or gets back pages it had returned to the system) and the kernel faults
and zeroes each 4 KiB page on first touch. Measured in the ring benchmark at hidden 512 (2.2 MB
file, 2.2 MB row): 185-531 page faults per load and a load up to 1.9x slower than one in reused
memory. Reloading or replacing adapters of one shape (what a server does all day) needs the same
sizes again and again, so memory whose adapter was dropped (replaced, unloaded, evicted to the
disk tier) is handed to the next request of that size instead.

Nothing is reused while anything can still read it: each buffer is a NumPy array lent to PyTorch
(``torch.from_numpy`` of a view), and PyTorch releases that view only when the last tensor over its
storage is gone (every view, every slice, a caller's ``adapter_state_dict``); a weak reference to
the view then returns the array to the pool. The pool's memory is pageable: on an accelerator the
runtime's host rows are pinned instead and come from PyTorch's caching host allocator, which
already reuses them (file buffers still come from here).
"""

from __future__ import annotations

import mmap
import threading
import weakref
from collections import defaultdict

import numpy as np
import torch

ALIGNMENT = 64  # bytes, as PyTorch aligns its own CPU allocations


class HostMemoryPool:
    """Pageable host tensors whose memory is reused after release: at most ``per_size`` idle
    buffers of one size, ``limit`` in all and ``limit_bytes`` together (what it keeps idle).

    Attributes:
        reused: buffers handed out again (instead of allocated).
    """

    def __init__(self, per_size: int = 2, limit: int = 6, limit_bytes: int = 256 << 20) -> None:
        self.per_size = per_size
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.reused = 0
        self._idle: defaultdict[int, list[np.ndarray]] = defaultdict(list)  # nbytes -> buffers
        self._idle_count = 0
        self._idle_bytes = 0
        # id of a weak reference to the view PyTorch holds -> (that reference, the buffer)
        self._lent: dict[int, tuple[weakref.ref, np.ndarray]] = {}
        self._lock = threading.RLock()  # loads on prefetch threads; releases on any thread

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous ``[numel]`` host tensor of ``dtype``, uninitialised (reused memory
        holds old values)."""
        nbytes = numel * dtype.itemsize
        with self._lock:
            idle = self._idle.get(nbytes)
            buffer = idle.pop() if idle else None
            if buffer is not None:
                self._idle_count -= 1
                self._idle_bytes -= nbytes
                self.reused += 1
        if buffer is None:
            buffer = _aligned_bytes(nbytes)
        lent = buffer[:]
        ref = weakref.ref(lent, self._released)
        with self._lock:
            self._lent[id(ref)] = ref, buffer
        tensor = torch.from_numpy(lent)  # PyTorch holds `lent` until its storage is freed
        return tensor if dtype == torch.uint8 else tensor.view(dtype)

    def _released(self, ref: weakref.ref) -> None:
        with self._lock:
            _, buffer = self._lent.pop(id(ref))
            idle = self._idle[buffer.nbytes]
            if (len(idle) < self.per_size and self._idle_count < self.limit
                    and self._idle_bytes + buffer.nbytes <= self.limit_bytes):
                idle.append(buffer)
                self._idle_count += 1
                self._idle_bytes += buffer.nbytes

    def clear(self) -> None:
        """Drop every idle buffer (its memory goes back to the allocator)."""
        with self._lock:
            self._idle.clear()
            self._idle_count = 0
            self._idle_bytes = 0


def _aligned_bytes(nbytes: int) -> np.ndarray:
    """A new uint8 array of ``nbytes`` starting on an :data:`ALIGNMENT` boundary; from
    :func:`_huge_page_bytes` when it is at least :data:`HUGE_PAGE` long and the platform can."""
    if nbytes >= HUGE_PAGE and _CAN_ADVISE_HUGE_PAGES:
        return _huge_page_bytes(nbytes)
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    offset = -raw.ctypes.data % ALIGNMENT
    return raw[offset : offset + nbytes]


HUGE_PAGE = 2 << 20  # bytes: x86-64's and arm64's (4 KiB base pages) transparent huge page
_CAN_ADVISE_HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE")  # Linux


def _huge_page_bytes(nbytes: int) -> np.ndarray:
    """``nbytes`` starting on a 2 MiB boundary in a private anonymous mapping of their own
    (unmapped once the array and every view of it are gone), their whole 2 MiB pages advised as
    transparent huge pages (``MADV_HUGEPAGE``; the tail stays 4 KiB pages, and the mapping's
    extra 2 MiB of address space, for the alignment, is never touched).

    Why: a read from the page cache into such a buffer is faster (fewer pages to map and walk).
    Measured ad hoc on this project's 2-core VM (THP mode ``madvise``), reading a 10 MB adapter
    file, medians of 100, four processes: 0.63-0.69 ms
    into this buffer, 0.74-0.91 ms into a plain mapping, 1.27-1.47 ms into ``np.empty``
    memory. Where the kernel has no huge page to give (THP off, fragmented memory) the advice
    changes nothing.
    """
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(mapping, dtype=np.uint8)  # holds the mapping until the last view is gone
    start = -array.ctypes.data % HUGE_PAGE
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:  # a kernel built without THP: plain pages
        pass
    return array[start : start + nbytes]
