"""C-STORE handling: bytes to the spool, a row in the database, then the status.

The handler never decodes pixel data: it reads the few header elements it
needs (pydicom parses the received bytes only as far as Series Instance
UID), makes the encoded dataset durable exactly as it was received, and only
then answers success.  With an intake journal
(:mod:`dicom_node.receive.journal`, what the node runs) that is one append
and one ``fdatasync``, the file and its row following in batches; without
one, the file is written and synced and its row committed here.

Statuses returned (PS3.4 B.2.3):

==========  ==========================================================
``0x0000``  stored and recorded; the sender may delete its copy
``0xA700``  out of resources: spool below ``storage.min_free_mb``, a
            write/database error, or received instances not yet recorded
            because the database refuses them; the sender should retry later
``0xA900``  data set does not match the request (SOP Instance UID differs)
``0xC001``  cannot understand: Study/Series/SOP Instance UID missing or invalid
``0xC210``  cannot understand: the data set could not be decoded
==========  ==========================================================
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import cast

from pydicom import Dataset, dcmread
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import events as evt
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.errors import InvalidUIDError
from dicom_node.receive.dataset_buffer import IntakeLimits, SpilledDataSet
from dicom_node.receive.journal import IntakeJournal
from dicom_node.spool import Spool, validate_uid
from dicom_node.spool.layout import digest
from dicom_node.store import InstanceOutcome, ReceivedInstance, SeriesStore

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
INVALID_UID = 0xC001
CANNOT_DECODE = 0xC210

#: The last element the handler reads: Study (0020,000D) and Series (0020,000E) Instance UID come after
#: SOP Instance UID (0008,0018) and Modality (0008,0060) in a data set's ascending tag order.
_LAST_TAG_READ = 0x0020000E
_UIDS_READ = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
#: What the handler reads of a spilled data set (pydicom skips every other value).
_HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality"]
#: Longest wait of a spilled instance for the journal's earlier instances to be recorded.
_SPILLED_WAIT_S = 60.0


def _past_last_read(tag: int, vr: str | None, length: int) -> bool:
    return tag > _LAST_TAG_READ


def header_elements(event: evt.Event, encoded: bytes | None = None) -> Dataset:
    """The received data set's elements up to Series Instance UID, parsed from the bytes pynetdicom holds.

    pynetdicom's ``event.dataset`` parses every element (pixel data
    included, as a copy) to find them; this stops after (0020,000E).  A
    deflated data set, or one whose UIDs are not where a data set's
    ascending order puts them, is parsed whole as before.  ``encoded``: the
    data set's bytes when the caller has them already
    (``event.encoded_dataset(include_meta=False)`` copies them each time).
    """
    syntax = UID(str(event.context.transfer_syntax))
    if syntax != DeflatedExplicitVRLittleEndian:
        data = encoded if encoded is not None else event.encoded_dataset(include_meta=False)
        ds = read_dataset(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian,
                          stop_when=_past_last_read)
        if all(keyword in ds for keyword in _UIDS_READ):
            return ds
    return event.dataset


class StoreHandler:
    """Callable for ``evt.EVT_C_STORE``.

    Parameters
    ----------
    spool, series:
        Where bytes and rows go.
    min_free_mb:
        Intake stops (``0xA700``) while the spool filesystem has less free space.
    clock:
        Returns the current time (seconds since the epoch); a parameter for tests.
    on_recorded:
        Called after each recorded instance with ``(record, outcome)``
        (metrics, audit trail); must not raise.
    free_mb:
        Returns the free space of the spool filesystem in MiB; checked before
        every C-STORE, so intake resumes by itself as soon as space returns.
        Defaults to :meth:`Spool.free_mb`; a parameter for tests.
    on_released:
        Called with ``(calling AE title, series UIDs)`` when a peer released
        an association (A-RELEASE, not an abort) in which instances of those
        series were stored, once all of them are recorded: the hint on which
        completion asks a C-FIND peer at once (see
        :mod:`dicom_node.scheduler.completion`).  Must not raise.
    """

    def __init__(self, spool: Spool, series: SeriesStore, min_free_mb: float,
                 clock: Callable[[], float] = time.time,
                 on_recorded: Callable[[ReceivedInstance, str], None] | None = None,
                 free_mb: Callable[[], float] | None = None,
                 on_released: Callable[[str, list[str]], None] | None = None) -> None:
        self.on_recorded = on_recorded
        self.on_released = on_released
        self._stored_in: dict[int, set[str]] = {}  # association -> series it stored instances of
        self._stored_lock = threading.Lock()
        self.journal: IntakeJournal | None = None
        self.spool = spool
        self.series = series
        self.min_free_mb = min_free_mb
        self.clock = clock
        self.free_mb = free_mb if free_mb is not None else spool.free_mb
        self._low_space_logged = False

    def intake_limits(self, max_bytes: int) -> IntakeLimits:
        """What bounds a received data set (:mod:`dicom_node.receive.dataset_buffer`): ``max_bytes``, spilled to the
        spool's ``tmp/``, this handler's free-space floor."""
        return IntakeLimits(max_bytes=max_bytes, spill_dir=self.spool.tmp, free_mb=self.free_mb,
                            min_free_mb=self.min_free_mb)

    def attach_journal(self) -> IntakeJournal:
        """Start this process's intake journal: from now on an instance is durable once appended to it."""
        self.journal = IntakeJournal(self.spool.intake, self.spool, self.series, self.on_recorded)
        return self.journal

    def close(self) -> None:
        """Record what the journal still holds and close it (after the listener stopped)."""
        if self.journal is not None:
            self.journal.close()
            self.journal = None

    def released(self, event: evt.Event) -> None:
        """``EVT_RELEASED``: the peer ended the association normally; hint its series once recorded."""
        with self._stored_lock:
            series = self._stored_in.pop(id(event.assoc), None)
        if not series or self.on_released is None:
            return
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        hint, uids = self.on_released, sorted(series)
        journal = self.journal
        if journal is not None:
            journal.after_recorded(lambda: hint(calling_ae, uids))
        else:
            hint(calling_ae, uids)

    def closed(self, event: evt.Event) -> None:
        """``EVT_CONN_CLOSE``: forget the association (after an abort, its series get no hint)."""
        with self._stored_lock:
            self._stored_in.pop(id(event.assoc), None)

    def _stored(self, event: evt.Event, series_uid: str) -> None:
        with self._stored_lock:
            self._stored_in.setdefault(id(event.assoc), set()).add(series_uid)

    def __call__(self, event: evt.Event) -> int:
        """Store one instance; returns the C-STORE status (see the module docstring)."""
        free = self.free_mb()
        if free < self.min_free_mb:
            if not self._low_space_logged:
                logger.error("Intake paused: %.0f MB free on the spool, below storage.min_free_mb=%d; "
                             "answering C-STORE with 0xA700 until space returns", free, self.min_free_mb)
                self._low_space_logged = True
            return OUT_OF_RESOURCES
        if self._low_space_logged:
            logger.warning("Intake resumed: %.0f MB free on the spool", free)
            self._low_space_logged = False

        requestor = event.assoc.requestor
        journal = self.journal
        dataset = getattr(event.request, "DataSet", None)
        spilled = dataset if isinstance(dataset, SpilledDataSet) else None
        # The journal takes the data set as received (its file's head, the File Meta Information, is added
        # behind); the header is read from the same bytes (one copy out of pynetdicom's buffer, not two).
        # A spilled data set is already its own Part 10 file in the spool: never read whole.
        data = event.encoded_dataset(include_meta=journal is None) if spilled is None else b""
        try:
            ds: Dataset
            if spilled is not None:
                ds = dcmread(spilled.path, stop_before_pixels=True, defer_size=4096, specific_tags=_HEADER_TAGS)
            else:
                ds = header_elements(event, data if journal is not None else None)
            study_uid = validate_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
            series_uid = validate_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
            sop_uid = validate_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
            modality = str(ds.get("Modality", "") or "")[:16]
        except InvalidUIDError as exc:
            logger.warning("C-STORE from %s refused (0xC001): %s", requestor.ae_title, exc)
            return INVALID_UID
        except Exception as exc:  # pydicom raises many types on malformed data
            logger.warning("C-STORE from %s refused (0xC210): data set cannot be decoded: %s",
                           requestor.ae_title, type(exc).__name__)
            logger.debug("Decode failure detail: %s", exc)
            return CANNOT_DECODE

        affected = str(cast(C_STORE, event.request).AffectedSOPInstanceUID or "")
        if affected != sop_uid:
            logger.warning("C-STORE from %s refused (0xA900): data set SOP Instance UID %s differs from "
                           "the request's %s", requestor.ae_title, sop_uid, affected)
            return DOES_NOT_MATCH

        refusal = journal.refusal() if journal is not None else None
        if refusal is not None:
            logger.error("C-STORE of %s refused (0xA700): %s", sop_uid, refusal)
            return OUT_OF_RESOURCES
        path = self.spool.instance_path(study_uid, series_uid, sop_uid)
        if spilled is not None:
            return self._store_spilled(event, spilled, path, study_uid, series_uid, sop_uid, modality)
        record = ReceivedInstance(
            study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid,
            sop_class_uid=str(event.request.AffectedSOPClassUID),
            transfer_syntax=str(event.context.transfer_syntax), modality=modality,
            # With the journal the digest is taken behind the C-STORE path, when the instance is materialised.
            path=self.spool.relative(path), size=len(data), sha256="" if journal is not None else digest(data),
            calling_ae=str(requestor.ae_title).strip(), called_ae=str(event.assoc.acceptor.ae_title).strip(),
            source_host=str(requestor.address),
        )
        try:
            if journal is not None:
                journal.append(record, self.clock(), data, bare=True)
            else:
                self.spool.write_atomic(path, data)
        except OSError as exc:
            reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror
            logger.error("C-STORE of %s refused (0xA700): spool write failed: %s", sop_uid, reason)
            return OUT_OF_RESOURCES
        if journal is not None:
            logger.debug("Stored %s (%d bytes) series %s in the intake journal", sop_uid, len(data), series_uid)
            self._stored(event, series_uid)
            return SUCCESS
        return self._record_now(event, record)

    def _record_now(self, event: evt.Event, record: ReceivedInstance) -> int:
        """Commit the row of an instance whose file is durable in its place (no journal between); the status."""
        try:
            outcome = self.series.record_instance(record, self.clock())
        except Exception as exc:  # database locked, disk I/O error: the sender must retry
            logger.error("C-STORE of %s refused (0xA700): could not record it: %s", record.sop_uid, exc)
            return OUT_OF_RESOURCES
        logger.debug("Stored %s (%d bytes) series %s: %s", record.sop_uid, record.size, record.series_uid, outcome)
        if self.on_recorded is not None:
            self.on_recorded(record, outcome)
        self._stored(event, record.series_uid)
        return SUCCESS


    def _store_spilled(self, event: evt.Event, spilled: SpilledDataSet, path: Path, study_uid: str,
                       series_uid: str, sop_uid: str, modality: str) -> int:
        """Store an instance whose data set is in a spill file: that file becomes its file, its row committed.

        The journal's earlier instances are recorded first, so that an
        earlier copy of the same instance cannot be materialised over this one.
        """
        requestor = event.assoc.requestor
        record = ReceivedInstance(
            study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid,
            sop_class_uid=str(event.request.AffectedSOPClassUID),
            transfer_syntax=str(event.context.transfer_syntax), modality=modality,
            path=self.spool.relative(path), size=spilled.file_size, sha256=spilled.sha256,
            calling_ae=str(requestor.ae_title).strip(), called_ae=str(event.assoc.acceptor.ae_title).strip(),
            source_host=str(requestor.address),
        )
        journal = self.journal
        if journal is not None and not journal.wait_recorded(_SPILLED_WAIT_S):
            logger.error("C-STORE of %s refused (0xA700): the instances received before it are not recorded "
                         "after %.0f s", sop_uid, _SPILLED_WAIT_S)
            return OUT_OF_RESOURCES
        try:
            spilled.commit(path)
        except OSError as exc:
            reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror
            logger.error("C-STORE of %s refused (0xA700): spool write failed: %s", sop_uid, reason)
            return OUT_OF_RESOURCES
        return self._record_now(event, record)


__all__ = ["StoreHandler", "InstanceOutcome"]
