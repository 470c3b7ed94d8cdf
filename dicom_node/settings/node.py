"""``node:``: the node's DICOM identity, who may associate, TLS, and association limits."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator

from dicom_node.settings.base import FROZEN, AETitle, Flag, Host, Int, Port, Seconds, check_network


class PeerSettings(BaseModel):
    """One entry of ``node.allowed_peers``; a peer must match every field that is set.

    ``host`` is an IP address or CIDR network (``10.0.0.0/24``), never a host
    name: reverse DNS is not a basis for access control.
    """

    model_config = FROZEN

    ae_title: AETitle | None = None
    host: Annotated[str, AfterValidator(check_network)] | None = None

    @model_validator(mode="after")
    def _needs_one(self) -> PeerSettings:
        if self.ae_title is None and self.host is None:
            raise ValueError("an allowed peer needs ae_title, host or both (an empty entry would allow anyone)")
        return self

    def matches(self, ae_title: str, address: str) -> bool:
        """Whether a peer calling with ``ae_title`` from ``address`` fits this entry.

        Parameters
        ----------
        ae_title:
            The Calling AE Title of the association request (padding is ignored).
        address:
            The peer's IP address; an IPv4-mapped IPv6 address matches its IPv4 form.

        Returns
        -------
        bool
            ``True`` when every field set on this entry matches.
        """
        if self.ae_title is not None and ae_title.strip(" ") != self.ae_title:
            return False
        if self.host is not None:
            try:
                ip = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                return False
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if ip not in ipaddress.ip_network(self.host):
                return False
        return True


class TlsSettings(BaseModel):
    """DICOM TLS on the listening port (``node.tls``; PS3.15 Annex B secure transport).

    ``certificate`` and ``private_key`` are PEM files of the node's server
    certificate.  With ``require_client_certificate`` a peer must present a
    certificate signed by one of ``ca_certificates`` (PEM bundle), else the TLS
    handshake fails before any DICOM is exchanged.
    """

    model_config = FROZEN

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: Flag = False

    @model_validator(mode="after")
    def _ca_for_clients(self) -> TlsSettings:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates (the CA(s) that sign client certificates)")
        return self


class NodeSettings(BaseModel):
    """The node's own DICOM identity and association limits (``node:``).

    ``max_pdu_bytes`` is the largest P-DATA PDU the node accepts (it is announced
    to peers); ``131072`` (DCMTK's largest) by default: fewer PDUs per instance to
    decode than pynetdicom's 16382; ``0`` means unlimited.
    """

    model_config = FROZEN

    ae_title: AETitle = "DICOMNODE"
    host: Host = "0.0.0.0"
    port: Port = 11112
    allowed_peers: tuple[PeerSettings, ...] = ()
    # Listener processes sharing the port: "auto" = one per CPU core, at most 4.
    receivers: Annotated[Int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    max_associations: Annotated[Int, Field(ge=1, le=1000)] = 10
    # Of those, most from one IP address; None = half of max_associations (at least 1).
    max_associations_per_host: Annotated[Int, Field(ge=1, le=1000)] | None = None
    # Connections open at once (associated or not), in all and from one address; more are closed at once.
    max_connections: Annotated[Int, Field(ge=1, le=10000)] = 200
    max_connections_per_host: Annotated[Int, Field(ge=1, le=10000)] = 64
    max_pdu_bytes: Annotated[Int, Field(ge=0, le=2**32 - 1)] = 131072
    # Largest data set a C-STORE may carry (MiB); a larger one is read to its end and refused (0xA700).
    max_instance_mb: Annotated[Int, Field(ge=1, le=1024 * 1024)] = 4096
    acse_timeout_s: Seconds = 30.0
    dimse_timeout_s: Seconds = 60.0
    network_timeout_s: Seconds = 120.0
    tls: TlsSettings | None = None

    @field_validator("max_pdu_bytes")
    @classmethod
    def _pdu_size(cls, value: int) -> int:
        if 0 < value < 4096:
            raise ValueError(f"max_pdu_bytes must be 0 (unlimited) or at least 4096 (got {value})")
        return value

    @property
    def associations_per_host(self) -> int:
        """Associations one IP address may hold in each receiver process (``max_associations_per_host``)."""
        if self.max_associations_per_host is not None:
            return self.max_associations_per_host
        return max(1, self.max_associations // 2)

    def peer_allowed(self, ae_title: str, address: str) -> bool:
        """Whether a peer may associate: any entry matches, or the list is empty (accept all)."""
        return not self.allowed_peers or any(p.matches(ae_title, address) for p in self.allowed_peers)
