"""systemd integration: readiness and watchdog notifications (``Type=notify``, ``WatchdogSec``).

Plain datagrams to ``$NOTIFY_SOCKET`` (sd_notify(3)); outside systemd every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)


def sd_notify(state: str) -> bool:
    """Send ``state`` to systemd's ``NOTIFY_SOCKET`` (``Type=notify``); ``False`` when not under systemd."""

    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.connect(address)
            sock.send(state.encode())  # never blocks the caller, even if the manager does not read
        return True
    except OSError as exc:
        logger.log(logging.DEBUG if state.startswith("WATCHDOG") else logging.WARNING,
                   "sd_notify %s failed: %s", state.split("=", 1)[0], exc)
        return False


def watchdog_interval() -> float | None:
    """Half of systemd's ``WatchdogSec`` when it asks this process for keep-alives."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.5, int(usec) / 2e6)
    except ValueError:
        return None
