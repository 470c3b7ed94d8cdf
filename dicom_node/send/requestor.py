"""Associations the node requests (SEND, C-FIND completion, C-ECHO): each response kept for the call awaiting it.

pynetdicom's association thread keeps polling its DIMSE provider for incoming
requests (``get_msg(block=False)``) while a ``send_c_store`` / ``send_c_find``
/ ``send_c_echo`` call waits for its response (``get_msg(block=True)``).  The
call pauses that poll around each request, but the pause leaves a window: the
poll may already be past its checkpoint when the call sees it "paused" and
sends; if the response arrives before the poll reads the queue (a fast peer on
a loaded machine), the poll takes it, logs "Received unexpected C-STORE service
message", drops it, and the call waits out its DIMSE timeout (30 s) before the
association is aborted and the SEND job retried, sending again what was stored
(pynetdicom issue #875 reports it for C-FIND; a fresh-clone run of this suite
hit it for C-STORE, under load: 33 objects received for 31 sent).

:class:`RequestorDimseProvider` (a subclass of pynetdicom's documented DIMSE
provider, overriding its documented ``send_msg`` and ``get_msg``) remembers the
Message ID of every request sent over its association; a non-blocking poll
then leaves a response to one of them in the queue, for the call that waits for
it.  Anything else (a request from the peer, a response to nothing we asked)
is handed to the poll as before.  :func:`requestor_handlers` installs it, with
``TCP_NODELAY``, when the connection opens (before any DIMSE message).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider

from dicom_node.tcp import set_nodelay


class RequestorDimseProvider(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider whose non-blocking ``get_msg`` never takes a response to our own request."""

    def __init__(self, assoc: Any) -> None:
        super().__init__(assoc)
        self._lock = threading.Lock()
        self._requests: set[int] = set()  # Message IDs of the requests sent over this association

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if getattr(primitive, "MessageIDBeingRespondedTo", None) is None:
            message_id = getattr(primitive, "MessageID", None)
            if message_id is not None:
                with self._lock:
                    self._requests.add(int(message_id))
        super().send_msg(primitive, context_id)

    def get_msg(self, block: bool = False) -> Any:
        if not block:
            with self.msg_queue.mutex:
                head = self.msg_queue.queue[0] if self.msg_queue.queue else None
            if head is not None and self._answers_our_request(head[1]):
                return None, None  # the sending call's: it takes it with its blocking get_msg
        return super().get_msg(block)

    def _answers_our_request(self, primitive: Any) -> bool:
        responded_to = getattr(primitive, "MessageIDBeingRespondedTo", None)
        if responded_to is None:
            return False
        with self._lock:
            return int(responded_to) in self._requests


def _connection_opened(event: Any) -> None:
    set_nodelay(event)
    event.assoc.dimse = RequestorDimseProvider(event.assoc)  # no DIMSE message yet: nothing holds the one replaced


def requestor_handlers() -> list[tuple[evt.NotificationEvent | evt.InterventionEvent, Callable[..., Any]]
                                 | tuple[evt.NotificationEvent | evt.InterventionEvent, Callable[..., Any], list[Any]]]:
    """``evt_handlers`` for ``AE.associate``: ``TCP_NODELAY`` and :class:`RequestorDimseProvider` on connection."""
    return [(evt.EVT_CONN_OPEN, _connection_opened)]


def configure_timeouts(ae: Any, timeout_s: float) -> None:
    """Every timeout of a requesting AE: the TCP connection (without it a peer that drops packets holds the caller
    for the kernel's SYN retries, over two minutes), the association's negotiation, each DIMSE message, idle."""
    ae.connection_timeout = timeout_s
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
