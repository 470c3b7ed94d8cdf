"""The audit trail: who sent what, what ran on it, what was produced and where it went.

An append-only SQLite table (schema migration 2; triggers refuse ``UPDATE``
and ``DELETE``, so retention never touches it).  Rows hold UIDs, AE titles,
addresses, rule and model names: never patient data.

Events (:class:`AuditEvent`)::

    association_accepted / association_refused   peer AE and host, reason
    series_received      first instance of a series (or of a re-opened one), peer AE and host
    series_completed     quiet period over, instance count
    series_ignored       no rule matched, or never processed (reason)
    rule_matched         rule, models
    model_run            model, version, ok / error, seconds
    objects_produced     model, kind + SOP Instance UID + Series Instance UID per object
    sent / send_failed   destination, SOP Instance UIDs / reason
    series_purged        retention removed its files and rows (reason)
"""

from __future__ import annotations

import enum
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dicom_node.store.database import Database

logger = logging.getLogger(__name__)



class AuditEvent(enum.StrEnum):
    ASSOCIATION_ACCEPTED = "association_accepted"
    ASSOCIATION_REFUSED = "association_refused"
    SERIES_RECEIVED = "series_received"
    SERIES_COMPLETED = "series_completed"
    SERIES_IGNORED = "series_ignored"
    RULE_MATCHED = "rule_matched"
    MODEL_RUN = "model_run"
    OBJECTS_PRODUCED = "objects_produced"
    SENT = "sent"
    SEND_FAILED = "send_failed"
    SERIES_PURGED = "series_purged"


@dataclass(frozen=True)
class AuditRecord:
    """One row of the audit trail."""

    id: int
    at: float
    event: str
    study_uid: str
    series_uid: str
    peer_ae: str
    peer_host: str
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.at, "event": self.event, "study_uid": self.study_uid,
                "series_uid": self.series_uid, "peer_ae": self.peer_ae, "peer_host": self.peer_host,
                "detail": self.detail}


class AuditLog:
    """Append to and query the audit trail.

    Parameters
    ----------
    db:
        The state database (schema version >= 2).
    clock:
        Current time in seconds since the epoch.
    """

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    def record(self, event: AuditEvent | str, *, study_uid: str = "", series_uid: str = "", peer_ae: str = "",
               peer_host: str = "", at: float | None = None, **detail: Any) -> None:
        """Append one event.  Never raises: an audit failure is logged, the node's work goes on."""
        try:
            with self.db.transaction() as c:
                c.execute(
                    "INSERT INTO audit (at, event, study_uid, series_uid, peer_ae, peer_host, detail)"
                    " VALUES (?,?,?,?,?,?,?)",
                    (self.clock() if at is None else at, str(AuditEvent(event)), study_uid, series_uid,
                     peer_ae, peer_host, json.dumps(detail, default=str, sort_keys=True)),
                )
        except Exception:
            logger.exception("Audit: could not record %s for series %s", event, series_uid or "-")

    def query(self, *, since: float | None = None, series_uid: str | None = None,
              event: str | None = None, limit: int = 1000) -> list[AuditRecord]:
        """Events, oldest first, filtered by time (``at >= since``), series and event name."""
        where: list[str] = []
        params: list[float | str] = []
        if since is not None:
            where.append("at >= ?")
            params.append(since)
        if series_uid:
            where.append("series_uid = ?")
            params.append(series_uid)
        if event:
            where.append("event = ?")
            params.append(str(AuditEvent(event)))
        sql = "SELECT * FROM audit" + (" WHERE " + " AND ".join(where) if where else "")
        # The newest `limit` rows, shown oldest first.
        sql = f"SELECT * FROM ({sql} ORDER BY id DESC LIMIT ?) ORDER BY id"
        rows = self.db.query(sql, (*params, limit))
        return [AuditRecord(r["id"], r["at"], r["event"], r["study_uid"], r["series_uid"], r["peer_ae"],
                            r["peer_host"], json.loads(r["detail"])) for r in rows]

    # -- adapters for the places that do the work -----------------------------
    def on_association(self, accepted: bool, ae_title: str, host: str, reason: str = "") -> None:
        """Receiver callback: an association was accepted or refused."""
        event = AuditEvent.ASSOCIATION_ACCEPTED if accepted else AuditEvent.ASSOCIATION_REFUSED
        if reason:
            self.record(event, peer_ae=ae_title.strip(), peer_host=host, reason=reason)
        else:
            self.record(event, peer_ae=ae_title.strip(), peer_host=host)

    def on_pipeline_event(self, name: str, data: dict[str, Any]) -> None:
        """:class:`~dicom_node.scheduler.service.Pipeline` events, translated to audit rows."""
        series = str(data.get("series", ""))
        if name == "series_completed":
            self.record(AuditEvent.SERIES_COMPLETED, series_uid=series, study_uid=data.get("study", ""),
                        instances=data.get("instances"))
        elif name == "series_ignored":
            self.record(AuditEvent.SERIES_IGNORED, series_uid=series, reason=data.get("reason", ""))
        elif name == "rule_matched":
            self.record(AuditEvent.RULE_MATCHED, series_uid=series, rule=data["rule"],
                        models=list(data.get("models", ())))
        elif name == "infer_finished":
            self.record(AuditEvent.MODEL_RUN, series_uid=series, job=data.get("job"), model=data["model"],
                        version=data.get("version", ""), ok=data["ok"], error=data.get("error", ""),
                        seconds=data.get("seconds", {}))
            objects = data.get("objects") or []
            if objects:
                self.record(AuditEvent.OBJECTS_PRODUCED, series_uid=series, job=data.get("job"),
                            model=data["model"], version=data.get("version", ""), objects=objects)
        elif name == "sent":
            self.record(AuditEvent.SENT, series_uid=series, job=data.get("job"),
                        destination=data["destination"], count=data.get("count"),
                        sop_uids=self._sop_uids(data.get("files", [])))
        elif name == "send_failed":
            self.record(AuditEvent.SEND_FAILED, series_uid=series, job=data.get("job"),
                        destination=data["destination"], reason=data.get("reason", ""))

    def _sop_uids(self, files: list[str]) -> list[str]:
        if not files:
            return []
        marks = ",".join("?" * len(files))
        rows = self.db.query(f"SELECT sop_uid FROM results WHERE path IN ({marks}) ORDER BY kind", tuple(files))
        return [r["sop_uid"] for r in rows]
