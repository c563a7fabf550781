"""CUDA graphs (``mode="reduce-overhead"``) from a thread other than the one that imported
torch's CUDA graph trees, on torch releases before 2.13.

Before 2.13, ``torch._inductor.cudagraph_trees`` keeps its tree managers in a
``threading.local`` that is filled only in the thread that imported the module; a compiled
forward recorded or replayed from any other Python thread fails with a bare ``AssertionError``
in ``cudagraph_trees.get_obj`` (pytorch/pytorch#123177; torch 2.13 fills it lazily per thread,
#184357). The engine runs every compiled forward in its own thread, and servers embedding a
runtime run forwards in theirs, so :class:`~hotswap_rt.forward.ModelForward` calls
:func:`prepare_thread_for_cuda_graphs` before each forward of a CUDA-graph compile: once per
thread it gives that thread the empty state torch would have given it.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import torch

_TREE_STATE = ("tree_manager_containers", "tree_manager_locks")
_prepared = threading.local()


def prepare_thread_for_cuda_graphs() -> None:
    """Give the calling thread CUDA graph trees' per-thread state if this torch does not
    create it itself; a no-op after the first call in a thread (one attribute read)."""
    if getattr(_prepared, "done", False):
        return
    from torch._inductor import cudagraph_trees

    tree_local = getattr(cudagraph_trees, "local", None)
    lazily_initialized = hasattr(cudagraph_trees, "_initialize_tls")  # torch >= 2.13
    if tree_local is not None and not lazily_initialized and not _has_tree_state(tree_local):
        tree_local.tree_manager_containers = {}
        tree_local.tree_manager_locks = defaultdict(threading.Lock)
        # As torch does in the importing thread: autograd's threads copy these from this one.
        for name in _TREE_STATE:
            torch._C._stash_obj_in_tls(name, getattr(tree_local, name))
    _prepared.done = True


def _has_tree_state(tree_local: threading.local) -> bool:
    """Whether this thread already sees the trees' state (its own, or copied by autograd)."""
    return all(hasattr(tree_local, name) or torch._C._is_key_in_tls(name) for name in _TREE_STATE)
