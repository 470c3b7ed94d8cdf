"""One entry point for the outbox: deliver a job's files to a configured destination."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicom_node.send import SendReport
from dicom_node.send.dicomweb import stow_files
from dicom_node.send.dimse import send_files

__all__ = ["deliver"]


def deliver(files: Sequence[Path], destination: Any, node_ae_title: str, *,
            skip_refused: bool = False) -> SendReport:
    """Send ``files`` to ``destination`` with the transport its ``type`` names.

    Parameters
    ----------
    files:
        DICOM Part 10 files (one job's objects).
    destination:
        A :class:`~dicom_node.settings.DimseDestination` (C-STORE, one
        association, or up to its ``associations`` for many files) or :class:`~dicom_node.settings.DicomwebDestination` (STOW-RS).
    node_ae_title:
        The node's AE title, the Calling AE Title unless the destination sets one.
    skip_refused:
        C-STORE only: skip objects whose SOP class the destination refused in
        association negotiation and report them (``SendReport.refused``).

    Returns
    -------
    SendReport
        What the destination stored.

    Raises
    ------
    SendError
        As :func:`dicom_node.send.dimse.send_files` or
        :func:`dicom_node.send.dicomweb.stow_files`.
    """
    if destination.type == "dicomweb":
        return stow_files(files, destination)
    return send_files(files, ae_title=destination.ae_title, host=destination.host, port=destination.port,
                      calling_ae_title=destination.resolve_calling_ae(node_ae_title),
                      timeout_s=destination.timeout_s, skip_refused=skip_refused,
                      associations=destination.associations)
