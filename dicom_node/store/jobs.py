"""Jobs: the one place where INFER and SEND jobs change state.

Transitions::

    queued --claim--> running --complete--> done
                         |--fail--------> failed            (permanent: bad input, model error)
                         |--bury--------> dead              (SEND refused for good: the dead letter)
                         |--retry-------> retrying --due--> running ...
                         |                   `--attempts or age exhausted--> dead   (SEND only)
    retrying --release (destination answers again)--> retrying, due now
    running --(crash, found at start)--> queued (INFER) | retrying (SEND)
    dead/failed --requeue (operator)--> queued

SEND jobs form the outbox.  The issue's words for their states are shown by
``dicom-node status`` (:func:`state_label`): running = *sending*, done =
*sent*, retrying = *failed-retrying*; queued and dead keep their names.

Exactly once: a SEND job is marked done only after the destination confirmed
every object, and a job found ``running`` at start (the node was killed while
sending) is sent again.  Result UIDs are deterministic, so a repeated send
overwrites the copy the destination may already hold instead of adding one.

The series' state follows its jobs and is refreshed in the same
transaction as every job transition.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from dicom_node.domain import JobKind, JobState, SeriesState
from dicom_node.store.database import Database

logger = logging.getLogger(__name__)

_ACTIVE = (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING)
#: Due jobs a claim with ``leave`` looks through, in order, for one to take.
_LOOK_AHEAD = 32

#: How ``dicom-node status`` names SEND job states (the outbox's vocabulary).
SEND_STATE_LABELS: dict[JobState, str] = {
    JobState.RUNNING: "sending",
    JobState.DONE: "sent",
    JobState.RETRYING: "failed-retrying",
}


def state_label(kind: JobKind | str, state: JobState | str) -> str:
    """The state as shown to operators: SEND jobs use the outbox's words (sending, sent, failed-retrying)."""
    if kind == JobKind.SEND:
        return SEND_STATE_LABELS.get(JobState(state), str(state))
    return str(state)


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
    next_attempt_at: float = 0.0
    created_at: float = 0.0

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            id=row["id"], kind=JobKind(row["kind"]), state=JobState(row["state"]),
            series_uid=row["series_uid"], rule=row["rule"], model=row["model"],
            destination=row["destination"], payload=json.loads(row["payload"]),
            priority=row["priority"], attempts=row["attempts"], reason=row["reason"],
            next_attempt_at=row["next_attempt_at"], created_at=row["created_at"],
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
        """Queue a job; returns its id.

        A SEND job identical to one still waiting in the outbox (same series,
        model, destination and payload, state queued or retrying) is not
        queued twice: the waiting job is made due now and its id returned.
        This happens when an INFER job is re-run after a crash between
        queuing its sends and completing.
        """
        with self.db.transaction() as c:
            job_id = self._enqueue(c, kind, series_uid, now, rule=rule, model=model, destination=destination,
                                   payload=payload, priority=priority)
        if job_id < 0:
            return -job_id
        logger.info("Job %d: %s queued for series %s (%s)", job_id, kind, series_uid, model or destination)
        return job_id

    def complete_with(self, job_id: int, now: float, *, payload: dict[str, Any] | None = None,
                      sends: Sequence[tuple[str, dict[str, Any]]] = (),
                      also: Callable[[sqlite3.Connection], None] | None = None) -> list[int]:
        """Complete an INFER job, queue its SEND jobs and whatever ``also`` writes, in one transaction.

        ``sends`` are ``(destination, payload)``; each SEND job takes the
        job's series, rule and model (a twin still waiting is made due, as
        :meth:`enqueue` does).  ``also(connection)`` runs first in the same
        transaction (the job's result rows).  All of it is committed together
        or not at all: a crash leaves the job running (re-run at the next
        start) or done with its sends queued, never one without the other.
        Returns the SEND jobs' ids.
        """
        with self.db.transaction() as c:
            if also is not None:
                also(c)
            row = c.execute("SELECT series_uid, rule, model FROM jobs WHERE id=?", (job_id,)).fetchone()
            ids = [self._enqueue(c, JobKind.SEND, row["series_uid"], now, rule=row["rule"], model=row["model"],
                                 destination=destination, payload=send) for destination, send in sends]
            self._set_in(c, job_id, JobState.DONE, now, "", payload)
        for send_id, (destination, _) in zip(ids, sends):
            if send_id > 0:
                logger.info("Job %d: %s queued for series %s (%s)", send_id, JobKind.SEND, row["series_uid"],
                            destination)
        return [abs(i) for i in ids]

    def _enqueue(self, c: sqlite3.Connection, kind: JobKind, series_uid: str, now: float, *, rule: str = "",
                 model: str = "", destination: str = "", payload: dict[str, Any] | None = None,
                 priority: int = 0) -> int:
        """:meth:`enqueue` inside a transaction; a twin made due is returned as its id negated."""
        text = json.dumps(payload or {})
        if kind == JobKind.SEND:
            twin = c.execute(
                "SELECT id FROM jobs WHERE kind=? AND state IN (?,?) AND series_uid=? AND model=?"
                " AND destination=? AND payload=? ORDER BY id LIMIT 1",
                (kind, JobState.QUEUED, JobState.RETRYING, series_uid, model, destination, text),
            ).fetchone()
            if twin is not None:
                c.execute("UPDATE jobs SET next_attempt_at=MIN(next_attempt_at, ?), updated_at=? WHERE id=?",
                          (now, now, twin["id"]))
                logger.info("Job %d: already in the outbox for %s; not queued twice", twin["id"], destination)
                return -int(twin["id"])
        cur = c.execute(
            "INSERT INTO jobs (kind, state, series_uid, rule, model, destination, payload, priority,"
            " next_attempt_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (kind, JobState.QUEUED, series_uid, rule, model, destination,
             text, priority, now, now, now),
        )
        self._refresh_series(c, series_uid, now)
        return int(cur.lastrowid or 0)

    # -- transitions -------------------------------------------------------
    def claim(self, kind: JobKind, now: float, *, skip_destinations: Collection[str] = (),
              leave: Callable[[str, float], bool] | None = None) -> Job | None:
        """Take the most urgent due job of ``kind``: priority first, then oldest.

        ``skip_destinations`` leaves the jobs of those destinations where they
        are (a send loop skips a destination that just failed).  ``leave(series
        UID, due since)`` leaves a job for another taker (a worker that read
        its series ahead); the next one in order is taken instead.
        """
        skip = sorted(skip_destinations)
        marks = ",".join("?" * len(skip))
        with self.db.transaction() as c:
            rows = c.execute(
                "SELECT * FROM jobs WHERE kind=? AND state IN (?,?) AND next_attempt_at <= ?"
                + (f" AND destination NOT IN ({marks})" if skip else "")
                + " ORDER BY priority DESC, id LIMIT ?",
                (kind, JobState.QUEUED, JobState.RETRYING, now, *skip, 1 if leave is None else _LOOK_AHEAD),
            ).fetchall()
            row = next((r for r in rows if leave is None or not leave(r["series_uid"], r["next_attempt_at"])),
                       None)
            if row is None:
                return None
            c.execute("UPDATE jobs SET state=?, attempts=attempts+1, updated_at=? WHERE id=?",
                      (JobState.RUNNING, now, row["id"]))
            self._refresh_series(c, row["series_uid"], now)
            row = c.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone()
        return Job.from_row(row)

    def complete(self, job_id: int, now: float, *, payload: dict[str, Any] | None = None) -> None:
        self._set(job_id, JobState.DONE, now, "", payload=payload)

    def note_running(self, job_id: int, where: str, now: float) -> None:
        """Say where a running job runs (its reason: a Ray actor and its machine); no state change."""
        with self.db.transaction() as c:
            c.execute("UPDATE jobs SET reason=?, updated_at=? WHERE id=? AND state=?",
                      (where[:500], now, job_id, JobState.RUNNING))

    def fail(self, job_id: int, reason: str, now: float) -> None:
        logger.error("Job %d failed: %s", job_id, reason)
        self._set(job_id, JobState.FAILED, now, reason)

    def retry_later(self, job_id: int, reason: str, now: float, next_attempt_at: float,
                    max_attempts: int, max_age_s: float | None = None,
                    payload: dict[str, Any] | None = None) -> JobState:
        """Schedule another attempt, or declare the job dead when attempts or time are exhausted.

        Parameters
        ----------
        max_attempts:
            Attempts after which the job is dead.
        max_age_s:
            Seconds after its creation (or after an operator's requeue) after
            which the job is dead, whatever its attempt count; ``None``: no limit.
        payload:
            The job's payload from now on (a SEND job's objects confirmed so far), or ``None``: unchanged.

        Returns
        -------
        JobState
            ``RETRYING`` or ``DEAD``.
        """
        with self.db.transaction() as c:
            row = c.execute("SELECT attempts, series_uid, created_at, payload FROM jobs WHERE id=?",
                            (job_id,)).fetchone()
            since = float(json.loads(row["payload"]).get("since", row["created_at"]))
            too_old = max_age_s is not None and now - since >= max_age_s
            state = JobState.DEAD if row["attempts"] >= max_attempts or too_old else JobState.RETRYING
            if state is JobState.DEAD:
                limit = f"{row['attempts']} attempt(s)" if not too_old else f"{(now - since) / 3600:.1f} h"
                reason = f"gave up after {limit}: {reason}"
            c.execute("UPDATE jobs SET state=?, reason=?, next_attempt_at=?, updated_at=? WHERE id=?",
                      (state, reason, next_attempt_at, now, job_id))
            if payload is not None:
                c.execute("UPDATE jobs SET payload=? WHERE id=?", (json.dumps(payload), job_id))
            self._refresh_series(c, row["series_uid"], now)
        if state is JobState.DEAD:
            logger.error("Job %d dead: %s", job_id, reason)
        else:
            logger.warning("Job %d will be retried in %.0f s: %s", job_id, next_attempt_at - now, reason)
        return state

    def bury(self, job_id: int, reason: str, now: float) -> None:
        """Dead-letter a SEND job at once: the destination refused it for good.

        It stays visible with its reason (``dicom-node status``) until an
        operator fixes the cause and queues it again (:meth:`requeue`).
        """
        logger.error("Job %d dead: %s", job_id, reason)
        self._set(job_id, JobState.DEAD, now, reason)

    def requeue(self, job_ids: list[int], now: float) -> int:
        """Operator action: put failed/dead jobs back in the queue with a fresh attempt count.

        A SEND job's age limit counts again from now (``since`` in its payload).
        """
        n = 0
        with self.db.transaction() as c:
            for job_id in job_ids:
                row = c.execute("SELECT series_uid, state, kind, payload FROM jobs WHERE id=?",
                                (job_id,)).fetchone()
                if row is None or row["state"] not in (JobState.DEAD, JobState.FAILED):
                    continue
                payload = json.loads(row["payload"])
                if row["kind"] == JobKind.SEND:
                    payload["since"] = now
                c.execute("UPDATE jobs SET state=?, attempts=0, next_attempt_at=?, reason='', payload=?,"
                          " updated_at=? WHERE id=?", (JobState.QUEUED, now, json.dumps(payload), now, job_id))
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

    def release(self, destination: str, now: float) -> int:
        """Make the SEND jobs waiting for ``destination`` due now (it answers again); returns how many."""
        with self.db.transaction() as c:
            cur = c.execute("UPDATE jobs SET next_attempt_at=?, updated_at=? WHERE kind=? AND state=?"
                            " AND destination=? AND next_attempt_at > ?",
                            (now, now, JobKind.SEND, JobState.RETRYING, destination, now))
            n = cur.rowcount
        return n

    def waiting_destinations(self, now: float) -> list[str]:
        """Destinations with SEND jobs waiting for a later retry (not yet due)."""
        rows = self.db.query("SELECT DISTINCT destination FROM jobs WHERE kind=? AND state=? AND next_attempt_at > ?"
                             " ORDER BY destination", (JobKind.SEND, JobState.RETRYING, now))
        return [r["destination"] for r in rows]

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

    def destinations_refusing_seg(self) -> set[str]:
        """Destinations whose SEND jobs recorded a refused SEG (``seg_fallback`` in the payload)."""
        rows = self.db.query("SELECT DISTINCT destination FROM jobs WHERE kind=? AND payload LIKE ?",
                             (JobKind.SEND, '%"sent_instead"%'))
        return {r["destination"] for r in rows}

    def counts(self) -> dict[tuple[str, str], int]:
        rows = self.db.query("SELECT kind, state, COUNT(*) AS n FROM jobs GROUP BY kind, state")
        return {(r["kind"], r["state"]): r["n"] for r in rows}

    # -- internals ---------------------------------------------------------
    def _set(self, job_id: int, state: JobState, now: float, reason: str,
             payload: dict[str, Any] | None = None) -> None:
        with self.db.transaction() as c:
            self._set_in(c, job_id, state, now, reason, payload)

    def _set_in(self, c: sqlite3.Connection, job_id: int, state: JobState, now: float, reason: str,
                payload: dict[str, Any] | None = None) -> None:
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
