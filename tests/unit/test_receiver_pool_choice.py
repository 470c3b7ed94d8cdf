"""Which receiver process gets a connection: a serving one, the least busy first; one still starting last.

A receiver process started again after it died takes seconds to serve
(imports, the database, its journal's replay), tens of them on a loaded
machine; a connection handed to it waits all that time for the answer to its
association request (a peer's ACSE timeout is often 30 s).  These tests drive
:class:`ReceiverPool`'s choice with stand-ins for the processes and real
socket pairs for the channels, so each case is decided, not raced.
"""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.receive.pool import ReceiverPool
from dicom_node.settings import Settings


class _Process:
    def __init__(self, pid: int, alive: bool = True) -> None:
        self.pid, self.alive = pid, alive

    def is_alive(self) -> bool:
        return self.alive


@pytest.fixture()
def pool(tmp_path: Path) -> Iterator[tuple[ReceiverPool, list[socket.socket]]]:
    """Two receiver processes (pids 101 and 102) that both serve, and the far ends of their channels."""
    settings = Settings.model_validate({"storage": {"path": str(tmp_path / "state")}, "rules": []})
    pool = ReceiverPool(settings, 2, on_recorded=lambda *a: None, on_association=lambda *a: None)
    theirs = []
    for i, pid in enumerate((101, 102)):
        ours, their = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        their.setblocking(False)
        pool._procs[i], pool._channels[i] = _Process(pid), ours
        pool._dispatch(("listening", i, pid))
        theirs.append(their)
    yield pool, theirs
    for s in [*theirs, *(c for c in pool._channels if c is not None)]:
        s.close()


def _handed_to(pool: ReceiverPool, theirs: list[socket.socket]) -> int | None:
    """Hand one connection over; which process's channel it reached (None: refused)."""
    a, b = socket.socketpair()
    try:
        if not pool._hand_over(a, "10.0.0.9"):
            return None
    finally:
        a.close()
        b.close()
    for i, their in enumerate(theirs):
        try:
            message, fds, _, _ = socket.recv_fds(their, 256, 1)
        except BlockingIOError:
            continue
        for fd in fds:
            socket.socket(fileno=fd).close()
        assert message == b"10.0.0.9"
        return i
    raise AssertionError("handed over to no channel")


def test_the_least_busy_serving_process_gets_the_connection(pool: tuple[ReceiverPool, list[socket.socket]]) -> None:
    p, theirs = pool
    assert p.serving == 2
    assert _handed_to(p, theirs) == 0  # both idle: the first
    assert _handed_to(p, theirs) == 1  # process 0 runs one association now
    assert p.running == [1, 1]


def test_a_process_started_again_waits_behind_every_serving_one(pool: tuple[ReceiverPool, list[socket.socket]]) -> None:
    p, theirs = pool
    assert _handed_to(p, theirs) == 0
    p._procs[1] = _Process(202)  # process 1 died and was started again: pid 202, still starting
    p._serving[1] = 0
    assert p.serving == 1
    assert _handed_to(p, theirs) == 0 and _handed_to(p, theirs) == 0  # busier, but serving
    p._dispatch(("listening", 1, 102))  # a late word of the process that died: not this one
    assert p.serving == 1 and _handed_to(p, theirs) == 0
    p._dispatch(("listening", 1, 202))  # the new process serves
    assert p.serving == 2 and _handed_to(p, theirs) == 1
    p._dispatch(("listening", 1, 102))  # however late the old word comes, it changes nothing
    assert p.serving == 2


def test_a_starting_process_still_takes_connections_when_no_serving_one_is_alive(
        pool: tuple[ReceiverPool, list[socket.socket]]) -> None:
    p, theirs = pool
    p._procs[0].alive = False  # dead, not yet started again
    p._procs[1] = _Process(202)
    p._serving[1] = 0
    assert p.serving == 0
    assert _handed_to(p, theirs) == 1  # answered once it serves, rather than closed unanswered
    p._procs[1].alive = False
    assert _handed_to(p, theirs) is None  # no process at all: closed


def test_a_process_killed_in_the_middle_of_an_event_breaks_only_its_own_pipe(
        pool: tuple[ReceiverPool, list[socket.socket]]) -> None:
    """Each process has its own event pipe: one that died half-way through writing an event (its length sent,
    part of it not) is closed and left, and the other's events go on arriving, in order."""
    import multiprocessing as mp
    import struct

    p, _ = pool
    readers, writers = zip(*(mp.Pipe(duplex=False) for _ in range(2)))
    p._readers = list(readers)
    payload = pickle.dumps(("recorded", "a record", "stored"))
    os.write(writers[1].fileno(), struct.pack("!i", len(payload)) + payload[:5])  # then SIGKILL
    writers[1].close()
    writers[0].send(("closed", 0, "10.0.0.9"))
    writers[0].send(("association", True, "MODALITY", "10.0.0.9", ""))
    got: list[tuple[object, ...]] = []
    for _ in range(10):
        got += p._poll_events(0.2)
        if p._readers[1] is None and len(got) == 2:
            break
    assert got == [("closed", 0, "10.0.0.9"), ("association", True, "MODALITY", "10.0.0.9", "")]
    assert p._readers[0] is readers[0] and p._readers[1] is None and readers[1].closed
    writers[0].send(("listening", 0, 101))
    assert p._poll_events(1.0) == [("listening", 0, 101)]
    writers[0].close()
