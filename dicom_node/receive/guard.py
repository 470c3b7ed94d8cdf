"""Deadlines, PDU size limits and connection caps on the DICOM port: no peer can hold it hostage.

A connection that has not delivered its whole A-ASSOCIATE-RQ within
``node.acse_timeout_s`` of its arrival is closed, however slowly its bytes
trickle in; every later PDU must arrive whole within ``node.network_timeout_s``
of its first byte; a P-DATA-TF PDU longer than the ``node.max_pdu_bytes`` the
node announced (or an A-ASSOCIATE-RQ over :data:`MAX_RQ_BYTES`) is answered with
an A-ABORT (PS3.8 9.3.8, source: service provider, reason: invalid PDU
parameter value) and closed, before its body is read.  Idle associations end
at ``node.network_timeout_s`` (pynetdicom's own network timeout).

:class:`ConnectionCaps` bounds the connections open at once, in all and per
peer address, where connections are accepted; a connection over a cap is
closed at once with an audit line.  A connection that has not associated yet
does not count against ``node.max_associations`` (see ``receive/server.py``):
half-open connections cannot exhaust the association slots.

pynetdicom's DUL reads a PDU as ``recv(6)`` (type and length) then
``recv(length)`` on its :class:`~pynetdicom.transport.AssociationSocket`;
:meth:`ConnectionGuard.attach` replaces that socket's ``recv`` (an instance
attribute, nothing of pynetdicom is changed for other sockets) with one that
applies the deadlines and limits.  A read cut by a deadline returns what it
has, which pynetdicom treats as a closed transport (Evt17).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Any, Final

logger = logging.getLogger(__name__)

#: PDU types (PS3.8 9.3): A-ASSOCIATE-RQ and P-DATA-TF.
_A_ASSOCIATE_RQ: Final[int] = 0x01
_P_DATA_TF: Final[int] = 0x04
_PDU_TYPES: Final[frozenset[int]] = frozenset(range(0x01, 0x08))
#: Largest A-ASSOCIATE-RQ accepted (a request proposing 128 contexts with many syntaxes is ~200 kB).
MAX_RQ_BYTES: Final[int] = 1024 * 1024
#: A-ABORT PDU: type 07, length 4, source 2 (service provider), reason 6 (invalid PDU parameter value).
_A_ABORT_INVALID_PARAMETER: Final[bytes] = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 2, 6)
_READ_CHUNK: Final[int] = 65536


class ConnectionGuard:
    """The deadlines and PDU limits of one connection (see the module docstring).

    Parameters
    ----------
    assoc_socket:
        pynetdicom's :class:`~pynetdicom.transport.AssociationSocket` of the connection.
    peer:
        The peer's address, for log lines.
    acse_timeout_s:
        Time from arrival to a complete A-ASSOCIATE-RQ.
    pdu_timeout_s:
        Time from a PDU's first byte to its last.
    max_pdata_bytes:
        Largest P-DATA-TF PDU length (its variable field, PS3.8 D.1); ``0`` = unlimited.
    """

    def __init__(self, assoc_socket: Any, peer: str, *, acse_timeout_s: float, pdu_timeout_s: float,
                 max_pdata_bytes: int) -> None:
        self.assoc_socket = assoc_socket
        self.peer = peer
        self.acse_timeout_s = acse_timeout_s
        self.pdu_timeout_s = pdu_timeout_s
        self.max_pdata_bytes = max_pdata_bytes
        self.arrived = time.monotonic()
        self.requested = False  # the A-ASSOCIATE-RQ has been read whole
        self._deadline: float | None = None  # of the PDU being read
        self._refused: str | None = None  # why the PDU whose header was just read is refused
        self._aborted = False
        self._timer = threading.Timer(acse_timeout_s, self._acse_expired)
        self._timer.daemon = True

    def attach(self) -> None:
        """Take over the association socket's reads and start the ACSE deadline."""
        self.assoc_socket.recv = self.recv
        self._timer.start()

    def detach(self) -> None:
        """Stop the ACSE deadline (the connection has ended)."""
        self._timer.cancel()

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` as pynetdicom's DUL asks: a 6-byte PDU header, then the PDU's body."""
        if self._aborted:  # nothing more is read from a connection the node aborted
            return bytearray()
        if self._refused is not None:  # the header said too long: abort instead of reading the body
            self._abort(self._refused)
            return bytearray()
        starting = self._deadline is None
        if starting:
            self._deadline = time.monotonic() + self.pdu_timeout_s
            if not self.requested:
                self._deadline = min(self._deadline, self.arrived + self.acse_timeout_s)
        data = self._read(nr_bytes)
        if len(data) < nr_bytes:
            self._deadline = None
            return data
        if starting and nr_bytes == 6:  # the header: its body follows under the same deadline
            pdu_type, _, length = struct.unpack(">BBL", bytes(data))
            if pdu_type not in _PDU_TYPES:  # pynetdicom stops reading here (Evt19): close it now
                self._abort(f"unknown PDU type 0x{pdu_type:02X}")
                return data
            self._refused = self._check(pdu_type, length)
            return data
        self._deadline = None  # the body is complete: the next read starts a new PDU
        if not self.requested:
            self.requested = True
            self._timer.cancel()
        return data

    def _check(self, pdu_type: int, length: int) -> str | None:
        if pdu_type == _P_DATA_TF and self.max_pdata_bytes and length > self.max_pdata_bytes:
            return (f"P-DATA-TF PDU of {length} bytes, over the {self.max_pdata_bytes} bytes the node announced "
                    "(node.max_pdu_bytes)")
        if pdu_type == _A_ASSOCIATE_RQ and length > MAX_RQ_BYTES:
            return f"A-ASSOCIATE-RQ of {length} bytes (at most {MAX_RQ_BYTES})"
        return None

    def _read(self, nr_bytes: int) -> bytearray:
        """Up to ``nr_bytes``, or fewer when the peer closes or the PDU's deadline passes."""
        raw = self.assoc_socket.socket
        data = bytearray()
        previous = raw.gettimeout() if raw is not None else None
        while len(data) < nr_bytes:
            assert self._deadline is not None
            remaining = self._deadline - time.monotonic()
            if remaining <= 0 or raw is None:
                self._expired()
                return data
            try:
                raw.settimeout(remaining)
                chunk = raw.recv(min(_READ_CHUNK, nr_bytes - len(data)))
            except TimeoutError:
                self._expired()
                return data
            except OSError:
                return data  # reset or closed by the deadline timer: pynetdicom sees a closed transport
            finally:
                try:
                    raw.settimeout(previous)
                except OSError:
                    pass
            if not chunk:
                return data
            data.extend(chunk)
        return data

    def _expired(self) -> None:
        what = "its A-ASSOCIATE-RQ" if not self.requested else "a PDU"
        limit = "node.acse_timeout_s" if not self.requested else "node.network_timeout_s"
        logger.warning("Audit: connection from %s closed: %s did not arrive whole in time (%s)", self.peer, what,
                       limit)

    def _abort(self, reason: str) -> None:
        self._aborted = True
        self._timer.cancel()
        logger.warning("Audit: connection from %s aborted (A-ABORT): %s", self.peer, reason)
        raw = self.assoc_socket.socket
        if raw is None:
            return
        try:
            raw.settimeout(2.0)
            raw.sendall(_A_ABORT_INVALID_PARAMETER)
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer has gone already

    def _acse_expired(self) -> None:
        """The ACSE deadline passed with no complete A-ASSOCIATE-RQ: close the connection."""
        if self.requested:
            return
        logger.warning("Audit: connection from %s closed: no A-ASSOCIATE-RQ within %.0f s (node.acse_timeout_s)",
                       self.peer, self.acse_timeout_s)
        raw = self.assoc_socket.socket
        try:
            if raw is not None:
                raw.shutdown(socket.SHUT_RDWR)  # wakes pynetdicom's select: it reads EOF and closes
        except OSError:
            pass


class ConnectionCaps:
    """Connections open at once, in all and per peer address; thread-safe.

    Parameters
    ----------
    total:
        ``node.max_connections``.
    per_host:
        ``node.max_connections_per_host``.
    """

    def __init__(self, total: int, per_host: int) -> None:
        self.total = total
        self.per_host = per_host
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()
        self._last_log: dict[str, float] = {}

    def admit(self, host: str) -> bool:
        """Count a new connection from ``host``, or refuse it (``False``, with an audit line)."""
        with self._lock:
            count = sum(self._open.values())
            mine = self._open.get(host, 0)
            if count < self.total and mine < self.per_host:
                self._open[host] = mine + 1
                return True
            now = time.monotonic()
            quiet = now - self._last_log.get(host, 0.0) > 60.0
            if quiet:
                self._last_log[host] = now
        if quiet:
            which = (f"{mine} open from this address (node.max_connections_per_host)" if mine >= self.per_host
                     else f"{count} open in all (node.max_connections)")
            logger.warning("Audit: DICOM connection from %s closed at once: %s", host, which)
        return False

    def release(self, host: str) -> None:
        """A connection from ``host`` that :meth:`admit` counted has closed."""
        with self._lock:
            left = self._open.get(host, 0) - 1
            if left > 0:
                self._open[host] = left
            else:
                self._open.pop(host, None)

    def forget(self, hosts: dict[str, int]) -> None:
        """Release many connections at once (those of a receiver process that died)."""
        for host, count in hosts.items():
            for _ in range(count):
                self.release(host)

    @property
    def open(self) -> int:
        """Connections counted now."""
        with self._lock:
            return sum(self._open.values())
