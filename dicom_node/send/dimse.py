"""C-STORE SCU: deliver result objects to a DICOM destination.

One association carries one job's objects.  For every (SOP class, transfer
syntax of the file) the node proposes one presentation context with, in order
of preference, the file's own transfer syntax, Explicit VR Little Endian and
Implicit VR Little Endian.  An object whose (compressed) syntax the
destination did not accept is decompressed to Explicit VR Little Endian
(same SOP Instance UID: it is the same object in another encoding) and the
log says so; uncompressed syntaxes are converted by pynetdicom.

Every C-STORE status is mapped to what the outbox should do:

===================  ============================================
``0x0000``           sent
``0xB000-0xBFFF``    sent with a warning (logged)
``0xA700-0xA7FF``    destination out of resources: retry later
association failure  destination unreachable / busy: retry later
no response          connection lost or timeout: retry later
anything else        refused (e.g. ``0xA900``, ``0xC000``): permanent
SOP class refused    no accepted presentation context: permanent
===================  ============================================
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node.domain import VERIFICATION_SOP_CLASS
from dicom_node.errors import SendError
from dicom_node.send import SendReport
from dicom_node.send.requestor import configure_timeouts, requestor_handlers

logger = logging.getLogger(__name__)

__all__ = ["SendReport", "echo", "proposed_contexts", "send_files"]

#: Transfer syntaxes every context offers besides the file's own, most preferred first.
_FALLBACK = (UID(ExplicitVRLittleEndian), UID(ImplicitVRLittleEndian))


def proposed_contexts(datasets: Sequence[Dataset]) -> list[tuple[str, list[str]]]:
    """Presentation contexts to propose for ``datasets``.

    Parameters
    ----------
    datasets:
        The objects to send, each with file meta information.

    Returns
    -------
    list of (SOP Class UID, transfer syntaxes)
        One context per distinct (SOP class, file transfer syntax), in the
        order first seen; its syntaxes are the file's, then Explicit and
        Implicit VR Little Endian (without repeats).
    """
    contexts: list[tuple[str, list[str]]] = []
    seen: set[tuple[str, str]] = set()
    for ds in datasets:
        key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        if key in seen:
            continue
        seen.add(key)
        syntaxes = [key[1], *(ts for ts in _FALLBACK if ts != key[1])]
        contexts.append((key[0], syntaxes))
    return contexts


def _fit_to_association(ds: Dataset, assoc: Association, ae_title: str) -> bool:
    """Make ``ds`` sendable on ``assoc``; return whether it had to be transcoded.

    Raises
    ------
    SendError
        Permanent: the destination accepted no context for the SOP class, or
        the pixel data cannot be decompressed.
    """
    sop_class = UID(str(ds.SOPClassUID))
    accepted = [UID(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class]
    if not accepted:
        raise SendError(f"{ae_title} does not accept {sop_class.name} ({sop_class}): it refused every "
                        "presentation context; configure the destination to store this SOP class",
                        retryable=False)
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    if syntax in accepted:
        return False
    convertible = any(not ts.is_compressed and ts.is_little_endian == syntax.is_little_endian for ts in accepted)
    if not syntax.is_compressed and convertible:
        return False  # pynetdicom re-encodes between uncompressed little endian syntaxes
    if not syntax.is_compressed:
        raise SendError(f"{ae_title} accepted only {', '.join(ts.name for ts in accepted)} for {sop_class.name}, "
                        f"which {syntax.name} cannot be converted to", retryable=False)
    try:
        ds.decompress(generate_instance_uid=False)
    except Exception as exc:  # no decoder for this syntax, corrupt fragments...
        raise SendError(f"{ae_title} does not accept {syntax.name} for {sop_class.name} and the object cannot "
                        f"be decompressed ({type(exc).__name__}: {exc})", retryable=False) from exc
    logger.info("C-STORE of %s to %s: destination does not accept %s; transcoded to %s",
                ds.SOPInstanceUID, ae_title, syntax.name, UID(ExplicitVRLittleEndian).name)
    return True


#: A job's objects are shared out over several associations (``associations``) only from this many per association.
MIN_PER_ASSOCIATION = 8


def send_files(files: Sequence[Path], *, ae_title: str, host: str, port: int, calling_ae_title: str,
               timeout_s: float = 30.0, skip_refused: bool = False, associations: int = 1) -> SendReport:
    """Send ``files`` over one association, or several at once for many files.

    Parameters
    ----------
    files:
        DICOM Part 10 files.
    ae_title, host, port:
        The destination (Called AE Title, address, port).
    calling_ae_title:
        Our AE title as presented to the destination.
    timeout_s:
        Connection, association, DIMSE and network timeout in seconds.
    skip_refused:
        If true, objects of a SOP class the destination accepted no context
        for are not sent and their class is listed in ``SendReport.refused``
        (the outbox then sends a fallback, e.g. the overlay instead of a SEG);
        if false, such an object is a permanent error.
    associations:
        At most this many associations at once (the destination's
        ``associations``): the files are cut into that many consecutive
        parts, each sent over its own association in a thread, when there are
        at least :data:`MIN_PER_ASSOCIATION` files per part (so a job's SEG and
        SR still go in order over one).  All must succeed: a refusal anywhere
        is the error raised, else the first failure.

    Returns
    -------
    SendReport
        How many objects were stored, their warnings, and how many were transcoded.

    Raises
    ------
    SendError
        ``retryable=True`` when the destination is unreachable, rejects the
        association, stops answering or is out of resources;
        ``retryable=False`` when it refuses an object (the reason names the
        status) or accepts no transfer syntax the object can be sent in.
    """
    parts = max(1, min(associations, len(files) // MIN_PER_ASSOCIATION))
    if parts > 1:
        return _send_in_parts(files, parts, ae_title=ae_title, host=host, port=port,
                              calling_ae_title=calling_ae_title, timeout_s=timeout_s, skip_refused=skip_refused)
    # Headers first (the contexts to propose); each object is read whole only when its turn comes, so an
    # overlay series of hundreds of RGB images never sits in memory at once.
    headers = [dcmread(f, stop_before_pixels=True) for f in files]
    ae = AE(ae_title=calling_ae_title)
    configure_timeouts(ae, timeout_s)
    for sop_class, syntaxes in proposed_contexts(headers):
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=requestor_handlers())
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            names = ", ".join(sorted({UID(str(cx.abstract_syntax)).name for cx in assoc.rejected_contexts}))
            raise SendError(f"{ae_title} does not accept {names}: it refused every presentation context; "
                            "configure the destination to store this SOP class", retryable=False)
        why = "rejected the association" if assoc.is_rejected else "is unreachable or aborted the association"
        raise SendError(f"destination {ae_title}@{host}:{port} {why}", retryable=True)
    warnings: list[str] = []
    refused: list[str] = []
    stored: list[Path] = []
    try:
        transcoded = _store_each(assoc, files, headers, ae_title, skip_refused, stored, refused, warnings)
    except SendError as exc:
        exc.stored = tuple(stored)  # what the destination confirmed before it failed: not sent again
        raise
    finally:
        if assoc.is_established:
            assoc.release()
    return SendReport(sent=len(stored), warnings=tuple(warnings), transcoded=transcoded, refused=tuple(refused))


def _store_each(assoc: Association, files: Sequence[Path], headers: Sequence[Dataset], ae_title: str,
                skip_refused: bool, stored: list[Path], refused: list[str], warnings: list[str]) -> int:
    """C-STORE each file over ``assoc``, each confirmed one appended to ``stored`` as its response comes;
    returns how many were transcoded."""
    transcoded = 0
    for path, header in zip(files, headers):
        if skip_refused and not any(cx.abstract_syntax == header.SOPClassUID for cx in assoc.accepted_contexts):
            if str(header.SOPClassUID) not in refused:
                logger.warning("C-STORE to %s: %s not accepted in association negotiation; not sent",
                               ae_title, UID(str(header.SOPClassUID)).name)
                refused.append(str(header.SOPClassUID))
            continue
        ds = dcmread(path)
        transcoded += _fit_to_association(ds, assoc, ae_title)
        status = assoc.send_c_store(ds)
        code = int(status.Status) if "Status" in status else None
        if code is None:
            raise SendError(f"no C-STORE response from {ae_title} (connection lost or timeout)", retryable=True)
        if code == 0x0000:
            stored.append(path)
        elif 0xB000 <= code <= 0xBFFF:
            stored.append(path)
            warnings.append(f"0x{code:04X}")
            logger.warning("C-STORE of %s to %s: warning status 0x%04X", ds.SOPInstanceUID, ae_title, code)
        elif 0xA700 <= code <= 0xA7FF:
            raise SendError(f"{ae_title} is out of resources (0x{code:04X})", retryable=True)
        else:
            comment = str(status.get("ErrorComment", "")).strip()
            raise SendError(f"{ae_title} refused {UID(str(ds.SOPClassUID)).name} with status 0x{code:04X}"
                            + (f" ({comment})" if comment else ""), retryable=False)
    return transcoded


def _send_in_parts(files: Sequence[Path], parts: int, **destination: Any) -> SendReport:
    """:func:`send_files` of consecutive parts of ``files``, each over its own association, at once."""
    size = -(-len(files) // parts)
    chunks = [list(files[i:i + size]) for i in range(0, len(files), size)]
    with ThreadPoolExecutor(max_workers=len(chunks), thread_name_prefix="c-store") as pool:
        futures = [pool.submit(send_files, chunk, **destination) for chunk in chunks]
        outcomes: list[SendReport | BaseException] = []
        for future in futures:
            try:
                outcomes.append(future.result())
            except BaseException as exc:  # every part ends first; then the error that decides is raised
                outcomes.append(exc)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:
        refusals = [e for e in errors if isinstance(e, SendError) and not e.retryable]
        error = (refusals or errors)[0]
        if isinstance(error, SendError):  # what every part had confirmed (a part that skipped nothing: all of it)
            error.stored = tuple(f for chunk, outcome in zip(chunks, outcomes) for f in (
                outcome.stored if isinstance(outcome, SendError)
                else chunk if isinstance(outcome, SendReport) and not outcome.refused else ()))
        raise error
    reports = [o for o in outcomes if isinstance(o, SendReport)]
    return SendReport(sent=sum(r.sent for r in reports), warnings=tuple(w for r in reports for w in r.warnings),
                      transcoded=sum(r.transcoded for r in reports),
                      refused=tuple(dict.fromkeys(uid for r in reports for uid in r.refused)))


def echo(*, ae_title: str, host: str, port: int, calling_ae_title: str, timeout_s: float = 10.0) -> int | None:
    """C-ECHO a peer.

    Returns
    -------
    int or None
        The C-ECHO status (``0x0000`` = success), or ``None`` when no
        association could be made or no response came.
    """
    ae = AE(ae_title=calling_ae_title)
    configure_timeouts(ae, timeout_s)
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=requestor_handlers())
    if not assoc.is_established:
        return None
    try:
        if not assoc.accepted_contexts:
            return None  # the peer refused Verification
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()
