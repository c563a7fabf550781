"""hotswap_rt.release: values dropped on the release thread; a mapped load unmapped there."""

from __future__ import annotations

import os
import threading

import pytest

from hotswap_rt import HotswapRuntime, RuntimeConfig
from hotswap_rt.release import release_later, wait_for_releases

from .conftest import ATTENTION_TARGETS, CAN_LEASE, CAN_SEE_MAPS, BaseModel, file_is_mapped


@pytest.fixture(scope="module")
def llama_and_adapter(tmp_path_factory):
    base = BaseModel("llama", seed=11)
    return base, base.make_adapter(tmp_path_factory.mktemp("src") / "a", seed=3, r=4, lora_alpha=16)


class _Tracked:
    """Records the thread that drops it; ``hold`` (an Event) keeps that thread waiting."""

    def __init__(self, dropped_on: list[str], hold: threading.Event | None = None) -> None:
        self.dropped_on, self.hold = dropped_on, hold

    def __del__(self) -> None:
        if self.hold is not None:
            self.hold.wait(timeout=30)
        self.dropped_on.append(threading.current_thread().name)


def test_values_are_dropped_on_the_release_thread_and_waited_for() -> None:
    dropped_on: list[str] = []
    release_later(_Tracked(dropped_on))
    wait_for_releases()
    assert dropped_on == ["hotswap_rt-release"]


@pytest.mark.skipif(not CAN_SEE_MAPS or not CAN_LEASE,
                    reason="reads /proc/self/maps (Linux); files are mapped only under read leases")
def test_a_mapped_load_is_unmapped_on_the_release_thread(llama_and_adapter) -> None:
    """The load returns with the file still mapped while the release thread is busy, and the
    map goes once that thread drops the load's factors; the rows are staged already."""
    base, path = llama_and_adapter
    weights = path / "adapter_model.safetensors"
    rt = HotswapRuntime(base.clone(), RuntimeConfig(ATTENTION_TARGETS["llama"], max_rank=16, device_slots=1))
    hold, dropped_on = threading.Event(), []
    release_later(_Tracked(dropped_on, hold))  # the release thread waits in its __del__
    try:
        rt.load("a", path)
        with open("/proc/self/maps") as maps:
            still_mapped = str(weights.stat().st_ino) in maps.read().split()
    finally:
        hold.set()
    assert still_mapped  # not unmapped on the way out of load
    assert not file_is_mapped(weights)  # waits for the release thread
    assert dropped_on == ["hotswap_rt-release"]
    assert rt.info("a").tier == "device" and rt.internals.registry.records["a"].staged.adapter is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_releases_on_its_own_thread() -> None:
    release_later(object())  # the parent's thread runs
    wait_for_releases()
    pid = os.fork()
    if pid == 0:  # the child: no release thread was inherited; a new one starts
        code = 1
        try:
            dropped_on: list[str] = []
            release_later(_Tracked(dropped_on))
            wait_for_releases()
            code = 0 if dropped_on == ["hotswap_rt-release"] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
