"""An accepted association's pynetdicom threads wait for work instead of polling (dicom_node/receive/wakeups.py)."""

from __future__ import annotations

import queue
import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.receive import wakeups
from tests.integration.test_receiver_inprocess import Running
from tests.phantoms import make_chest_phantom, write_ct_series

pytestmark = pytest.mark.integration


class _Counts:
    """How the node side's waits ended: woken (by the socket, a ring or a queued item) or timed out."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dul_woken = self.dul_timeouts = self.assoc_woken = self.assoc_timeouts = 0
        self.dul_rung = 0  # DUL waits that ended with the doorbell readable

    def reset(self) -> None:
        with self.lock:
            self.dul_woken = self.dul_timeouts = self.assoc_woken = self.assoc_timeouts = self.dul_rung = 0


class _CountingEvent(threading.Event):
    def __init__(self, counts: _Counts) -> None:
        super().__init__()
        self.counts = counts

    def wait(self, timeout: float | None = None) -> bool:
        woken = super().wait(timeout)
        with self.counts.lock:
            if woken:
                self.counts.assoc_woken += 1
            else:
                self.counts.assoc_timeouts += 1
        return woken


@pytest.fixture()
def counts(monkeypatch: pytest.MonkeyPatch) -> _Counts:
    counts = _Counts()
    real_select = select.select

    def counting_select(r: Any, w: Any, x: Any, timeout: float | None = None) -> Any:
        result = real_select(r, w, x, timeout)
        with counts.lock:
            if result[0]:
                counts.dul_woken += 1
                counts.dul_rung += r[-1] in result[0]  # [socket, doorbell]
            else:
                counts.dul_timeouts += 1
        return result

    real_install = wakeups.install

    def counting_install(assoc: Any, provider: Any) -> wakeups.Doorbell:
        provider.work = _CountingEvent(counts)  # before install hands its ``set`` to the queues
        return real_install(assoc, provider)

    monkeypatch.setattr(wakeups, "select", SimpleNamespace(select=counting_select))
    monkeypatch.setattr(wakeups, "install", counting_install)
    return counts


@pytest.fixture()
def running(tmp_path: Path) -> Iterator[Running]:
    r = Running(tmp_path / "node")
    yield r
    r.stop()


def _associate(port: int) -> Any:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    return assoc


def _accepted(r: Running) -> Any:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for assoc in r.receiver.ae.active_associations:
            if assoc.is_established:
                return assoc
        time.sleep(0.01)
    raise AssertionError("no established association on the node")


def test_idle_association_threads_wait_instead_of_polling(running: Running, counts: _Counts) -> None:
    """An idle second: each thread turns ~1 / WAIT_S times (50), not ~1000 (pynetdicom's 1 ms polls)."""
    assoc = _associate(running.port)
    try:
        node_side = _accepted(running)
        assert isinstance(node_side.dul.socket, wakeups.WakingAssociationSocket)
        time.sleep(0.2)
        counts.reset()
        time.sleep(1.0)
        dul_turns = counts.dul_woken + counts.dul_timeouts
        assoc_turns = counts.assoc_woken + counts.assoc_timeouts
    finally:
        assoc.release()
    limit = 2 / wakeups.WAIT_S  # at most 1 / WAIT_S a second, and a margin; polling: 500-1000
    assert 0 < dul_turns <= limit, f"DUL reactor waits in an idle second: {dul_turns}"
    assert 0 < assoc_turns <= limit, f"association reactor waits in an idle second: {assoc_turns}"


def test_each_exchange_wakes_the_thread_that_waits_for_it(
        running: Running, counts: _Counts, tmp_path: Path) -> None:
    """C-ECHOs (answered on the association's thread), C-STOREs (on the DUL's), a release: nothing lost.

    For an echo the association's thread must be woken by the request (a
    message queued) and the DUL's by the response (a primitive queued from
    the other thread: the doorbell).  A lost wake-up would end that wait by
    its timeout instead: woken waits would be few, timed-out ones one per
    exchange.
    """
    hu, _ = make_chest_phantom(shape=(16, 48, 48), spacing=(2.0, 2.0, 2.0))
    datasets = [pydicom.dcmread(f) for f in write_ct_series(hu[:6], (2.0, 2.0, 2.0), tmp_path / "ct")]
    assoc = _associate(running.port)
    node_side = _accepted(running)
    time.sleep(0.1)
    counts.reset()
    echoes = 100
    for _ in range(echoes):
        assert assoc.send_c_echo().Status == 0x0000
    with counts.lock:
        assoc_woken, dul_rung = counts.assoc_woken, counts.dul_rung
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert assoc.is_released
    node_side.join(5)
    assert not node_side.is_alive() and not node_side.dul.is_alive()
    # Each echo: one woken wait of each thread, unless the item was already there when it came to wait.
    assert assoc_woken >= echoes // 2, f"association thread woken {assoc_woken} times for {echoes} echoes"
    assert dul_rung >= echoes // 2, f"DUL woken by its doorbell {dul_rung} times for {echoes} echo responses"


def test_doorbell_rings_once_and_closes() -> None:
    bell = wakeups.Doorbell()
    assert select.select([bell.fd], [], [], 0)[0] == []
    for _ in range(3):
        bell.ring()
    assert select.select([bell.fd], [], [], 0)[0] == [bell.fd]
    bell.clear()
    assert select.select([bell.fd], [], [], 0)[0] == []
    bell.close()
    bell.ring()  # closed: nothing, no error


def test_signaling_queue_keeps_items_and_signals_each_put() -> None:
    old: queue.Queue[str] = queue.Queue()
    old.put("Evt5")
    calls: list[int] = []
    q = wakeups.SignalingQueue(lambda: calls.append(1), old)
    assert list(q.queue) == ["Evt5"] and not calls
    q.put("Evt6")
    q.put_nowait("Evt7")
    assert calls == [1, 1]
    assert [q.get_nowait() for _ in range(3)] == ["Evt5", "Evt6", "Evt7"]


def test_doorbells_do_not_leak_descriptors(running: Running) -> None:
    """Each association's doorbell (two descriptors) is closed when it ends: years of associations, no leak."""
    import os

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    assoc = _associate(running.port)  # the first association's one-time costs (imports, caches) before counting
    assoc.release()
    time.sleep(0.2)
    before = open_fds()
    for i in range(30):
        assoc = _associate(running.port)
        if i % 3 == 0:
            assoc.abort()  # an abort ends it too
        else:
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
    deadline = time.monotonic() + 5
    while running.receiver.ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert open_fds() - before <= 4, f"{open_fds() - before} descriptors more after 30 associations"
