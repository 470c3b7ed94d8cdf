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
the calling address holds              the same (2, 3, 2)
``node.max_associations_per_host``
=====================================  ==================================================

The per-address cap (half of ``node.max_associations`` unless set) keeps
slots for other peers whatever one address does: a peer that keeps its
associations open, sending a PDU now and then within
``node.network_timeout_s``, holds at most that many slots of each receiver
process.

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
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_node.domain import VERIFICATION_SOP_CLASS
from dicom_node.errors import StartupError
from dicom_node.receive import wakeups
from dicom_node.receive.dataset_buffer import IntakeLimits
from dicom_node.receive.guard import ConnectionCaps, ConnectionGuard
from dicom_node.receive.handlers import StoreHandler
from dicom_node.receive.store_dimse import StoreDimseProvider
from dicom_node.settings import NodeSettings, TlsSettings
from dicom_node.tcp import listen_error, set_nodelay

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


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
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
    StartupError
        A certificate, key or CA file cannot be read or does not fit; the
        message names the key (``node.tls.certificate``...).
    """
    for key in ("certificate", "private_key", "ca_certificates"):
        path = getattr(tls, key)
        if path is None:
            continue
        try:
            Path(path).expanduser().open("rb").close()
        except OSError as exc:
            raise StartupError(f"node.tls.{key}: cannot read {path}: {exc.strerror}: give a PEM file the "
                               "node's user can read") from None
    ctx = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(Path(tls.certificate).expanduser(), Path(tls.private_key).expanduser())
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"node.tls.certificate: cannot load {tls.certificate} with node.tls.private_key "
                           f"{tls.private_key}: {exc}; give the PEM certificate and its unencrypted key") from None
    if tls.ca_certificates is not None:
        try:
            ctx.load_verify_locations(cafile=Path(tls.ca_certificates).expanduser())
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"node.tls.ca_certificates: cannot load {tls.ca_certificates}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _JoiningRequestHandler(RequestHandler):
    """Runs one association under a :class:`~dicom_node.receive.guard.ConnectionGuard`; returns when it has ended.

    pynetdicom's handler returns once the association thread started; this
    one joins it, so the server knows when each connection is over (caps,
    the receiver pool's counts).  The server's ``node`` gives the deadlines.
    Its DIMSE provider is a :class:`~dicom_node.receive.store_dimse.StoreDimseProvider`; its threads are
    woken rather than polling (:mod:`dicom_node.receive.wakeups`).
    """

    def handle(self) -> None:
        assoc = self._create_association()
        provider = assoc.dimse = StoreDimseProvider(assoc, self.server.limits)  # type: ignore[attr-defined]
        # (before the association starts: nothing holds the provider it replaces, nor the queues install replaces)
        bell = wakeups.install(assoc, provider)
        node: NodeSettings = self.server.node  # type: ignore[attr-defined]
        guard = ConnectionGuard(assoc.dul.socket, str(self.client_address[0]), acse_timeout_s=node.acse_timeout_s,
                                pdu_timeout_s=node.network_timeout_s, max_pdata_bytes=node.max_pdu_bytes)
        guard.attach()
        try:
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()
        finally:
            guard.detach()
            if assoc.dul.ident is not None:  # started (a failed TLS handshake never starts it)
                assoc.dul.join(1.0)  # stopped with the association: nothing writes to a data set being gathered now
            if not assoc.dul.is_alive():
                provider.discard()  # (else its spill file, if any, goes at the next start: Spool.clean_tmp)
                bell.close()  # (else when collected)


class _ListeningServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the node's handler and connection caps (``node.receivers: 1``)."""

    daemon_threads = True

    def __init__(self, ae: AE, address: tuple[str, int], ae_title: str, contexts: list[Any],
                 ssl_context: ssl.SSLContext | None = None, evt_handlers: list[Any] | None = None, *,
                 node: NodeSettings, limits: IntakeLimits) -> None:
        self.node, self.limits = node, limits
        self.caps = ConnectionCaps(node.max_connections, node.max_connections_per_host)
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers,
                         request_handler=_JoiningRequestHandler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.caps.admit(str(client_address[0]))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.caps.release(str(client_address[0]))


class _HandedServer(ThreadedAssociationServer):
    """Serves connections another process accepted and handed over; it has no socket of its own.

    ``server_address`` is the address the connections were accepted on.
    ``on_finished`` is called once for every handed connection, when its
    association (or failed attempt at one) has ended.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, ae: AE, address: tuple[str, int], ae_title: str, contexts: list[Any],
                 ssl_context: ssl.SSLContext | None = None, evt_handlers: list[Any] | None = None, *,
                 on_finished: Callable[[str], None], node: NodeSettings, limits: IntakeLimits) -> None:
        self.on_finished = on_finished
        self.node, self.limits = node, limits
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers,
                         request_handler=_JoiningRequestHandler)

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.on_finished(str(client_address[0]))

    def shutdown(self) -> None:
        """Stop: nothing listens here, so there is no accept loop to wait for."""
        self.server_close()
        if self in self.ae._servers:
            self.ae._servers.remove(self)


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

    def __init__(self, node: NodeSettings, store_handler: StoreHandler,
                 on_association: Callable[[bool, str, str, str], None] | None = None) -> None:
        self.node = node
        self.on_association = on_association or (lambda accepted, ae_title, host, reason: None)
        self.ae = AE(ae_title=node.ae_title)
        # pynetdicom counts every connection, associated or not; the node counts associations
        # itself (_on_requested) and caps connections (ConnectionCaps), so half-open ones hold no slot.
        self.ae.maximum_associations = node.max_connections
        self._associations: dict[int, str] = {}  # association -> its peer's address
        self._associations_lock = threading.Lock()
        self.ae.maximum_pdu_size = node.max_pdu_bytes
        self.ae.acse_timeout = node.acse_timeout_s
        self.ae.dimse_timeout = node.dimse_timeout_s
        self.ae.network_timeout = node.network_timeout_s
        self.ae.require_called_aet = True
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(VERIFICATION_SOP_CLASS)
        self.ssl_context = server_ssl_context(node.tls) if node.tls is not None else None
        self.store_handler = store_handler
        self.limits = store_handler.intake_limits(node.max_instance_mb * 1024 * 1024)
        self.server: ThreadedAssociationServer | None = None

    def _on_conn_open(self, event: evt.Event) -> None:
        set_nodelay(event)

    def _on_conn_close(self, event: evt.Event) -> None:
        with self._associations_lock:
            self._associations.pop(id(event.assoc), None)
        self.store_handler.closed(event)

    def _on_requested(self, event: evt.Event) -> None:
        """Refuse peers not in ``node.allowed_peers`` with an A-ASSOCIATE-RJ and an audit line."""
        requestor = event.assoc.requestor
        primitive = requestor.primitive
        if primitive is None:  # EVT_REQUESTED always carries the A-ASSOCIATE-RQ
            return
        aet = str(primitive.calling_ae_title).strip()
        host = str(requestor.address)
        if self.node.peer_allowed(aet, host):
            per_host = self.node.associations_per_host
            with self._associations_lock:
                full = len(self._associations) >= self.node.max_associations
                hogging = sum(1 for address in self._associations.values() if address == host) >= per_host
                if not full and not hogging:
                    self._associations[id(event.assoc)] = host
            if not full and not hogging:
                return
            if full:
                logger.warning("Audit: association from %s@%s rejected (A-ASSOCIATE-RJ: local limit exceeded): "
                               "%d associations running (node.max_associations)", aet, host,
                               self.node.max_associations)
                reason = _RJ_REASONS[(0x02, 0x03, 0x02)]
            else:
                logger.warning("Audit: association from %s@%s rejected (A-ASSOCIATE-RJ: local limit exceeded): "
                               "%d associations from this address running (node.max_associations_per_host)",
                               aet, host, per_host)
                reason = "too many associations from this address (node.max_associations_per_host)"
            event.assoc.acse.send_reject(0x02, 0x03, 0x02)
            event.assoc.kill()
            self.on_association(False, aet, host, reason)
            return
        logger.warning("Audit: association from %s@%s to %s rejected (A-ASSOCIATE-RJ: calling AE title not "
                       "recognised): this AE title from this address is not in node.allowed_peers",
                       aet, host, str(primitive.called_ae_title).strip())
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
        requested = event.assoc.requestor.primitive
        if primitive is None or requested is None:
            return
        rsd = (primitive.result, primitive.result_source, primitive.diagnostic)
        reason = _RJ_REASONS.get(rsd, f"reason {rsd}")  # type: ignore[arg-type]  # None parts: not in the table
        logger.warning("Audit: association from %s@%s to %s rejected (A-ASSOCIATE-RJ: %s)",
                       str(requested.calling_ae_title).strip(), event.assoc.requestor.address,
                       str(requested.called_ae_title).strip(), reason)
        self.on_association(False, str(requested.calling_ae_title).strip(), str(event.assoc.requestor.address),
                            reason)

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_C_STORE, self.store_handler),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self.store_handler.released),
        ]

    def start(self) -> tuple[str, int]:
        """Listen on ``node.host``:``node.port`` without blocking; returns the bound (host, port)."""
        if not self.node.allowed_peers:
            logger.warning("node.allowed_peers is empty: any host and AE title may send to this node")
        try:
            self.server = self.ae.make_server((self.node.host, self.node.port), evt_handlers=self._handlers(),
                                              ssl_context=self.ssl_context, server_class=_ListeningServer,
                                              node=self.node, limits=self.limits)  # type: ignore[arg-type]
        except OSError as exc:
            raise listen_error("node", self.node.host, self.node.port, exc) from None
        self.server.contexts = _SharedContexts(self.server.contexts)
        self.ae._servers.append(self.server)  # as start_server does: shutdown() removes it from there
        threading.Thread(target=self.server.serve_forever, name="dicom-listener", daemon=True).start()
        host, port = self.server.server_address[:2]
        logger.info("Listening as %s on %s:%d%s", self.node.ae_title, host, port,
                    " (DICOM TLS)" if self.ssl_context is not None else "")
        return str(host), int(port)

    def start_handed(self, address: tuple[str, int], on_finished: Callable[[str], None]) -> None:
        """Serve connections accepted elsewhere (:meth:`serve_connection`) instead of listening.

        Parameters
        ----------
        address:
            The (host, port) the connections are accepted on.
        on_finished:
            Called when a handed connection's association has ended.
        """
        self.server = self.ae.make_server(
            address, evt_handlers=self._handlers(), ssl_context=self.ssl_context,
            server_class=_HandedServer, on_finished=on_finished, node=self.node,
            limits=self.limits)  # type: ignore[arg-type]
        self.server.contexts = _SharedContexts(self.server.contexts)
        logger.info("Serving as %s connections accepted on %s:%d%s", self.node.ae_title, *address,
                    " (DICOM TLS)" if self.ssl_context is not None else "")

    def serve_connection(self, sock: socket.socket, host: str) -> None:
        """Run an association on a connection accepted elsewhere (from ``host``), in its own thread."""
        assert isinstance(self.server, _HandedServer), "start_handed() first"
        sock.setblocking(True)
        try:
            address = sock.getpeername()
            request = self.ssl_context.wrap_socket(sock, server_side=True) if self.ssl_context else sock
        except OSError as exc:  # the peer has already gone
            logger.info("Handed connection closed before its association started: %s", exc)
            sock.close()
            self.server.on_finished(host)
            return
        self.server.process_request(request, address)

    def stop(self) -> None:
        """Stop accepting associations; running associations are closed."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        for assoc in self.ae.active_associations:
            # A connection that never sent its A-ASSOCIATE-RQ (a port probe, a load balancer's check): there is
            # no association to abort (A-ABORT is not a valid event before it); closing the transport ends it.
            if assoc.dul.state_machine.current_state == "Sta2" and assoc.dul.socket is not None:
                assoc.dul.socket.close()
        self.ae.shutdown()
