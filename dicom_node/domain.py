"""Small value types shared across the node's modules.

States are ``StrEnum`` so that SQLite rows and ``dicom-node status`` show
words a person can read.  Only ``dicom_node.store`` performs transitions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Final

#: Verification SOP Class (C-ECHO), PS3.4 Annex A.
VERIFICATION_SOP_CLASS: Final[str] = "1.2.840.10008.1.1"


class SeriesState(enum.StrEnum):
    """Lifecycle of one received series."""

    RECEIVING = "receiving"   # instances arriving, completion timer running
    COMPLETE = "complete"     # quiet period elapsed, rules not yet evaluated
    QUEUED = "queued"         # at least one INFER job queued
    RUNNING = "running"       # an INFER job is running
    SENDING = "sending"       # results produced, SEND jobs pending
    DONE = "done"             # all results delivered
    IGNORED = "ignored"       # no rule matched, or an object we never process (SEG, SR, own output)
    FAILED = "failed"         # a job failed permanently; reason recorded


class JobKind(enum.StrEnum):
    INFER = "infer"
    SEND = "send"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"     # failed, will be tried again at next_attempt_at
    DONE = "done"
    FAILED = "failed"         # permanent failure (bad input, model crash); reason recorded
    DEAD = "dead"             # a SEND that exhausted its retries


class OutputKind(enum.StrEnum):
    SEG = "seg"
    SR = "sr"
    SC = "sc"     # secondary-capture overlay series (one RGB image per slice with findings)
    PDF = "pdf"   # encapsulated PDF summary


@dataclass(frozen=True)
class SeriesSummary:
    """What the rules engine sees of a series.

    ``attributes`` maps DICOM keywords (e.g. ``"Modality"``) to the values of
    the series' first instance, as plain Python values (str, float, int, list).
    ``facts`` holds derived facts (``instance_count``, ``calling_ae``...).
    """

    study_uid: str
    series_uid: str
    attributes: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        """A derived fact or a DICOM attribute by keyword; ``None`` if absent."""
        if key in self.facts:
            return self.facts[key]
        return self.attributes.get(key)


@dataclass(frozen=True)
class RuleMatch:
    """A rule that matched a series: which models to run, what to produce, where to send it."""

    rule: str
    models: tuple[str, ...]
    outputs: tuple[OutputKind, ...]
    destinations: tuple[str, ...]


@dataclass(frozen=True)
class RuleVerdict:
    """The outcome of one rule for one series, with the reason when it did not match."""

    rule: str
    matched: bool
    reason: str = ""
