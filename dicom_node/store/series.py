"""Series and instances: what was received, and the completion policy's view of it."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dicom_node.domain import SeriesState
from dicom_node.store.database import Database

logger = logging.getLogger(__name__)

# States from which a new instance re-opens the series (late arrival).
_SETTLED = (SeriesState.COMPLETE, SeriesState.QUEUED, SeriesState.RUNNING,
            SeriesState.SENDING, SeriesState.DONE, SeriesState.IGNORED, SeriesState.FAILED)


@dataclass(frozen=True)
class ReceivedInstance:
    """One instance as recorded by the C-STORE handler (no patient data)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    modality: str
    path: str
    size: int
    sha256: str
    calling_ae: str
    called_ae: str
    source_host: str


class InstanceOutcome:
    NEW = "new"
    DUPLICATE = "duplicate"        # same bytes again: nothing to do
    REPLACED = "replaced"          # same SOP Instance UID, different bytes


@dataclass(frozen=True)
class RecordedFile:
    """An instance row as the start-up reconciliation sees it."""

    sop_uid: str
    series_uid: str
    path: str
    size: int


class SeriesStore:
    """Series and instance rows.

    Parameters
    ----------
    db:
        The state database.
    reopen_late:
        ``completion.reprocess_late_arrivals``: whether a new instance for a
        series that was already complete (or processed) re-opens it.
    """

    def __init__(self, db: Database, reopen_late: bool = True) -> None:
        self.db = db
        self.reopen_late = reopen_late

    def record_instance(self, inst: ReceivedInstance, now: float) -> str:
        """Record a received instance durably; returns an :class:`InstanceOutcome` value.

        A new (or changed) instance for a series that was already complete
        re-opens it when ``reopen_late``: the series goes back to ``receiving``
        and is processed again once quiet (results have deterministic UIDs, so
        they replace the earlier ones in the PACS).  Otherwise the instance is
        stored and logged, and the series keeps its state.
        """
        return self.record_instances([(inst, now)])[0]

    def record_instances(self, batch: Sequence[tuple[ReceivedInstance, float]]) -> list[str]:
        """Record several instances (each with its arrival time) in one transaction: one commit, one sync.

        Returns each one's :class:`InstanceOutcome` value, in order (see :meth:`record_instance`).
        """
        outcomes: list[str] = []
        with self.db.transaction() as c:
            counted: set[str] = set()
            for inst, now in batch:
                outcomes.append(self._record(c, inst, now))
                counted.add(inst.series_uid)
            for series_uid in counted:
                c.execute("UPDATE series SET instance_count=(SELECT COUNT(*) FROM instances WHERE series_uid=?)"
                          " WHERE series_uid=?", (series_uid, series_uid))
        for (inst, _), outcome in zip(batch, outcomes):
            if outcome == InstanceOutcome.REPLACED:
                logger.warning("Instance %s received again with different content; replaced", inst.sop_uid)
        return outcomes

    def recorded_digests(self, sop_uids: Iterable[str]) -> dict[str, str]:
        """The sha256 recorded for each of these instances that has a row (one query per 500)."""
        uids = list(dict.fromkeys(sop_uids))
        out: dict[str, str] = {}
        for start in range(0, len(uids), 500):
            part = uids[start:start + 500]
            rows = self.db.query(f"SELECT sop_uid, sha256 FROM instances WHERE sop_uid IN ({','.join('?' * len(part))})",
                                 tuple(part))
            out.update((str(r["sop_uid"]), str(r["sha256"])) for r in rows)
        return out

    def _record(self, c: sqlite3.Connection, inst: ReceivedInstance, now: float) -> str:
        old = c.execute("SELECT sha256, series_uid FROM instances WHERE sop_uid=?", (inst.sop_uid,)).fetchone()
        if old is not None and old["sha256"] == inst.sha256:
            return InstanceOutcome.DUPLICATE
        row = c.execute("SELECT state FROM series WHERE series_uid=?", (inst.series_uid,)).fetchone()
        if row is None:
            c.execute(
                "INSERT INTO series (series_uid, study_uid, state, modality, calling_ae, called_ae,"
                " source_host, first_received, last_received, updated_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (inst.series_uid, inst.study_uid, SeriesState.RECEIVING, inst.modality,
                 inst.calling_ae, inst.called_ae, inst.source_host, now, now, now),
            )
        elif row["state"] in _SETTLED and self.reopen_late:
            logger.info("Series %s: new instance after state %s; re-opening", inst.series_uid, row["state"])
            c.execute("UPDATE series SET state=?, reason='', completed_at=NULL WHERE series_uid=?",
                      (SeriesState.RECEIVING, inst.series_uid))
        elif row["state"] in _SETTLED:
            logger.warning("Series %s: late instance %s stored after state %s; the series is not re-opened "
                           "(completion.reprocess_late_arrivals is false)", inst.series_uid,
                           inst.sop_uid, row["state"])
        c.execute(
            "INSERT INTO instances (sop_uid, series_uid, sop_class_uid, transfer_syntax, path, size,"
            " sha256, received_at) VALUES (?,?,?,?,?,?,?,?)"
            " ON CONFLICT(sop_uid) DO UPDATE SET series_uid=excluded.series_uid,"
            " sop_class_uid=excluded.sop_class_uid, transfer_syntax=excluded.transfer_syntax,"
            " path=excluded.path, size=excluded.size, sha256=excluded.sha256,"
            " received_at=excluded.received_at",
            (inst.sop_uid, inst.series_uid, inst.sop_class_uid, inst.transfer_syntax,
             inst.path, inst.size, inst.sha256, now),
        )
        c.execute("UPDATE series SET last_received=MAX(last_received, ?), updated_at=? WHERE series_uid=?",
                  (now, now, inst.series_uid))
        return InstanceOutcome.REPLACED if old is not None else InstanceOutcome.NEW

    # -- start-up reconciliation (see dicom_node.spool.reconcile) -------------
    def recorded_files(self) -> list[RecordedFile]:
        """Every instance row's file, as recorded."""
        return [RecordedFile(r["sop_uid"], r["series_uid"], r["path"], r["size"])
                for r in self.db.query("SELECT sop_uid, series_uid, path, size FROM instances")]

    def forget_instances(self, sop_uids: list[str], now: float) -> None:
        """Remove instance rows (their files are gone) and recount their series.

        A series left without any instance that had not finished receiving or
        processing is marked ``failed`` with the reason, so it is never
        processed from nothing.
        """
        with self.db.transaction() as c:
            series = set()
            for sop_uid in sop_uids:
                row = c.execute("SELECT series_uid FROM instances WHERE sop_uid=?", (sop_uid,)).fetchone()
                if row is None:
                    continue
                series.add(row["series_uid"])
                c.execute("DELETE FROM instances WHERE sop_uid=?", (sop_uid,))
            for series_uid in series:
                c.execute("UPDATE series SET updated_at=?,"
                          " instance_count=(SELECT COUNT(*) FROM instances WHERE series_uid=?) WHERE series_uid=?",
                          (now, series_uid, series_uid))
                c.execute("UPDATE series SET state=?, reason=? WHERE series_uid=? AND instance_count=0"
                          " AND state IN (?,?)",
                          (SeriesState.FAILED, "every received file is missing from the spool", series_uid,
                           SeriesState.RECEIVING, SeriesState.COMPLETE))

    def restart_quiet_periods(self, now: float) -> list[str]:
        """At start-up: series still receiving get a full quiet period from ``now``.

        While the node was down no sender could reach it, so the downtime is not
        silence: a series interrupted by a crash is completed only once its
        sender had ``quiet_seconds`` to send the rest.  Returns the series UIDs.
        """
        with self.db.transaction() as c:
            rows = c.execute("SELECT series_uid FROM series WHERE state=? AND last_received < ?",
                             (SeriesState.RECEIVING, now)).fetchall()
            c.execute("UPDATE series SET last_received=? WHERE state=? AND last_received < ?",
                      (now, SeriesState.RECEIVING, now))
        return [r["series_uid"] for r in rows]

    def update_instance_file(self, sop_uid: str, size: int, sha256: str) -> None:
        """Record the size and digest of the file actually in the spool for an instance."""
        with self.db.transaction() as c:
            c.execute("UPDATE instances SET size=?, sha256=? WHERE sop_uid=?", (size, sha256, sop_uid))

    def complete_quiet(self, now: float, quiet_seconds: float) -> list[str]:
        """Mark every receiving series with no instance for ``quiet_seconds`` complete.

        Returns the series UIDs that became complete.  Time is a parameter so
        that tests need no sleeps.
        """
        with self.db.transaction() as c:
            rows = c.execute(
                "SELECT series_uid, instance_count FROM series WHERE state=? AND last_received <= ?",
                (SeriesState.RECEIVING, now - quiet_seconds),
            ).fetchall()
            for r in rows:
                c.execute("UPDATE series SET state=?, completed_at=?, updated_at=? WHERE series_uid=?",
                          (SeriesState.COMPLETE, now, now, r["series_uid"]))
        for r in rows:
            logger.info("Series %s: complete after %d instance(s)", r["series_uid"], r["instance_count"])
        return [r["series_uid"] for r in rows]

    def mark_complete(self, series_uid: str, now: float, last_received: float) -> bool:
        """Mark one receiving series complete, unless an instance arrived since ``last_received``.

        Used by :class:`dicom_node.scheduler.completion.SeriesCompletion` (per-rule
        timers, C-FIND confirmation).  Returns whether the series became complete.
        """
        with self.db.transaction() as c:
            cur = c.execute("UPDATE series SET state=?, completed_at=?, updated_at=? WHERE series_uid=?"
                            " AND state=? AND last_received=?",
                            (SeriesState.COMPLETE, now, now, series_uid, SeriesState.RECEIVING, last_received))
        return cur.rowcount == 1

    def get(self, series_uid: str) -> dict | None:
        rows = self.db.query("SELECT * FROM series WHERE series_uid=?", (series_uid,))
        return dict(rows[0]) if rows else None

    def in_state(self, state: SeriesState) -> list[dict]:
        return [dict(r) for r in self.db.query("SELECT * FROM series WHERE state=? ORDER BY last_received",
                                               (state,))]

    def instance_paths(self, series_uid: str) -> list[str]:
        rows = self.db.query("SELECT path FROM instances WHERE series_uid=? ORDER BY received_at", (series_uid,))
        return [r["path"] for r in rows]

    def set_state(self, series_uid: str, state: SeriesState, now: float, reason: str = "") -> None:
        with self.db.transaction() as c:
            c.execute("UPDATE series SET state=?, reason=?, updated_at=? WHERE series_uid=?",
                      (state, reason, now, series_uid))

    def recent(self, limit: int = 50) -> list[dict]:
        return [dict(r) for r in self.db.query(
            "SELECT * FROM series ORDER BY last_received DESC LIMIT ?", (limit,))]
