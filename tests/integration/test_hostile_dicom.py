"""A hostile peer on the DICOM port: half-open, trickling, junk and oversized connections, with real sockets.

Each probe runs against the node as it is started (``dicom-node serve``, with
two receiver processes behind the main process's accept loop) and, where the
code path differs, against the single in-process receiver (``receivers: 1``,
pynetdicom's own accept loop).  What must hold: a real C-ECHO is answered
within a second while the probe goes on; every bad connection is closed at
its deadline or at once; an oversized P-DATA PDU gets an A-ABORT.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE

from dicom_node.domain import VERIFICATION_SOP_CLASS
from tests.integration.conftest import node_config, wait_until
from tests.integration.test_receiver_inprocess import Running, receiver  # noqa: F401 (fixture)
from tests.tools import closed_within, trickle_until_closed

pytestmark = pytest.mark.integration

ACSE_S = 2.0
#: The first 3 bytes of an A-ASSOCIATE-RQ PDU (type 01, reserved, first length byte), then silence.
HALF_RQ = bytes([0x01, 0x00, 0x00])


@pytest.fixture(params=["pool", "inprocess"])
def port(request: pytest.FixtureRequest, tmp_path: Path, node_factory: Any) -> Iterator[int]:
    """The DICOM port of a node with a 2 s ACSE deadline, 5 associations per receiver."""
    limits = {"acse_timeout_s": ACSE_S, "max_associations": 5, "max_connections_per_host": 64}
    if request.param == "pool":
        config = node_config(tmp_path)
        config["node"].update(receivers=2, **limits)
        config["http"]["enabled"] = False
        node_port = node_factory(config).port
        # The node has just started: its worker process is still importing torch on a 2-core machine.
        # The probe measures a settled node, so wait until an echo is quick.
        wait_until(lambda: _echo(node_port) < 0.2, 60, "the node to settle after start", interval=0.5)
        yield node_port
    else:
        running = Running(tmp_path / "inprocess", receivers=1, **limits)
        yield running.port
        running.stop()


def _echo(port: int) -> float:
    """Seconds a real C-ECHO took, from connect to response (fails if not answered with 0x0000)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    start = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established, "C-ECHO association refused"
    status = assoc.send_c_echo()
    elapsed = time.monotonic() - start
    assoc.release()
    assert status is not None and status.Status == 0x0000
    return elapsed


def _connections(port: int, count: int, payload: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        if payload:
            s.sendall(payload)
        socks.append(s)
    return socks


def _close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def test_thirty_half_open_connections_lock_nobody_out(port: int) -> None:
    socks = _connections(port, 30, HALF_RQ)  # 30 > 2 x 5 association slots
    try:
        time.sleep(0.3)  # every one has reached a receiver
        assert _echo(port) < 1.0
        for s in socks:  # and each is closed at the ACSE deadline, not held for ever
            assert closed_within(s, ACSE_S + 2.0) <= ACSE_S + 2.0
    finally:
        _close_all(socks)
    assert _echo(port) < 1.0


def test_silent_and_junk_connections_are_closed(port: int) -> None:
    silent = _connections(port, 5, b"")
    junk = _connections(port, 5, b"\xff\x00GARBAGE-NOT-A-PDU" * 4)
    try:
        assert _echo(port) < 1.0
        for s in junk:  # an unknown PDU type: closed at once
            assert closed_within(s, 2.0) < 2.0
        for s in silent:
            assert closed_within(s, ACSE_S + 2.0) <= ACSE_S + 2.0
    finally:
        _close_all(silent + junk)


def test_a_request_trickling_in_a_byte_a_second_is_cut_at_the_acse_deadline(port: int) -> None:
    header = bytes([0x01, 0x00, 0x00, 0x00, 0x01, 0x00]) + b"\x00" * 20  # an RQ, one byte every 0.6 s
    with socket.create_connection(("127.0.0.1", port)) as s:
        closed, elapsed = trickle_until_closed(s, [bytes([b]) for b in header], 0.6)
    assert closed, "a trickling A-ASSOCIATE-RQ was never cut"
    assert elapsed <= ACSE_S + 2.0, elapsed
    assert _echo(port) < 1.0


def test_a_p_data_pdu_longer_than_announced_is_aborted(port: int) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 131072
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 0x04, 0, 50_000_000) + b"\x00" * 64)  # 50 MB declared, 128 kB announced
    # The node answers with an A-ABORT at once (it never waits for 50 MB): pynetdicom sees it as aborted.
    wait_until(lambda: assoc.is_aborted, 5, "the node's A-ABORT")
    assert _echo(port) < 1.0


def test_connections_over_the_per_address_cap_are_closed_at_once(tmp_path: Path,
                                                                 receiver: Callable[..., Running]) -> None:  # noqa: F811
    r = receiver(acse_timeout_s=ACSE_S, max_connections_per_host=4)
    socks = _connections(r.port, 4, HALF_RQ)
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", r.port)) as fifth:
            assert closed_within(fifth, 1.0) < 1.0
    finally:
        _close_all(socks)
    wait_until(lambda: r.receiver.server is not None and r.receiver.server.caps.open == 0,  # type: ignore[attr-defined]
               ACSE_S + 3, "the capped connections to be released")
    assert _echo(r.port) < 1.0
