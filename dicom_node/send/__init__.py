"""Delivery of result objects to destinations: C-STORE (:mod:`.dimse`) or STOW-RS (:mod:`.dicomweb`).

:func:`dicom_node.send.deliver.deliver` picks the transport from the
destination's ``type``; :mod:`.health` probes destinations for the outbox.
Every transport raises :class:`~dicom_node.errors.SendError` with
``retryable`` telling the outbox whether a later attempt may succeed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SendReport:
    """What one delivery attempt achieved.

    Attributes
    ----------
    sent:
        Objects the destination accepted (with or without a warning).
    warnings:
        Warning statuses or reasons, one per object stored with a warning.
    transcoded:
        Objects that were decompressed to Explicit VR Little Endian because
        the destination accepted no transfer syntax they were encoded in.
    refused:
        SOP Class UIDs the destination accepted no presentation context for,
        whose objects were not sent (only with ``skip_refused=True``).
    """

    sent: int
    warnings: tuple[str, ...] = ()
    transcoded: int = 0
    refused: tuple[str, ...] = ()


__all__ = ["SendReport"]
