"""C-STORE SCU: deliver result objects to a DICOM destination.

Every C-STORE status is mapped to what the outbox should do:

===================  ============================================
``0x0000``           sent
``0xB000-0xBFFF``    sent with a warning (logged)
``0xA700-0xA7FF``    destination out of resources: retry later
association failure  destination unreachable / busy: retry later
anything else        refused (e.g. ``0xA900``, ``0xC000``): permanent
===================  ============================================
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from dicom_node.errors import SendError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendReport:
    sent: int
    warnings: tuple[str, ...] = ()


def _nodelay(event: evt.Event) -> None:
    sock: Any = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def send_files(files: Sequence[Path], *, ae_title: str, host: str, port: int, calling_ae_title: str,
               timeout_s: float = 30.0) -> SendReport:
    """Send ``files`` over one association.

    Raises
    ------
    SendError
        ``retryable=True`` when the destination is unreachable, rejects the
        association or is out of resources; ``retryable=False`` when it
        refuses an object (the reason names the status).
    """
    datasets = [dcmread(f) for f in files]
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        syntaxes = sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets if ds.SOPClassUID == sop_class}
                          | {ExplicitVRLittleEndian, ImplicitVRLittleEndian})
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "is unreachable or aborted"
        raise SendError(f"destination {ae_title}@{host}:{port} {why}", retryable=True)
    warnings: list[str] = []
    sent = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(status.Status) if "Status" in status else None
            if code is None:
                raise SendError(f"no C-STORE response from {ae_title} (connection lost or timeout)",
                                retryable=True)
            if code == 0x0000:
                sent += 1
            elif 0xB000 <= code <= 0xBFFF:
                sent += 1
                warnings.append(f"0x{code:04X}")
                logger.warning("C-STORE of %s to %s: warning status 0x%04X", ds.SOPInstanceUID, ae_title, code)
            elif 0xA700 <= code <= 0xA7FF:
                raise SendError(f"{ae_title} is out of resources (0x{code:04X})", retryable=True)
            else:
                comment = str(status.get("ErrorComment", "")).strip()
                raise SendError(f"{ae_title} refused {ds.SOPClassUID.name} with status 0x{code:04X}"
                                + (f" ({comment})" if comment else ""), retryable=False)
    finally:
        if assoc.is_established:
            assoc.release()
    return SendReport(sent=sent, warnings=tuple(warnings))


def echo(*, ae_title: str, host: str, port: int, calling_ae_title: str, timeout_s: float = 10.0) -> int | None:
    """C-ECHO a peer; returns the status, or ``None`` when no association could be made."""
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()
