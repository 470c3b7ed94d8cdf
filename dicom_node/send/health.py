"""Destination health: is a destination answering again?

The outbox probes only destinations that have SEND jobs waiting for a retry
(:meth:`dicom_node.scheduler.service.Pipeline.check_destinations`); when a
probe succeeds their jobs become due at once, so a PACS back from maintenance
gets its backlog without waiting for the next backoff step.
"""

from __future__ import annotations

import logging
from typing import Any

from dicom_node.send.dicomweb import http_probe
from dicom_node.send.dimse import echo

logger = logging.getLogger(__name__)

__all__ = ["probe"]


def probe(destination: Any, node_ae_title: str) -> str:
    """Probe a destination once.

    Parameters
    ----------
    destination:
        A DIMSE destination (C-ECHO, success = status ``0x0000``) or a DICOMweb
        destination (HTTP ``GET`` of its URL, success = any status below 500).
    node_ae_title:
        The node's AE title (Calling AE Title unless the destination sets one).

    Returns
    -------
    str
        ``""`` when the destination answered, else a short reason.
    """
    if destination.type == "dicomweb":
        return http_probe(destination)
    status = echo(ae_title=destination.ae_title, host=destination.host, port=destination.port,
                  calling_ae_title=destination.resolve_calling_ae(node_ae_title),
                  timeout_s=min(destination.timeout_s, 10.0))
    reason = "no association" if status is None else "" if status == 0x0000 else f"C-ECHO status 0x{status:04X}"
    logger.debug("Destination %s:%d probed: %s", destination.host, destination.port, reason or "answers")
    return reason
