"""Socket handling shared by receiving and sending."""

from __future__ import annotations

import errno
import socket
import types

from pynetdicom.transport import AssociationSocket

import dicom_node.tcp  # noqa: F401  (installs the reliable close)


class _VanishedPeer:
    """A connected socket whose peer has reset the connection: shutdown() fails."""

    def __init__(self) -> None:
        self.closed = False

    def shutdown(self, how: int) -> None:
        assert how == socket.SHUT_RDWR
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    def close(self) -> None:
        self.closed = True


def test_an_association_socket_is_closed_even_when_its_peer_vanished() -> None:
    holder = types.SimpleNamespace(socket=_VanishedPeer())
    AssociationSocket._shutdown_socket(holder)  # type: ignore[arg-type]
    assert holder.socket.closed  # pynetdicom's own version leaves the descriptor open here


def test_a_real_socket_whose_peer_is_gone_is_closed() -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    holder = types.SimpleNamespace(socket=ours)
    AssociationSocket._shutdown_socket(holder)  # type: ignore[arg-type]
    assert ours.fileno() == -1
