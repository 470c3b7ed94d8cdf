"""Jobs: the one place where INFER and SEND jobs change state.

Transitions::

    queued --claim--> running --complete--> done
                         |--fail--------> failed            (permanent: bad input, model error)
                         |--retry-------> retrying --due--> running ...
                         |                   `--attempts exhausted--> dead   (SEND only)
    running --(crash, found at start)--> queued (INFER) | retrying (SEND)
    dead/failed --requeue (operator)--> queued

The series' state follows its jobs and is refreshed in the same
transaction as every job transition.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass
from typing import Any

from dicom_node.domain import JobKind, JobState, SeriesState
from dicom_node.store.database import Database

logger = logging.getLogger(__name__)

_ACTIVE = (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING)


@dataclass(frozen=True)
class Job:
    id: int
    kind: JobKind
    state: JobState
    series_uid: str
    rule: str
    model: str
    destination: str
    payload: dict[str, Any]
    priority: int
    attempts: int
    reason: str

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            id=row["id"], kind=JobKind(row["kind"]), state=JobState(row["state"]),
            series_uid=row["series_uid"], rule=row["rule"], model=row["model"],
            destination=row["destination"], payload=json.loads(row["payload"]),
            priority=row["priority"], attempts=row["attempts"], reason=row["reason"],
        )


class JobStore:
    """Job queue and state transitions over the state database.

    Parameters
    ----------
    db:
        The state database.
    max_infer_attempts:
        How many times an INFER job that was interrupted by a crash is
        started again before it is failed (a model that kills its worker
        every time must not loop forever).
    """

    def __init__(self, db: Database, max_infer_attempts: int = 3) -> None:
        self.db = db
        self.max_infer_attempts = max_infer_attempts

    # -- creation ----------------------------------------------------------
    def enqueue(self, kind: JobKind, series_uid: str, now: float, *, rule: str = "", model: str = "",
                destination: str = "", payload: dict[str, Any] | None = None, priority: int = 0) -> int:
        with self.db.transaction() as c:
            cur = c.execute(
                "INSERT INTO jobs (kind, state, series_uid, rule, model, destination, payload, priority,"
                " next_attempt_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (kind, JobState.QUEUED, series_uid, rule, model, destination,
                 json.dumps(payload or {}), priority, now, now, now),
            )
            job_id = int(cur.lastrowid or 0)
            self._refresh_series(c, series_uid, now)
        logger.info("Job %d: %s queued for series %s (%s)", job_id, kind, series_uid, model or destination)
        return job_id

    # -- transitions -------------------------------------------------------
    def claim(self, kind: JobKind, now: float) -> Job | None:
        """Take the most urgent due job of ``kind``: priority first, then oldest."""
        with self.db.transaction() as c:
            row = c.execute(
                "SELECT * FROM jobs WHERE kind=? AND state IN (?,?) AND next_attempt_at <= ?"
                " ORDER BY priority DESC, id LIMIT 1",
                (kind, JobState.QUEUED, JobState.RETRYING, now),
            ).fetchone()
            if row is None:
                return None
            c.execute("UPDATE jobs SET state=?, attempts=attempts+1, updated_at=? WHERE id=?",
                      (JobState.RUNNING, now, row["id"]))
            self._refresh_series(c, row["series_uid"], now)
            row = c.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone()
        return Job.from_row(row)

    def complete(self, job_id: int, now: float, *, payload: dict[str, Any] | None = None) -> None:
        self._set(job_id, JobState.DONE, now, "", payload=payload)

    def fail(self, job_id: int, reason: str, now: float) -> None:
        logger.error("Job %d failed: %s", job_id, reason)
        self._set(job_id, JobState.FAILED, now, reason)

    def retry_later(self, job_id: int, reason: str, now: float, next_attempt_at: float,
                    max_attempts: int) -> JobState:
        """Schedule another attempt, or declare the job dead when attempts are exhausted."""
        with self.db.transaction() as c:
            row = c.execute("SELECT attempts, series_uid FROM jobs WHERE id=?", (job_id,)).fetchone()
            state = JobState.DEAD if row["attempts"] >= max_attempts else JobState.RETRYING
            c.execute("UPDATE jobs SET state=?, reason=?, next_attempt_at=?, updated_at=? WHERE id=?",
                      (state, reason, next_attempt_at, now, job_id))
            self._refresh_series(c, row["series_uid"], now)
        if state is JobState.DEAD:
            logger.error("Job %d dead after %d attempts: %s", job_id, row["attempts"], reason)
        else:
            logger.warning("Job %d will be retried in %.0f s: %s", job_id, next_attempt_at - now, reason)
        return state

    def requeue(self, job_ids: list[int], now: float) -> int:
        """Operator action: put failed/dead jobs back in the queue with a fresh attempt count."""
        n = 0
        with self.db.transaction() as c:
            for job_id in job_ids:
                row = c.execute("SELECT series_uid, state FROM jobs WHERE id=?", (job_id,)).fetchone()
                if row is None or row["state"] not in (JobState.DEAD, JobState.FAILED):
                    continue
                c.execute("UPDATE jobs SET state=?, attempts=0, next_attempt_at=?, reason='', updated_at=?"
                          " WHERE id=?", (JobState.QUEUED, now, now, job_id))
                self._refresh_series(c, row["series_uid"], now)
                n += 1
        return n

    def recover(self, now: float) -> int:
        """At start: jobs left RUNNING by a crash go back to the queue (or fail when they keep crashing)."""
        with self.db.transaction() as c:
            rows = c.execute("SELECT id, kind, attempts, series_uid FROM jobs WHERE state=?",
                             (JobState.RUNNING,)).fetchall()
            for r in rows:
                if r["kind"] == JobKind.INFER and r["attempts"] >= self.max_infer_attempts:
                    c.execute("UPDATE jobs SET state=?, reason=?, updated_at=? WHERE id=?",
                              (JobState.FAILED, f"interrupted {r['attempts']} times (node or worker crash)",
                               now, r["id"]))
                else:
                    state = JobState.QUEUED if r["kind"] == JobKind.INFER else JobState.RETRYING
                    c.execute("UPDATE jobs SET state=?, next_attempt_at=?, updated_at=? WHERE id=?",
                              (state, now, now, r["id"]))
                self._refresh_series(c, r["series_uid"], now)
        if rows:
            logger.warning("Recovered %d job(s) left running by an earlier stop", len(rows))
        return len(rows)

    def supersede(self, series_uid: str, now: float) -> None:
        """A re-opened series: its queued work is obsolete and replaced by a new run."""
        with self.db.transaction() as c:
            c.execute("UPDATE jobs SET state=?, reason=?, updated_at=? WHERE series_uid=? AND state IN (?,?)",
                      (JobState.FAILED, "superseded: series received new instances", now, series_uid,
                       JobState.QUEUED, JobState.RETRYING))

    # -- queries -----------------------------------------------------------
    def get(self, job_id: int) -> Job | None:
        rows = self.db.query("SELECT * FROM jobs WHERE id=?", (job_id,))
        return Job.from_row(rows[0]) if rows else None

    def for_series(self, series_uid: str) -> list[Job]:
        return [Job.from_row(r) for r in self.db.query("SELECT * FROM jobs WHERE series_uid=? ORDER BY id",
                                                       (series_uid,))]

    def in_state(self, state: JobState) -> list[Job]:
        return [Job.from_row(r) for r in self.db.query("SELECT * FROM jobs WHERE state=? ORDER BY id", (state,))]

    def next_due(self, kind: JobKind) -> float | None:
        rows = self.db.query("SELECT MIN(next_attempt_at) AS t FROM jobs WHERE kind=? AND state IN (?,?)",
                             (kind, JobState.QUEUED, JobState.RETRYING))
        return rows[0]["t"]

    def counts(self) -> dict[tuple[str, str], int]:
        rows = self.db.query("SELECT kind, state, COUNT(*) AS n FROM jobs GROUP BY kind, state")
        return {(r["kind"], r["state"]): r["n"] for r in rows}

    # -- internals ---------------------------------------------------------
    def _set(self, job_id: int, state: JobState, now: float, reason: str,
             payload: dict[str, Any] | None = None) -> None:
        with self.db.transaction() as c:
            row = c.execute("SELECT series_uid FROM jobs WHERE id=?", (job_id,)).fetchone()
            if payload is None:
                c.execute("UPDATE jobs SET state=?, reason=?, updated_at=? WHERE id=?",
                          (state, reason, now, job_id))
            else:
                c.execute("UPDATE jobs SET state=?, reason=?, payload=?, updated_at=? WHERE id=?",
                          (state, reason, json.dumps(payload), now, job_id))
            self._refresh_series(c, row["series_uid"], now)

    @staticmethod
    def _refresh_series(c: sqlite3.Connection, series_uid: str, now: float) -> None:
        """Derive the series state from its jobs (only once it has left ``receiving``)."""
        series = c.execute("SELECT state FROM series WHERE series_uid=?", (series_uid,)).fetchone()
        if series is None or series["state"] in (SeriesState.RECEIVING, SeriesState.IGNORED):
            return
        rows = c.execute(
            "SELECT kind, state, reason FROM jobs WHERE series_uid=? AND reason NOT LIKE 'superseded%'",
            (series_uid,),
        ).fetchall()
        states = {(r["kind"], r["state"]) for r in rows}
        reasons = [r["reason"] for r in rows if r["state"] in (JobState.FAILED, JobState.DEAD) and r["reason"]]
        if (JobKind.INFER, JobState.RUNNING) in states:
            new = SeriesState.RUNNING
        elif (JobKind.INFER, JobState.QUEUED) in states:
            new = SeriesState.QUEUED
        elif any(k == JobKind.SEND and s in _ACTIVE for k, s in states):
            new = SeriesState.SENDING
        elif reasons:
            new = SeriesState.FAILED
        elif rows:
            new = SeriesState.DONE
        else:
            return
        c.execute("UPDATE series SET state=?, reason=?, updated_at=? WHERE series_uid=?",
                  (new, "; ".join(dict.fromkeys(reasons))[:1000], now, series_uid))
