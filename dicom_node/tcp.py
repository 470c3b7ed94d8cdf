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
