"""``storage:`` (where state lives) and ``completion:`` (when a series is complete)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, field_validator, model_validator

from dicom_node.settings.base import FROZEN, AETitle, Flag, Float, Host, Int, Port, Seconds, no_duplicates


class StorageSettings(BaseModel):
    """Where state lives (``storage:``): the spool and the SQLite database under ``path``."""

    model_config = FROZEN

    path: Path = Path("./var")
    min_free_mb: Annotated[Int, Field(ge=0)] = 2048
    retention_hours: Annotated[Float, Field(gt=0)] = 72.0
    # Below this much free space, finished work is removed before retention_hours
    # (oldest first); None = twice min_free_mb.
    cleanup_free_mb: Annotated[Int, Field(ge=0)] | None = None
    cleanup_interval_s: Seconds = 300.0
    # A database write waits at most this long (another process holding the database): then a
    # C-STORE is answered 0xA700 rather than keeping the sender waiting.  Keep it below senders' timeouts.
    database_busy_timeout_s: Annotated[Float, Field(gt=0, le=600)] = 10.0

    @model_validator(mode="after")
    def _cleanup_above_intake(self) -> StorageSettings:
        if self.cleanup_free_mb is not None and self.cleanup_free_mb < self.min_free_mb:
            raise ValueError(f"cleanup_free_mb ({self.cleanup_free_mb}) must be >= min_free_mb "
                             f"({self.min_free_mb}): clean up before intake stops")
        return self

    def cleanup_threshold_mb(self) -> int:
        """Free MiB below which finished work is removed early."""
        return self.cleanup_free_mb if self.cleanup_free_mb is not None else 2 * self.min_free_mb

    def resolved_path(self) -> Path:
        """``path`` with ``~`` expanded, made absolute against the current working directory."""
        return self.path.expanduser().resolve()


class CFindPeerSettings(BaseModel):
    """A sending PACS that the node asks by C-FIND how many instances a series has (``completion.cfind``).

    A receiving series whose Calling AE Title is ``ae_title`` is complete as
    soon as the peer's NumberOfSeriesRelatedInstances (0020,1209) equals the
    number received; otherwise the quiet timer still completes it.  The peer
    is asked once the series has been quiet ``after_seconds`` and, with
    ``on_release``, as soon as it releases an association that delivered
    instances of the series.
    """

    model_config = FROZEN

    ae_title: AETitle
    host: Host
    port: Port
    calling_ae_title: AETitle | None = None
    after_seconds: Seconds = 2.0
    interval_seconds: Seconds = 10.0
    timeout_s: Seconds = 10.0
    on_release: Flag = True


class CompletionSettings(BaseModel):
    """When a series counts as complete (``completion:``)."""

    model_config = FROZEN

    quiet_seconds: Seconds = 30.0
    tick_seconds: Seconds = 2.0
    cfind: tuple[CFindPeerSettings, ...] = ()

    @field_validator("cfind")
    @classmethod
    def _one_per_ae(cls, value: tuple[CFindPeerSettings, ...]) -> tuple[CFindPeerSettings, ...]:
        no_duplicates("cfind ae_title", [p.ae_title for p in value])
        return value

    def cfind_peer(self, calling_ae: str) -> CFindPeerSettings | None:
        """The C-FIND peer for series sent by ``calling_ae``, if any."""
        return next((p for p in self.cfind if p.ae_title == calling_ae.strip()), None)
    reprocess_late_arrivals: Flag = True
