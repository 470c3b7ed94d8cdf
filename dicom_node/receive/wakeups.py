"""An association's two pynetdicom threads woken by what they wait for, instead of polling every millisecond.

pynetdicom runs each association on two threads that poll: the DUL's reactor
checks its socket without waiting (``select`` with timeout 0) and, when there
was nothing, sleeps 1 ms (``DULServiceProvider._run_loop_delay``); the
association's reactor sleeps 1 ms, then looks for a DIMSE message, a release
or an abort.  Each idle association costs about 2000 wake-ups a second (5 %
of a core measured here); with four senders on two cores, those wake-ups and
the GIL switches they force were a tenth of the receiver's CPU, and the DUL's
sleep was up to 1 ms of latency before each request was read.

Here each thread waits on what can wake it, at most :data:`WAIT_S`:

* :class:`WakingAssociationSocket` (pynetdicom's documented
  :class:`~pynetdicom.transport.AssociationSocket`, its documented ``ready``
  property) first checks as pynetdicom does (closed transport, data in a TLS
  buffer); when nothing is there and the DUL has no event left to act on, it
  waits in ``select`` for the socket or a :class:`Doorbell` rung when another
  thread queues a primitive for the DUL to send (``to_provider_queue``) or an
  event for its state machine (``event_queue``).
* :meth:`StoreDimseProvider.get_msg <dicom_node.receive.store_dimse.StoreDimseProvider.get_msg>`
  (called by the association's reactor without blocking) waits, when no
  message or primitive is queued for it, for one to be (``msg_queue``,
  ``to_user_queue``: a request pynetdicom serves, a release, an abort).

The queues are pynetdicom's documented attributes, each replaced before the
association starts by a :class:`SignalingQueue` holding what it held.  What
nothing rings for (the DUL thread ended by an exception, an ARTIM or idle
timer expiring, a ``kill()`` from another thread) is seen within
:data:`WAIT_S`, as before within 1 ms: the association's timeouts are
seconds.  A C-STORE the node serves itself never involves the association's
thread (see :mod:`dicom_node.receive.store_dimse`): its response is sent by
the DUL's thread at its next turn.
"""

from __future__ import annotations

import os
import queue
import select
import threading
import weakref
from collections.abc import Callable
from typing import Any, Final

from pynetdicom.transport import AssociationSocket

#: Longest wait of either thread for what nothing rings for (a timer, a thread ended by an exception).
WAIT_S: Final[float] = 0.02


class Doorbell:
    """A pipe whose read end ``select`` can wait on beside a socket; :meth:`ring` makes it readable.

    Its descriptors are closed by :meth:`close`, or when it is collected.
    """

    def __init__(self) -> None:
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_fds, self.fd, self._write_fd)

    def ring(self) -> None:
        """Make :attr:`fd` readable (once rung, further rings before :meth:`clear` add nothing)."""
        if self._closed:
            return
        try:
            os.write(self._write_fd, b"\0")
        except (BlockingIOError, OSError):  # full: already rung; closed: nobody waits
            pass

    def clear(self) -> None:
        """Forget the rings so far."""
        try:
            while os.read(self.fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        self._closed = True
        self._finalizer()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class SignalingQueue(queue.Queue):  # type: ignore[type-arg]
    """A :class:`queue.Queue` that calls ``on_put`` after each item is put (from the putting thread)."""

    def __init__(self, on_put: Callable[[], None], items: queue.Queue | None = None) -> None:  # type: ignore[type-arg]
        super().__init__()
        self.on_put = on_put
        if items is not None:
            while True:
                try:
                    self.queue.append(items.get_nowait())
                except queue.Empty:
                    break

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.on_put()


class WakingAssociationSocket(AssociationSocket):
    """pynetdicom's association socket whose ``ready`` waits for data or the :class:`Doorbell` (module docstring).

    Made from pynetdicom's socket by :func:`install` (the class of that
    object changed: pynetdicom creates it and queues its first event before
    the node sees the association).
    """

    bell: Doorbell

    @property
    def ready(self) -> bool:
        if AssociationSocket.ready.fget(self):  # type: ignore[attr-defined]  # pynetdicom's own check first
            return True
        sock = self.socket
        if sock is None or not self.event_queue.empty():
            return False  # closed, or the DUL has an event to act on before reading more
        try:
            fd = sock.fileno()
            readable, _, _ = select.select([fd, self.bell.fd], [], [], WAIT_S)
        except (OSError, ValueError):  # closed meanwhile: pynetdicom's check reports it at the next turn
            return False
        if self.bell.fd in readable:
            self.bell.clear()  # the DUL now looks at its queues before it reads from the socket again
        return fd in readable


def install(assoc: Any, provider: Any) -> Doorbell:
    """Wire an acceptor association (not started yet) and its DIMSE provider for waking (module docstring).

    ``provider`` has a ``work`` :class:`threading.Event`, set when a message
    or primitive is queued for the association's thread, and waits on it
    once ``provider.waking`` is true.  Returns the DUL's doorbell, to
    :meth:`~Doorbell.close` once the association's DUL thread has stopped
    (not before: a closed descriptor's number is soon another file's).
    """
    dul = assoc.dul
    bell = Doorbell()
    sock = dul.socket
    sock.__class__ = WakingAssociationSocket
    sock.bell = bell

    def ring_from_elsewhere() -> None:
        if threading.current_thread() is not dul:  # the DUL's own thread checks its queues before waiting
            bell.ring()

    dul.to_provider_queue = SignalingQueue(ring_from_elsewhere, dul.to_provider_queue)
    dul.event_queue = SignalingQueue(ring_from_elsewhere, dul.event_queue)
    dul.to_user_queue = SignalingQueue(provider.work.set, dul.to_user_queue)
    provider.msg_queue = SignalingQueue(provider.work.set, provider.msg_queue)
    provider.waking = True
    return bell
