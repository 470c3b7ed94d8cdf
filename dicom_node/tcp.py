"""Socket options shared by the receiving and the sending side."""

from __future__ import annotations

import logging
import socket
from typing import Any

logger = logging.getLogger(__name__)


def set_nodelay(event: Any) -> None:
    """``EVT_CONN_OPEN`` handler: disable Nagle so small PDUs are not held back by delayed ACKs."""
    sock: Any = getattr(event.assoc.dul.socket, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        logger.debug("TCP_NODELAY not set on a closed socket")


def _shutdown_then_close(self: Any) -> None:
    """Replacement for pynetdicom's ``AssociationSocket._shutdown_socket`` that always closes.

    pynetdicom 3 calls ``shutdown()`` and ``close()`` in one ``try``: when the
    peer has already reset the connection, ``shutdown()`` raises ``ENOTCONN``
    and the descriptor is left open until the garbage collector finds it.  A
    node that runs for years must not leak a descriptor per vanished peer.
    """
    sock = self.socket
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected any more: closing is all that is left to do
    try:
        sock.close()
    except OSError:
        pass


def close_sockets_reliably() -> None:
    """Make every pynetdicom association close its socket even when the peer vanished (idempotent)."""
    from pynetdicom.transport import AssociationSocket

    AssociationSocket._shutdown_socket = _shutdown_then_close  # type: ignore[method-assign]


close_sockets_reliably()
