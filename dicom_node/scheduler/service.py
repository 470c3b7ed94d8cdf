"""Scheduler: completion ticks, rule evaluation, INFER and SEND job execution.

Every step takes ``now`` so tests drive it without sleeping; in the running
node apscheduler calls :meth:`Pipeline.tick`, :meth:`Pipeline.drain_infer`
and :meth:`Pipeline.drain_send` on intervals.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread

from dicom_node.domain import JobKind, SeriesState, SeriesSummary
from dicom_node.errors import SendError
from dicom_node.rules.matcher import match
from dicom_node.rules.summary import attributes_from_dataset, never_process_reason
from dicom_node.scheduler.pipeline import InferOutcome, InferTask
from dicom_node.spool import Spool
from dicom_node.store import Database, Job, JobStore, SeriesStore

logger = logging.getLogger(__name__)


class InferRunner(Protocol):
    def run(self, task: InferTask, timeout_s: float) -> InferOutcome: ...


Sender = Callable[..., Any]


class Pipeline:
    """The node's flow after reception: complete -> match -> infer -> send.

    Parameters
    ----------
    settings:
        Node settings (completion, rules, destinations, send policy, outputs).
    db, spool:
        State database and spool.
    runner:
        Runs INFER tasks (a :class:`~dicom_node.scheduler.worker.WorkerProcess`).
    sender:
        ``send_files``-compatible callable delivering files to a DIMSE destination.
    """

    def __init__(self, settings: Any, db: Database, spool: Spool, runner: InferRunner, sender: Sender,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.series = SeriesStore(db)
        self.jobs = JobStore(db)
        self.runner = runner
        self.sender = sender
        self.on_event = on_event or (lambda name, data: None)

    # -- completion and rules ----------------------------------------------
    def tick(self, now: float) -> list[str]:
        """Complete quiet series and turn them into jobs (or ignore them, with the reason)."""
        completed = self.series.complete_quiet(now, self.settings.completion.quiet_seconds)
        for row in self.series.in_state(SeriesState.COMPLETE):
            self._dispatch(row, now)
        return completed

    def summary(self, row: dict[str, Any]) -> SeriesSummary:
        paths = self.series.instance_paths(row["series_uid"])
        first = dcmread(self.spool.absolute(paths[0]), stop_before_pixels=True)
        facts = {"instance_count": row["instance_count"], "calling_ae": row["calling_ae"],
                 "called_ae": row["called_ae"], "source_host": row["source_host"]}
        return SeriesSummary(row["study_uid"], row["series_uid"], attributes_from_dataset(first), facts)

    def _dispatch(self, row: dict[str, Any], now: float) -> None:
        series_uid = row["series_uid"]
        self.jobs.supersede(series_uid, now)
        try:
            summary = self.summary(row)
        except Exception as exc:
            self.series.set_state(series_uid, SeriesState.FAILED, now, f"cannot read series header: {exc}")
            return
        reason = never_process_reason(summary)
        if reason:
            logger.info("Series %s: ignored: %s", series_uid, reason)
            self.series.set_state(series_uid, SeriesState.IGNORED, now, reason)
            return
        matches = match(self.settings.rules, summary)
        if not matches:
            logger.info("Series %s: ignored: no rule matched", series_uid)
            self.series.set_state(series_uid, SeriesState.IGNORED, now, "no rule matched")
            return
        # The series leaves COMPLETE as its first job is queued (the job store derives the state).
        for m in matches:
            for model in m.models:
                self.jobs.enqueue(JobKind.INFER, series_uid, now, rule=m.rule, model=model,
                                  payload={"outputs": [str(o) for o in m.outputs],
                                           "destinations": list(m.destinations)})
            logger.info("Series %s: rule %s matched; models %s", series_uid, m.rule, ", ".join(m.models))
            self.on_event("rule_matched", {"series": series_uid, "rule": m.rule})

    # -- INFER ---------------------------------------------------------------
    def drain_infer(self, now_fn: Callable[[], float] = time.time, *, max_jobs: int | None = None,
                    should_stop: Callable[[], bool] = lambda: False, runner: InferRunner | None = None) -> int:
        """Run due INFER jobs one after another until none is left (or ``should_stop``).

        Several drains may run at once, each with its own ``runner`` (worker
        process): claiming a job is one database transaction.
        """
        done = 0
        while not should_stop() and (max_jobs is None or done < max_jobs):
            job = self.jobs.claim(JobKind.INFER, now_fn())
            if job is None:
                break
            self._run_infer(job, now_fn, runner or self.runner)
            done += 1
        return done

    def _run_infer(self, job: Job, now_fn: Callable[[], float], runner: InferRunner) -> None:
        paths = tuple(self.series.instance_paths(job.series_uid))
        task = InferTask(job.id, job.series_uid, job.model, paths, tuple(job.payload.get("outputs", ())))
        logger.info("Job %d: running model %s on series %s (%d instances)", job.id, job.model,
                    job.series_uid, len(paths))
        outcome = runner.run(task, self.settings.workers.infer_timeout_s)
        now = now_fn()
        self.on_event("infer_finished", {"model": job.model, "ok": outcome.ok, "seconds": outcome.seconds})
        if not outcome.ok:
            self.jobs.fail(job.id, outcome.error, now)
            return
        with self.db.transaction() as c:
            for obj in outcome.objects:
                c.execute(
                    "INSERT INTO results (sop_uid, source_series, model, kind, series_uid, path, created_at)"
                    " VALUES (?,?,?,?,?,?,?) ON CONFLICT(sop_uid) DO UPDATE SET path=excluded.path,"
                    " created_at=excluded.created_at",
                    (obj.sop_uid, job.series_uid, job.model, obj.kind, obj.series_uid, obj.path, now))
        files = [o.path for o in outcome.objects]
        findings = "; ".join(outcome.findings)
        result = {**job.payload, "files": files, "findings": outcome.findings, "notes": outcome.notes,
                  "model_version": outcome.model_version, "seconds": outcome.seconds}
        # SEND jobs first, then DONE: a crash in between re-runs the model, never loses a send.
        for dest in job.payload.get("destinations", []):
            if files:
                self.jobs.enqueue(JobKind.SEND, job.series_uid, now, rule=job.rule, model=job.model,
                                  destination=dest, payload={"files": files})
        self.jobs.complete(job.id, now, payload=result)
        logger.info("Job %d: model %s produced %s%s", job.id, job.model,
                    ", ".join(o.kind for o in outcome.objects) or "no objects",
                    f" ({findings})" if findings else "")

    # -- SEND ----------------------------------------------------------------
    def drain_send(self, now_fn: Callable[[], float] = time.time,
                   should_stop: Callable[[], bool] = lambda: False) -> int:
        done = 0
        while not should_stop():
            job = self.jobs.claim(JobKind.SEND, now_fn())
            if job is None:
                break
            self._run_send(job, now_fn)
            done += 1
        return done

    def backoff(self, attempts: int) -> float:
        """Exponential backoff with full jitter, capped at ``send.backoff_max_s``."""
        conf = self.settings.send
        base = min(conf.backoff_max_s, conf.backoff_initial_s * (2 ** max(0, attempts - 1)))
        return base / 2 + random.uniform(0, base / 2)

    def _run_send(self, job: Job, now_fn: Callable[[], float]) -> None:
        dest = self.settings.destinations.get(job.destination)
        if dest is None:
            self.jobs.fail(job.id, f"destination {job.destination!r} is no longer configured", now_fn())
            return
        files = [self.spool.absolute(p) for p in job.payload["files"]]
        missing = [str(f.name) for f in files if not Path(f).exists()]
        if missing:
            self.jobs.fail(job.id, f"result file(s) missing from the spool: {', '.join(missing)}", now_fn())
            return
        try:
            report = self.sender(files, ae_title=dest.ae_title, host=dest.host, port=dest.port,
                                 calling_ae_title=dest.calling_ae_title or self.settings.node.ae_title,
                                 timeout_s=dest.timeout_s)
        except SendError as exc:
            now = now_fn()
            if exc.retryable:
                self.jobs.retry_later(job.id, str(exc), now, now + self.backoff(job.attempts),
                                      self.settings.send.max_attempts)
            else:
                self.jobs.fail(job.id, str(exc), now)
            self.on_event("send_failed", {"destination": job.destination})
            return
        except Exception as exc:  # a bug or a broken file: keep the job, say why
            logger.exception("Job %d: sending to %s failed unexpectedly", job.id, job.destination)
            now = now_fn()
            self.jobs.retry_later(job.id, f"{type(exc).__name__}: {exc}", now, now + self.backoff(job.attempts),
                                  self.settings.send.max_attempts)
            return
        self.jobs.complete(job.id, now_fn())
        logger.info("Job %d: %d object(s) sent to %s", job.id, report.sent, job.destination)
        self.on_event("sent", {"destination": job.destination, "count": report.sent})

    def recover(self, now: float) -> None:
        """At start: clean the spool's temp files and re-queue interrupted jobs."""
        self.spool.clean_tmp()
        self.jobs.recover(now)
