"""STOW-RS: deliver result objects to a DICOMweb service with ``dicomweb-client``.

One job's objects go in one ``POST {url}/studies/{StudyInstanceUID}`` per study
(results are always in their source study, so one request).  The library's own
retries are off: the outbox retries with its backoff and keeps the job durable.

Outcomes, mapped as for C-STORE:

===========================================  ===================================
``200``, every object in ReferencedSOPSequence  sent (``WarningReason`` logged)
``202`` / ``409`` with FailedSOPSequence     per object ``FailureReason``: ``A7xx``
                                             retry later, anything else permanent
``408``, ``429``, ``5xx``                    retry later
connection refused, reset, timeout           retry later
``401`` / ``403``                            permanent (check ``auth``)
other ``4xx``                                permanent
TLS certificate not trusted                  permanent (check ``verify_tls``/``ca_file``)
===========================================  ===================================
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread

from dicom_node.errors import ConfigError, SendError
from dicom_node.send import SendReport

logger = logging.getLogger(__name__)

__all__ = ["build_session", "http_probe", "stow_files"]

_RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


def build_session(destination: Any) -> requests.Session:
    """An HTTP session with the destination's credentials and TLS policy.

    Parameters
    ----------
    destination:
        A :class:`~dicom_node.settings.DicomwebDestination`.

    Returns
    -------
    requests.Session
        With ``Authorization: Bearer`` or basic auth set, and ``verify`` set
        to the CA file, or to ``verify_tls``.

    Raises
    ------
    ConfigError
        The secret cannot be read (unset variable, unreadable file).
    """
    session = requests.Session()
    auth = destination.auth
    if auth is not None:
        secret = auth.secret()
        if auth.type == "bearer":
            session.headers["Authorization"] = f"Bearer {secret}"
        else:
            session.auth = (auth.username, secret)
    session.verify = str(destination.ca_file) if destination.ca_file is not None else destination.verify_tls
    return session


def _failure_error(what: str, failed: Sequence[Dataset]) -> SendError:
    codes = [int(item.get("FailureReason", 0xC000)) for item in failed]
    retryable = all(0xA700 <= c <= 0xA7FF for c in codes)
    reasons = ", ".join(f"{item.get('ReferencedSOPInstanceUID', '?')}: 0x{c:04X}" for item, c in zip(failed, codes))
    return SendError(f"{what} refused {len(failed)} object(s) ({reasons})", retryable=retryable)


def _response_dataset(response: requests.Response | None) -> Dataset | None:
    if response is None or not response.content:
        return None
    if response.headers.get("Content-Type", "").split(";")[0].strip() not in ("application/dicom+json",
                                                                              "application/json"):
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


def _http_error(what: str, exc: requests.HTTPError) -> SendError:
    response = exc.response
    code = response.status_code if response is not None else 0
    body = _response_dataset(response)
    failed = list(body.get("FailedSOPSequence", [])) if body is not None else []
    if failed:
        return _failure_error(what, failed)
    if code in (401, 403):
        return SendError(f"{what} answered HTTP {code}: not authorised; check the destination's auth",
                         retryable=False)
    return SendError(f"{what} answered HTTP {code} {response.reason if response is not None else ''}".rstrip(),
                     retryable=code in _RETRYABLE_HTTP or (code >= 500 and code != 501))


def stow_files(files: Sequence[Path], destination: Any) -> SendReport:
    """Store ``files`` on a DICOMweb service (STOW-RS).

    Parameters
    ----------
    files:
        DICOM Part 10 files.
    destination:
        A :class:`~dicom_node.settings.DicomwebDestination`.

    Returns
    -------
    SendReport
        How many objects the service stored, and its warnings.

    Raises
    ------
    SendError
        ``retryable=True`` for an unreachable or overloaded service
        (connection errors, timeouts, 408/429/5xx, ``A7xx`` failure reasons);
        ``retryable=False`` for refused objects, refused credentials, other
        4xx answers, untrusted certificates and unreadable secrets.
    """
    what = f"DICOMweb service {destination.url}"
    datasets = [dcmread(f) for f in files]
    try:
        session = build_session(destination)
    except ConfigError as exc:
        raise SendError(str(exc), retryable=False) from exc
    client = DICOMwebClient(url=destination.url, session=session, timeout=destination.timeout_s)
    client.set_http_retry_params(retry=False)
    by_study: dict[str, list[Dataset]] = {}
    for ds in datasets:
        by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    sent = 0
    warnings: list[str] = []
    try:
        for study_uid, group in by_study.items():
            result = client.store_instances(group, study_instance_uid=study_uid)
            failed = list(result.get("FailedSOPSequence", []))
            if failed:
                raise _failure_error(what, failed)
            stored = list(result.get("ReferencedSOPSequence", []))
            for item in stored:
                if "WarningReason" in item:
                    code = int(item.WarningReason)
                    warnings.append(f"0x{code:04X}")
                    logger.warning("STOW-RS of %s to %s: warning reason 0x%04X",
                                   item.get("ReferencedSOPInstanceUID", "?"), destination.url, code)
            # A 200 without a body stored everything; a body lists what was stored.
            sent += len(stored) if stored else len(group)
    except requests.exceptions.SSLError as exc:
        raise SendError(f"{what}: TLS certificate not trusted ({exc}); set ca_file, or verify_tls: false on "
                        "a test system", retryable=False) from exc
    except requests.HTTPError as exc:
        raise _http_error(what, exc) from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise SendError(f"{what} is unreachable or did not answer in time ({type(exc).__name__})",
                        retryable=True) from exc
    except requests.RequestException as exc:
        raise SendError(f"{what}: request failed ({type(exc).__name__}: {exc})", retryable=True) from exc
    finally:
        session.close()
    return SendReport(sent=sent, warnings=tuple(warnings))


def http_probe(destination: Any) -> str:
    """Whether a DICOMweb service answers: ``GET {url}`` with the destination's credentials.

    Returns
    -------
    str
        ``""`` when the service answered with a status below 500 (it is up,
        even if the base URL itself is not a resource), else why not.
    """
    try:
        session = build_session(destination)
    except ConfigError as exc:
        return str(exc)
    try:
        response = session.get(destination.url, timeout=destination.timeout_s)
        response.close()
    except requests.RequestException as exc:
        return f"{type(exc).__name__}"
    finally:
        session.close()
    return "" if response.status_code < 500 else f"HTTP {response.status_code}"
