"""The forward gate (:mod:`hotswap_rt.gate`): writers wait for running forwards and keep new
ones out; a reader may re-enter but never write."""

from __future__ import annotations

import threading
import time

import pytest

from hotswap_rt.errors import HotswapError
from hotswap_rt.gate import ForwardGate


def test_a_writer_waits_for_running_readers() -> None:
    gate, log = ForwardGate(), []
    gate.enter()
    writer = threading.Thread(target=lambda: (gate.writing().__enter__(), log.append("write")))
    writer.start()
    time.sleep(0.05)
    assert log == [] and writer.is_alive()
    gate.exit()
    writer.join(2)
    assert log == ["write"]


def test_new_readers_wait_while_a_write_is_pending() -> None:
    gate, log = ForwardGate(), []
    with gate.writing():
        reader = threading.Thread(target=lambda: (gate.enter(), log.append("read"), gate.exit()))
        reader.start()
        time.sleep(0.05)
        assert log == []
    reader.join(2)
    assert log == ["read"]


def test_readers_reenter_and_may_not_write() -> None:
    gate = ForwardGate()
    gate.enter()
    gate.enter()  # generate -> forward: no deadlock
    assert gate.depth() == 2 and gate.readers == 1
    with pytest.raises(HotswapError, match="wait for itself"):
        with gate.writing():
            pass
    gate.exit()
    gate.exit()
    assert gate.depth() == 0 and gate.readers == 0
    with gate.writing():
        pass
