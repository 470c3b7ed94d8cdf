"""The DICOM listener: a pynetdicom AE accepting C-ECHO and every storage SOP class."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.receive.handlers import StoreHandler, set_nodelay

logger = logging.getLogger(__name__)


class PeerPolicy:
    """``node.allowed_peers``: which calling AE titles and hosts may associate.

    An empty list accepts everyone (the node warns at start).  A peer entry
    with only ``ae_title`` accepts that title from any host; with only
    ``host`` (an address or a CIDR network) any title from that host.
    """

    def __init__(self, peers: list[Any]) -> None:
        self.peers = [(p.ae_title.strip() if p.ae_title else None,
                       ipaddress.ip_network(p.host, strict=False) if p.host else None) for p in peers]

    @property
    def open(self) -> bool:
        return not self.peers

    def host_allowed(self, host: str) -> bool:
        if self.open:
            return True
        addr = ipaddress.ip_address(host)
        return any(net is None or addr in net for _, net in self.peers)

    def allowed(self, ae_title: str, host: str) -> bool:
        if self.open:
            return True
        addr = ipaddress.ip_address(host)
        return any((aet is None or aet == ae_title.strip()) and (net is None or addr in net)
                   for aet, net in self.peers)


class Receiver:
    """Owns the listening AE.

    Parameters
    ----------
    node:
        The ``node:`` settings (AE title, host, port, limits, allowed peers).
    store_handler:
        The C-STORE handler.
    """

    def __init__(self, node: Any, store_handler: StoreHandler) -> None:
        self.node = node
        self.policy = PeerPolicy(list(node.allowed_peers))
        self.ae = AE(ae_title=node.ae_title)
        self.ae.maximum_associations = node.max_associations
        self.ae.maximum_pdu_size = node.max_pdu_bytes
        self.ae.acse_timeout = node.acse_timeout_s
        self.ae.dimse_timeout = node.dimse_timeout_s
        self.ae.network_timeout = node.network_timeout_s
        self.ae.require_called_aet = True
        titles = {aet for aet, _ in self.policy.peers}
        if titles and None not in titles:
            self.ae.require_calling_aet = sorted(t for t in titles if t)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self.store_handler = store_handler
        self.server: ThreadedAssociationServer | None = None

    def _on_conn_open(self, event: evt.Event) -> None:
        set_nodelay(event)
        host = str(event.address[0])
        if not self.policy.host_allowed(host):
            logger.warning("Audit: connection from %s refused: host not in node.allowed_peers", host)
            event.assoc.abort()

    def _on_requested(self, event: evt.Event) -> None:
        aet = str(event.assoc.requestor.primitive.calling_ae_title).strip()
        host = str(event.assoc.requestor.address)
        if self.ae.require_calling_aet and aet not in self.ae.require_calling_aet:
            return  # pynetdicom rejects it (A-ASSOCIATE-RJ, calling AE title not recognised)
        if not self.policy.allowed(aet, host):
            # A known title from a host not allowed for it: no RJ reason fits, so abort.
            logger.warning("Audit: association from %s@%s refused: not in node.allowed_peers", aet, host)
            event.assoc.abort()

    def _on_accepted(self, event: evt.Event) -> None:
        logger.info("Association accepted from %s@%s", event.assoc.requestor.ae_title,
                    event.assoc.requestor.address)

    def _on_rejected(self, event: evt.Event) -> None:
        logger.warning("Audit: association from %s@%s rejected (calling/called AE title not recognised "
                       "or too many associations)", event.assoc.requestor.ae_title,
                       event.assoc.requestor.address)

    def start(self) -> tuple[str, int]:
        """Start listening without blocking; returns the bound (host, port)."""
        if self.policy.open:
            logger.warning("node.allowed_peers is empty: any host and AE title may send to this node")
        handlers = [
            (evt.EVT_C_STORE, self.store_handler),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self.server = self.ae.start_server((self.node.host, self.node.port), block=False,
                                           evt_handlers=handlers)
        host, port = self.server.server_address[:2]
        logger.info("Listening as %s on %s:%d", self.node.ae_title, host, port)
        return str(host), int(port)

    def stop(self) -> None:
        """Stop accepting associations; running associations are closed."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.ae.shutdown()
