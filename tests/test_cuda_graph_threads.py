"""CUDA graph trees' per-thread state on torch < 2.13 (see :mod:`hotswap_rt.cuda_graph_threads`).

Runs without a GPU: the old torch is simulated by hiding 2.13's lazy initializer and giving the
module a fresh ``threading.local``; ``old_get_obj`` is torch 2.11's ``cudagraph_trees.get_obj``,
the function that asserted in the engine's thread on the first GPU check (H200, torch 2.11).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytest
import torch
from torch._inductor import cudagraph_trees

from hotswap_rt.cuda_graph_threads import prepare_thread_for_cuda_graphs


def old_get_obj(local: threading.local, attr_name: str) -> Any:
    """torch 2.11's ``get_obj``: the thread's own attribute, else autograd's copy, else assert."""
    if hasattr(local, attr_name):
        return getattr(local, attr_name)
    assert torch._C._is_key_in_tls(attr_name)
    return torch._C._get_obj_in_tls(attr_name)


def in_new_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a fresh Python thread; its exception is raised here."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture
def old_torch(monkeypatch: pytest.MonkeyPatch) -> threading.local:
    """cudagraph_trees as torch < 2.13 has it: state only in the thread that imported it."""
    if hasattr(cudagraph_trees, "_initialize_tls"):
        monkeypatch.delattr(cudagraph_trees, "_initialize_tls")
    tree_local = threading.local()
    monkeypatch.setattr(cudagraph_trees, "local", tree_local)
    return tree_local


def test_without_preparing_a_new_thread_asserts_like_torch_2_11(old_torch: threading.local) -> None:
    with pytest.raises(AssertionError):
        in_new_thread(lambda: old_get_obj(old_torch, "tree_manager_containers"))


def test_a_prepared_thread_has_its_own_empty_tree_state(old_torch: threading.local) -> None:
    def prepared() -> tuple[Any, Any, bool]:
        prepare_thread_for_cuda_graphs()
        containers = old_get_obj(old_torch, "tree_manager_containers")
        locks = old_get_obj(old_torch, "tree_manager_locks")
        stashed = torch._C._get_obj_in_tls("tree_manager_containers") is containers  # for autograd
        prepare_thread_for_cuda_graphs()  # once per thread: the second call changes nothing
        return containers, locks, stashed and old_get_obj(old_torch, "tree_manager_containers") is containers

    first, locks, same = in_new_thread(prepared)
    second, _, _ = in_new_thread(prepared)
    assert first == {} and same
    assert locks[0].acquire(blocking=False)  # a defaultdict of locks, as torch builds it
    assert first is not second  # each thread its own, as in torch 2.13


def test_torch_that_initializes_lazily_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(cudagraph_trees, "_initialize_tls"):
        pytest.skip("this torch predates lazy initialization")
    tree_local = threading.local()
    monkeypatch.setattr(cudagraph_trees, "local", tree_local)
    in_new_thread(prepare_thread_for_cuda_graphs)
    assert in_new_thread(lambda: hasattr(tree_local, "tree_manager_containers")) is False
