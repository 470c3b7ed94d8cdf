"""The DICOM listener: a pynetdicom AE accepting C-ECHO and every storage SOP class.

Access control happens when the A-ASSOCIATE-RQ has been read (``EVT_REQUESTED``),
so that every refusal is a proper A-ASSOCIATE-RJ (PS3.8 9.3.4) with a reason,
plus one ``Audit:`` log line naming the calling AE title and the address:

=====================================  ==================================================
refusal                                A-ASSOCIATE-RJ (result, source, reason)
=====================================  ==================================================
peer not in ``node.allowed_peers``     rejected-permanent, service-user, calling AE
                                       title not recognised (1, 1, 3)
called AE title is not ours            rejected-permanent, service-user, called AE title
                                       not recognised (1, 1, 7)
``node.max_associations`` reached      rejected-transient, service-provider
                                       (presentation), local limit exceeded (2, 3, 2)
=====================================  ==================================================

With ``node.tls`` the port speaks DICOM TLS only; the handshake runs in the
association's own thread (never in the accept loop, where one silent client
would block every other peer).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.errors import ConfigError
from dicom_node.receive.handlers import StoreHandler
from dicom_node.tcp import set_nodelay

logger = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 Table 9-21.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
_RJ_REASONS = {
    (0x01, 0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x01, 0x07): "called AE title not recognised",
    (0x02, 0x03, 0x02): "too many associations (node.max_associations)",
    (0x02, 0x02, 0x01): "user identity not verified",
}


class _DeferredHandshakeContext(ssl.SSLContext):
    """An SSL context whose server sockets shake hands on first read, in the association thread.

    pynetdicom wraps accepted sockets in its accept loop; with the default
    ``do_handshake_on_connect=True`` a peer that connects and sends nothing
    would block the whole listener.
    """

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_ssl_context(tls: Any) -> ssl.SSLContext:
    """Build the listener's TLS context from ``node.tls``.

    Parameters
    ----------
    tls:
        :class:`~dicom_node.settings.TlsSettings`.

    Returns
    -------
    ssl.SSLContext
        TLS 1.2 or newer, server side; client certificates required (and
        verified against ``ca_certificates``) when ``require_client_certificate``.

    Raises
    ------
    ConfigError
        A certificate, key or CA file cannot be read or does not fit.
    """
    ctx = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(Path(tls.certificate).expanduser(), Path(tls.private_key).expanduser())
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"node.tls: cannot load certificate {tls.certificate} with key {tls.private_key}: "
                          f"{exc}; give PEM files readable by the node, the key unencrypted") from None
    if tls.ca_certificates is not None:
        try:
            ctx.load_verify_locations(cafile=Path(tls.ca_certificates).expanduser())
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"node.tls.ca_certificates: cannot load {tls.ca_certificates}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _ReusePortServer(ThreadedAssociationServer):
    """A listener that shares its port with the node's other receiver processes."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class _SharedContexts(list):  # type: ignore[type-arg]
    """The listener's supported presentation contexts, shared by every association.

    pynetdicom deep-copies the server's contexts for each new association;
    for every storage SOP class times every transfer syntax that is about
    0.8 s of CPU under the GIL, which serialised concurrent senders.
    Negotiation only reads them, so each association gets a new list of the
    same context objects.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


class Receiver:
    """Owns the listening AE.

    Parameters
    ----------
    node:
        The ``node:`` settings (:class:`~dicom_node.settings.NodeSettings`):
        AE title, host, port, limits, allowed peers, TLS.
    store_handler:
        The C-STORE handler.
    on_association:
        Called for every association request that was accepted or refused,
        with ``(accepted, calling_ae_title, host, reason)`` (audit trail,
        metrics); ``reason`` is empty when accepted.  Must not raise.

    Raises
    ------
    ConfigError
        ``node.tls`` names files that cannot be loaded.
    """

    def __init__(self, node: Any, store_handler: StoreHandler,
                 on_association: Callable[[bool, str, str, str], None] | None = None) -> None:
        self.node = node
        self.on_association = on_association or (lambda accepted, ae_title, host, reason: None)
        self.ae = AE(ae_title=node.ae_title)
        self.ae.maximum_associations = node.max_associations
        self.ae.maximum_pdu_size = node.max_pdu_bytes
        self.ae.acse_timeout = node.acse_timeout_s
        self.ae.dimse_timeout = node.dimse_timeout_s
        self.ae.network_timeout = node.network_timeout_s
        self.ae.require_called_aet = True
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self.ssl_context = server_ssl_context(node.tls) if node.tls is not None else None
        self.store_handler = store_handler
        self.server: ThreadedAssociationServer | None = None

    def _on_conn_open(self, event: evt.Event) -> None:
        set_nodelay(event)

    def _on_requested(self, event: evt.Event) -> None:
        """Refuse peers not in ``node.allowed_peers`` with an A-ASSOCIATE-RJ and an audit line."""
        requestor = event.assoc.requestor
        aet = str(requestor.primitive.calling_ae_title).strip()
        host = str(requestor.address)
        if self.node.peer_allowed(aet, host):
            return
        logger.warning("Audit: association from %s@%s to %s rejected (A-ASSOCIATE-RJ: calling AE title not "
                       "recognised): this AE title from this address is not in node.allowed_peers",
                       aet, host, str(requestor.primitive.called_ae_title).strip())
        event.assoc.acse.send_reject(*REJECT_CALLING_AE)
        event.assoc.kill()
        self.on_association(False, aet, host, "AE title and host not in node.allowed_peers")

    def _on_accepted(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        logger.info("Association accepted from %s@%s%s", requestor.ae_title, requestor.address,
                    " (TLS)" if self.ssl_context is not None else "")
        self.on_association(True, str(requestor.ae_title).strip(), str(requestor.address), "")

    def _on_rejected(self, event: evt.Event) -> None:
        primitive = event.assoc.acceptor.primitive
        rsd = (primitive.result, primitive.result_source, primitive.diagnostic) if primitive is not None else None
        requested = event.assoc.requestor.primitive
        reason = _RJ_REASONS.get(rsd, f"reason {rsd}")
        logger.warning("Audit: association from %s@%s to %s rejected (A-ASSOCIATE-RJ: %s)",
                       str(requested.calling_ae_title).strip(), event.assoc.requestor.address,
                       str(requested.called_ae_title).strip(), reason)
        self.on_association(False, str(requested.calling_ae_title).strip(), str(event.assoc.requestor.address),
                            reason)

    def start(self, reuse_port: bool = False) -> tuple[str, int]:
        """Start listening without blocking; returns the bound (host, port).

        ``reuse_port`` lets several receiver processes listen on the same
        port (``SO_REUSEPORT``): the kernel spreads incoming associations
        over them.
        """
        if not self.node.allowed_peers and not reuse_port:
            logger.warning("node.allowed_peers is empty: any host and AE title may send to this node")
        handlers = [
            (evt.EVT_C_STORE, self.store_handler),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self.server = self.ae.make_server((self.node.host, self.node.port), evt_handlers=handlers,
                                          ssl_context=self.ssl_context,
                                          server_class=_ReusePortServer if reuse_port else ThreadedAssociationServer)
        self.server.contexts = _SharedContexts(self.server.contexts)
        self.ae._servers.append(self.server)  # as start_server does: shutdown() removes it from there
        threading.Thread(target=self.server.serve_forever, name="dicom-listener", daemon=True).start()
        host, port = self.server.server_address[:2]
        logger.info("Listening as %s on %s:%d%s", self.node.ae_title, host, port,
                    " (DICOM TLS)" if self.ssl_context is not None else "")
        return str(host), int(port)

    def stop(self) -> None:
        """Stop accepting associations; running associations are closed."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.ae.shutdown()
