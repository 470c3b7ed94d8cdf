"""One base exception for the node; messages say what to do.

``retryable`` tells the scheduler whether the same job may succeed later
(a PACS that is down) or never will (a series that is not a volume).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class DicomNodeError(Exception):
    """Base of every error the node raises on purpose."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class ConfigError(DicomNodeError):
    """The configuration is invalid; the message names the key (and line) and the reason."""


class InvalidUIDError(DicomNodeError):
    """A UID is empty, too long or not DICOM UID syntax; nothing is built from it."""


class ImagingError(DicomNodeError):
    """A series cannot be turned into one volume (not a volume, gaps, mixed orientations...)."""


class ModelError(DicomNodeError):
    """A model failed on a job; the job fails, the node carries on."""


class SendError(DicomNodeError):
    """A result could not be delivered; ``retryable`` says whether to try again.

    ``stored``: the files the destination confirmed storing before the
    failure (a retry need not send them again).
    """

    def __init__(self, message: str, *, retryable: bool | None = None, stored: Sequence[Path] = ()) -> None:
        super().__init__(message, retryable=retryable)
        self.stored: tuple[Path, ...] = tuple(stored)


class ResultError(DicomNodeError):
    """A result object could not be encoded."""


class StartupError(DicomNodeError):
    """The node cannot start; the message is one line that begins with the key to change.

    Example: ``http.port: 127.0.0.1:8080 is in use by another process: stop it or
    choose another http.port``.  The CLI prints it as it is and exits with 2.
    """


class JobInterrupted(DicomNodeError):
    """The machine or process running the job's model was lost mid-job: the job is queued again (bounded)."""

