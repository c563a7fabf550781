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


def test_a_stream_of_writes_does_not_starve_a_waiting_reader() -> None:
    """A thread that changes the selection in a loop (each change a write) must let forwards
    in: readers that waited through READER_PATIENCE_WRITES writes enter before the next one."""
    gate, stop, reads, writes = ForwardGate(), threading.Event(), [], []

    def write_forever() -> None:
        while not stop.is_set():
            with gate.writing():
                time.sleep(0.0005)  # the change itself
            writes.append(time.monotonic())

    def read_forever() -> None:
        while not stop.is_set():
            gate.enter()
            reads.append(time.monotonic())
            gate.exit()
            time.sleep(0.0005)  # the forward's own work outside the gate's lock

    threads = [threading.Thread(target=write_forever), threading.Thread(target=read_forever)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(5)
    # Progress relative to the writer, not a rate: readers get a turn every
    # READER_PATIENCE_WRITES writes (twice that, allowing for readers that arrive late); on a
    # gate without turns, 1 read against ~1,000 writes.
    assert len(writes) >= 50 and len(reads) * 2 * ForwardGate.READER_PATIENCE_WRITES >= len(writes), (
        len(reads), len(writes))


def test_a_reader_that_stops_waiting_does_not_hold_writers_back(monkeypatch) -> None:
    """A reader let in ahead of the next write but interrupted before it entered (here its wait
    raises) gives its turn back: the next writer does not wait for it forever."""
    gate = ForwardGate()
    gate.begin_write()
    reader_waiting, failures = threading.Event(), []
    real_wait = gate._cond.wait

    admitted_when_it_left = []

    def wait_then_fail_in_reader(*args):
        if threading.current_thread().name == "reader":
            reader_waiting.set()
            real_wait(*args)
            if gate._admitted:  # let in: it leaves instead
                admitted_when_it_left.append(gate._admitted)
                raise KeyboardInterrupt
            return None
        return real_wait(*args)

    monkeypatch.setattr(gate._cond, "wait", wait_then_fail_in_reader)

    def read() -> None:
        try:
            gate.enter()
        except KeyboardInterrupt as exc:
            failures.append(exc)

    reader = threading.Thread(target=read, name="reader")
    reader.start()
    assert reader_waiting.wait(2)
    for _ in range(ForwardGate.READER_PATIENCE_WRITES):  # writes it waits through, the next
        gate.begin_write()  # one always pending (the gate admits several writers; the
        gate.end_write()  # runtime lock orders them): it cannot slip in between
    gate.end_write()  # the reader waited long enough: its turn comes; it leaves instead
    reader.join(2)
    writer = threading.Thread(target=lambda: (gate.begin_write(), gate.end_write()))
    writer.start()
    writer.join(2)
    assert admitted_when_it_left == [1] and failures and not writer.is_alive() and gate.readers == 0
