"""Socket options shared by the receiving and the sending side."""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any

from pynetdicom.transport import AssociationSocket

from dicom_node.errors import StartupError

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
    AssociationSocket._shutdown_socket = _shutdown_then_close  # type: ignore[method-assign]


close_sockets_reliably()


def listen_error(section: str, host: str, port: int, exc: OSError) -> StartupError:
    """The one-line start-up error for a listening socket that could not be opened.

    Parameters
    ----------
    section:
        The configuration section that sets ``host`` and ``port`` (``node`` or ``http``).
    host, port:
        What was asked for.
    exc:
        The error of ``bind()``/``listen()`` (or of the name lookup).

    Returns
    -------
    StartupError
        Its message starts with the key to change (``node.port``, ``http.host``...).
    """
    code = exc.errno
    if code == errno.EADDRINUSE:
        return StartupError(f"{section}.port: {host}:{port} is already in use by another process: "
                            f"stop that process or choose another {section}.port")
    if code == errno.EACCES:
        return StartupError(f"{section}.port: not permitted to listen on port {port}: ports below 1024 "
                            "need root or CAP_NET_BIND_SERVICE (AmbientCapabilities= in the systemd unit); "
                            f"or choose a {section}.port above 1023")
    if code == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return StartupError(f"{section}.host: {host} is not an address of this machine: use 0.0.0.0 "
                            f"(every interface), 127.0.0.1 or one of this machine's addresses as {section}.host")
    return StartupError(f"{section}.port: cannot listen on {host}:{port}: {exc.strerror or exc}")
