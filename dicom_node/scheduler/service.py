"""Scheduler: completion ticks, rule evaluation, INFER and SEND job execution.

Every step takes ``now`` so tests drive it without sleeping; in the running
node apscheduler calls :meth:`Pipeline.tick`, :meth:`Pipeline.drain_infer`
and :meth:`Pipeline.drain_send` on intervals.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from pydicom.uid import UID

from dicom_node.domain import JobKind, OutputKind, SeriesState, SeriesSummary
from dicom_node.errors import SendError
from dicom_node.results.routing import SEG_SOP_CLASSES, Route, files_for, plan_outputs
from dicom_node.rules.matcher import match, needs_every_header, study_roles
from dicom_node.rules.summary import GeometryCache, never_process_reason, read_series
from dicom_node.scheduler.completion import SeriesCompletion
from dicom_node.scheduler.pipeline import InferOutcome, InferTask, ProducedObject, study_inputs
from dicom_node.scheduler.study import WAITING, StudyRules
from dicom_node.send import SendReport
from dicom_node.send.health import probe as echo_or_get
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from dicom_node.store import Database, Job, JobStore, SeriesStore

logger = logging.getLogger(__name__)


class InferRunner(Protocol):
    def run(self, task: InferTask, timeout_s: float,
            ready: Callable[[list[ProducedObject]], None] | None = None) -> InferOutcome: ...


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
        ``deliver(files, destination, node_ae_title) -> SendReport`` (see
        :func:`dicom_node.send.deliver.deliver`), raising ``SendError``.
    """

    def __init__(self, settings: Settings, db: Database, spool: Spool, runner: InferRunner, sender: Sender,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.series = SeriesStore(db)
        self.jobs = JobStore(db)
        self.runner = runner
        self.sender = sender
        self.on_event = on_event or (lambda name, data: None)
        # Rules may be replaced while running (Node.reload_rules): both read self.settings at each tick.
        self.completion = SeriesCompletion(lambda: self.settings, self.series, self.summary)
        self.studies = StudyRules(lambda: self.settings, db, self.series, self.jobs, self.summary, self._queue_rule)
        self._summaries: dict[tuple[str, int, float, bool], SeriesSummary] = {}
        self._geometry = GeometryCache()  # instances' geometry, read while their series arrive
        self._read_ahead: dict[str, tuple[int, bool]] = {}  # receiving series -> (instances read, wanted)
        self._every_header: tuple[object, bool] = (None, True)  # (the rules, whether they use a fact of every header)

    # -- completion and rules ----------------------------------------------
    def tick(self, now: float) -> list[str]:
        """Complete series (timers, C-FIND), turn them into jobs or ignore them (with the reason), run study rules."""
        completed = self.completion.complete(now)
        for uid in completed:
            self.on_event("series_completed", {"series": uid})
        for row in self.series.in_state(SeriesState.COMPLETE):
            if not row["reason"].startswith(WAITING):
                self._dispatch(row, now)
        self.studies.tick(now)
        return completed

    def receiving(self) -> list[tuple[str, list[str], bool]]:
        """Every series still receiving, for read-ahead: ``(series UID, instance paths in arrival order, wanted)``.

        Reads the geometry the rules' derived facts need of each instance not
        read before (when there are rules), so the series' summary at
        completion reads one header instead of every one.  ``wanted``: the rules match the series as far
        as it has arrived (or it is a series a study rule waits for), so its
        job is likely; its pixels are worth reading ahead.  A series they do
        not match yet (a fact such as ``instance_count`` not reached) is
        asked again at the next pass.
        """
        found = []
        seen = self._read_ahead
        rows = self.series.in_state(SeriesState.RECEIVING)
        for row in rows:
            uid = row["series_uid"]
            paths = self.series.instance_paths(uid)
            done, wanted = seen.get(uid, (0, False))
            if len(paths) == done or not self.settings.rules:  # no rules: no job will need it soon
                found.append((uid, paths, wanted))
                continue
            if self.needs_every_header():
                for path in self.spool.absolute_all(paths[max(1, done):]):  # the new ones (the first: the summary)
                    self._geometry.get(path)
            if not wanted and paths and self.settings.rules:  # once wanted, wanted (it is only a hint)
                try:
                    summary = self.summary(row)
                    wanted = not never_process_reason(summary) and bool(
                        match(self.settings.rules, summary) or study_roles(self.settings.rules, summary))
                except Exception as exc:  # noqa: BLE001 - an unreadable header is the completion's to report
                    logger.debug("Series %s: no summary for read-ahead (%s)", uid, exc)
            seen[uid] = (len(paths), wanted)
            found.append((uid, paths, wanted))
        live = {row["series_uid"] for row in rows}
        for uid in [u for u in seen if u not in live]:
            del seen[uid]
        return found

    def needs_every_header(self) -> bool:
        """Whether the rules use a fact read from every instance's header (worked out once per set of rules)."""
        rules = self.settings.rules
        if self._every_header[0] is not rules:
            self._every_header = (rules, needs_every_header(rules))
        return self._every_header[1]

    def summary(self, row: dict[str, Any]) -> SeriesSummary:
        """What the rules see of a series row: its first instance's attributes and derived facts.

        Reads the headers of every instance (without pixel data) when a rule
        uses a fact derived from them (``slice_spacing``, ``orientation``,
        ``image_type``, ``frames``), else the first instance's alone (about
        1 ms of the main process's CPU per instance less, at the completion
        or while the series arrives); cached per (series, instance count,
        last arrival, which of the two).
        """
        every_header = self.needs_every_header()
        key = (row["series_uid"], row["instance_count"], row["last_received"], every_header)
        cached = self._summaries.get(key)
        if cached is not None:
            return cached
        paths = self.series.instance_paths(row["series_uid"])
        attributes, facts = read_series(self.spool.absolute_all(paths if every_header else paths[:1]),
                                        self._geometry, every_header)
        facts.update({"instance_count": row["instance_count"], "calling_ae": row["calling_ae"],
                      "called_ae": row["called_ae"], "source_host": row["source_host"]})
        summary = SeriesSummary(row["study_uid"], row["series_uid"], attributes, facts)
        if len(self._summaries) >= 512:
            self._summaries.clear()
        self._summaries[key] = summary
        return summary

    def _dispatch(self, row: dict[str, Any], now: float) -> None:
        series_uid = row["series_uid"]
        self.jobs.supersede(series_uid, now)
        try:
            summary = self.summary(row)
        except Exception as exc:
            self.series.set_state(series_uid, SeriesState.FAILED, now, f"cannot read series header: {exc}")
            return
        finally:  # read ahead for this summary; a later one (a study rule, an instance more) reads the files
            self._geometry.forget(self.spool.absolute_all(self.series.instance_paths(series_uid)))
        reason = never_process_reason(summary)
        if reason:
            logger.info("Series %s: ignored: %s", series_uid, reason)
            self.series.set_state(series_uid, SeriesState.IGNORED, now, reason)
            self.on_event("series_ignored", {"series": series_uid, "reason": reason})
            return
        matches = match(self.settings.rules, summary)
        roles = study_roles(self.settings.rules, summary)
        if roles and not matches:
            waiting = f"{WAITING}: " + "; ".join(f"rule {r} (series {'/'.join(v)})" for r, v in roles.items())
            logger.info("Series %s: %s", series_uid, waiting)
            self.series.set_state(series_uid, SeriesState.COMPLETE, now, waiting)
            return
        if not matches:
            logger.info("Series %s: ignored: no rule matched", series_uid)
            self.series.set_state(series_uid, SeriesState.IGNORED, now, "no rule matched")
            self.on_event("series_ignored", {"series": series_uid, "reason": "no rule matched"})
            return
        # The series leaves COMPLETE as its first job is queued (the job store derives the state).
        rules = {r.name: r for r in self.settings.rules}
        for m in matches:
            self._queue_rule(series_uid, rules[m.rule], now, {})
            logger.info("Series %s: rule %s matched; models %s", series_uid, m.rule, ", ".join(m.models))
            self.on_event("rule_matched", {"series": series_uid, "rule": m.rule, "models": list(m.models)})

    def _queue_rule(self, series_uid: str, rule: Any, now: float, extra: dict[str, Any]) -> list[int]:
        """Queue one INFER job per model of ``rule`` on ``series_uid``, at the rule's priority."""
        produce, routes = plan_outputs([str(o) for o in rule.outputs], list(rule.send_to),
                                       self.settings.destinations, self.jobs.destinations_refusing_seg())
        return [self.jobs.enqueue(JobKind.INFER, series_uid, now, rule=rule.name, model=model,
                                  payload={"outputs": list(produce), "destinations": list(rule.send_to),
                                           "routes": {d: r.as_payload() for d, r in routes.items()}, **extra},
                                  priority=rule.job_priority)
                for model in rule.run]

    # -- INFER ---------------------------------------------------------------
    def drain_infer(self, now_fn: Callable[[], float] = time.time, *, max_jobs: int | None = None,
                    should_stop: Callable[[], bool] = lambda: False, runner: InferRunner | None = None,
                    leave: Callable[[str, float], bool] | None = None) -> int:
        """Run due INFER jobs one after another until none is left (or ``should_stop``).

        Several drains may run at once, each with its own ``runner`` (worker
        process): claiming a job is one database transaction.  ``leave(series
        UID, due since)``: jobs this drain leaves to another (see
        :meth:`JobStore.claim`).
        """
        done = 0
        while not should_stop() and (max_jobs is None or done < max_jobs):
            job = self.jobs.claim(JobKind.INFER, now_fn(), leave=leave)
            if job is None:
                break
            self._run_infer(job, now_fn, runner or self.runner)
            done += 1
        return done

    def _run_infer(self, job: Job, now_fn: Callable[[], float], runner: InferRunner) -> None:
        taken = now_fn()
        paths = tuple(self.series.instance_paths(job.series_uid))
        inputs = study_inputs(job.series_uid, job.payload.get("inputs") or {}, self.series.instance_paths)
        earlier = self.db.query("SELECT sop_uid FROM results WHERE source_series=? AND model=?",
                                (job.series_uid, job.model))
        rule = next((r for r in self.settings.rules if r.name == job.rule), None)
        task = InferTask(job.id, job.series_uid, job.model, paths, tuple(job.payload.get("outputs", ())),
                         inputs=inputs, rule=job.rule, replaces=tuple(r["sop_uid"] for r in earlier),
                         channels=self.settings.channels_for(rule, job.model) if inputs else (),
                         gpu_out_of_memory=self.settings.workers.gpu_out_of_memory)
        logger.info("Job %d: running model %s on series %s (%d instances)", job.id, job.model,
                    job.series_uid, len(paths))
        sent_early: dict[str, set[str]] = {}  # destination -> files whose SEND job is queued already
        handed = now_fn()
        outcome = runner.run(task, self.settings.workers.infer_timeout_s,
                             ready=lambda objects: self._send_early(job, objects, now_fn(), sent_early))
        now = now_fn()
        self.on_event("infer_finished", {"model": job.model, "ok": outcome.ok, "seconds": outcome.seconds,
                                         "series": job.series_uid, "job": job.id,
                                         "version": outcome.model_version, "error": outcome.error,
                                         "objects": [{"kind": o.kind, "sop_uid": o.sop_uid,
                                                      "series_uid": o.series_uid} for o in outcome.objects]})
        if not outcome.ok:
            workers = self.settings.workers
            if outcome.interrupted:  # an actor or its machine was lost: run it again (elsewhere), bounded
                self.jobs.retry_later(job.id, outcome.error, now, now, max_attempts=self.jobs.max_infer_attempts)
                return
            if outcome.out_of_memory and workers.gpu_out_of_memory == "retry" \
                    and job.attempts < self.jobs.max_infer_attempts:
                # The GPU is shared: another model's memory may be free in a while. Counted as an attempt.
                self.jobs.retry_later(job.id, outcome.error, now, now + workers.gpu_retry_s,
                                      max_attempts=self.jobs.max_infer_attempts)
                return
            if sent_early:
                logger.warning("Job %d failed after %d of its objects were queued for sending to %s (they stand: "
                               "the failure came after them): %s", job.id, len(set().union(*sent_early.values())),
                               ", ".join(sorted(sent_early)), outcome.error)
            self.jobs.fail(job.id, outcome.error, now)
            return
        files = [o.path for o in outcome.objects]
        findings = "; ".join(outcome.findings)
        result = {**job.payload, "files": files, "findings": outcome.findings, "notes": outcome.notes,
                  "model_version": outcome.model_version, "seconds": outcome.seconds,
                  "prefetched": outcome.prefetched,
                  # Where the job's time went outside the worker's own steps (epoch seconds): taken from the
                  # queue, handed to the worker (its inputs listed), back from it.
                  "timeline": {"taken": taken, "handed": handed, "returned": now}}
        # Result rows, SEND jobs and DONE in one transaction: a crash re-runs the model or finds all three.
        sends = self._send_payloads(job, outcome.objects, sent_early)
        self.jobs.complete_with(job.id, now, payload=result, sends=sends,
                                also=lambda c: self._insert_results(c, job, outcome.objects, now))
        if sends:  # the node's send loop goes now, not after this worker's next jobs or its next interval
            self.on_event("results_ready", {"series": job.series_uid, "job": job.id, "model": job.model})
        logger.info("Job %d: model %s produced %s%s", job.id, job.model,
                    ", ".join(o.kind for o in outcome.objects) or "no objects",
                    f" ({findings})" if findings else "")

    def _record_results(self, job: Job, objects: Sequence[ProducedObject], now: float) -> None:
        with self.db.transaction() as c:
            self._insert_results(c, job, objects, now)

    @staticmethod
    def _insert_results(c: sqlite3.Connection, job: Job, objects: Sequence[ProducedObject], now: float) -> None:
        for obj in objects:
            c.execute(
                "INSERT INTO results (sop_uid, source_series, model, kind, series_uid, path, created_at)"
                " VALUES (?,?,?,?,?,?,?) ON CONFLICT(sop_uid) DO UPDATE SET path=excluded.path,"
                " created_at=excluded.created_at",
                (obj.sop_uid, job.series_uid, job.model, obj.kind, obj.series_uid, obj.path, now))

    def _send_payloads(self, job: Job, objects: Sequence[ProducedObject], sent_early: dict[str, set[str]],
                       early: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """``(destination, SEND payload)`` for each destination that gets some of ``objects``.

        Files in ``sent_early`` (per destination) are left out.  A SEG sent to
        a destination with a ``seg_fallback`` carries its fallback: the
        overlay files when the job makes them up front (the destination is
        known to refuse the SEG), otherwise none, and the overlay series is
        rendered by a job of its own on a first refusal.  ``early``: the job
        is still running; a destination whose fallback files the job makes is
        left out (they do not exist yet: it gets its files with the rest).
        """
        produced = [(o.kind, o.path) for o in objects]
        outputs = set(job.payload.get("outputs", ()))
        out: list[tuple[str, dict[str, Any]]] = []
        for dest in job.payload.get("destinations", []):
            route = job.payload.get("routes", {}).get(dest)
            plan = Route.from_payload(route) if route else None
            if early and plan is not None and plan.seg_fallback and plan.seg_fallback in outputs:
                continue
            dest_files, fallback = files_for(plan, produced) if plan else ([p for _, p in produced], [])
            dest_files = [f for f in dest_files if f not in sent_early.get(dest, ())]
            sends_seg = any(k == OutputKind.SEG.value and p in dest_files for k, p in produced)
            extra: dict[str, Any] = {}
            if plan and plan.seg_fallback and sends_seg:
                # Overlay files when produced up front; otherwise rendered on a first refusal.
                extra = {"fallback": {"seg": fallback, "kind": plan.seg_fallback}}
            if dest_files:
                out.append((dest, {"files": dest_files, **extra}))
        return out

    def _send_early(self, job: Job, objects: list[ProducedObject], now: float,
                    sent_early: dict[str, set[str]]) -> None:
        """Queue the SEND of objects a running job has finished (its SEG, its SR, overlay batches) at once.

        A destination whose route sends an overlay series instead of a refused
        SEG (``seg_fallback``) waits for the whole job when the job makes that
        series up front (the SEG's SEND job carries those files); otherwise
        its SEG goes early too, with the same fallback as at the job's end (an
        overlay series rendered on a first refusal).  What is queued here is
        left out of the job's last SEND jobs (``sent_early``).  Never raises:
        on any error the objects simply go with the rest at the end.
        """
        try:
            self._record_results(job, objects, now)
            for dest, payload in self._send_payloads(job, objects, sent_early, early=True):
                self.jobs.enqueue(JobKind.SEND, job.series_uid, now, rule=job.rule, model=job.model,
                                  destination=dest, payload=payload)
                sent_early.setdefault(dest, set()).update(payload["files"])
        except Exception:
            logger.exception("Job %d: queuing its first results early failed; they go with the rest", job.id)
            return
        if sent_early:
            logger.info("Job %d: %d object(s) (%s) queued for sending while the rest is made", job.id,
                        len(objects), ", ".join(dict.fromkeys(o.kind for o in objects)))
            self.on_event("results_ready", {"series": job.series_uid, "job": job.id, "model": job.model})

    # -- SEND ----------------------------------------------------------------
    def drain_send(self, now_fn: Callable[[], float] = time.time,
                   should_stop: Callable[[], bool] = lambda: False) -> int:
        """Send due SEND jobs one after another until none is left (or ``should_stop``).

        After a retryable failure the rest of that destination's jobs wait
        for their own next attempt (or for the destination's health check)
        instead of each timing out in this loop.
        """
        done = 0
        down: set[str] = set()
        while not should_stop():
            job = self.jobs.claim(JobKind.SEND, now_fn(), skip_destinations=down)
            if job is None:
                break
            if not self._run_send(job, now_fn):
                down.add(job.destination)
            done += 1
        return done

    def check_destinations(self, now: float, probe: Callable[[Any, str], str] | None = None) -> list[str]:
        """Probe the destinations that have SEND jobs waiting; make their jobs due when they answer.

        Parameters
        ----------
        now:
            Current time (seconds since the epoch).
        probe:
            ``probe(destination, node_ae_title) -> reason`` (``""`` = answers);
            default :func:`dicom_node.send.health.probe` (C-ECHO or HTTP GET).

        Returns
        -------
        list of str
            The destinations that answered and whose jobs are now due.
        """

        check = probe or echo_or_get
        back: list[str] = []
        for name in self.jobs.waiting_destinations(now):
            dest = self.settings.destinations.get(name)
            if dest is None or check(dest, self.settings.node.ae_title):
                continue
            n = self.jobs.release(name, now)
            if n:
                logger.info("Destination %s answers again: %d waiting job(s) due now", name, n)
                back.append(name)
        return back

    def backoff(self, attempts: int) -> float:
        """Exponential backoff with full jitter, capped at ``send.backoff_max_s``."""
        conf = self.settings.send
        base = min(conf.backoff_max_s, conf.backoff_initial_s * (2 ** max(0, attempts - 1)))
        return base / 2 + random.uniform(0, base / 2)

    def _run_send(self, job: Job, now_fn: Callable[[], float]) -> bool:
        """Deliver one SEND job; ``False`` when the destination failed in a way worth retrying."""
        dest = self.settings.destinations.get(job.destination)
        if dest is None:
            self.jobs.bury(job.id, f"destination {job.destination!r} is no longer configured", now_fn())
            return True
        files = [self.spool.absolute(p) for p in job.payload["files"]]
        has_fallback = "fallback" in job.payload
        fallback = [self.spool.absolute(p) for p in job.payload.get("fallback", {}).get("seg", [])]
        missing = [str(f.name) for f in [*files, *fallback] if not Path(f).exists()]
        if missing:
            self.jobs.fail(job.id, f"result file(s) missing from the spool: {', '.join(missing)}", now_fn())
            return True
        conf = self.settings.send
        # Objects an earlier attempt got confirmed are not sent again (the SEG fallback's first send excepted:
        # what was refused there decides what follows, so it is always sent whole).
        confirmed = set(job.payload.get("confirmed", [])) if not has_fallback else set()
        relative = dict(zip(files, job.payload["files"]))
        remaining = [f for f in files if relative[f] not in confirmed]
        try:
            if has_fallback:
                report = self.sender(files, dest, self.settings.node.ae_title, skip_refused=True)
                note = self._send_seg_fallback(job, dest, report, fallback, now_fn())
            elif remaining:
                report, note = self.sender(remaining, dest, self.settings.node.ae_title), None
            else:
                report, note = SendReport(sent=0), None
        except SendError as exc:
            now = now_fn()
            stored = {relative[f] for f in exc.stored if f in relative} if not has_fallback else set()
            payload = {**job.payload, "confirmed": sorted(confirmed | stored)} if stored - confirmed else None
            if exc.retryable:
                if payload is not None:
                    logger.info("Job %d: %d of its %d object(s) confirmed by %s so far; the next attempt sends "
                                "the rest", job.id, len(payload["confirmed"]), len(files), job.destination)
                self.jobs.retry_later(job.id, str(exc), now, now + self.backoff(job.attempts),
                                      conf.max_attempts, conf.max_age_hours * 3600, payload=payload)
            else:
                self.jobs.bury(job.id, str(exc), now)
            self.on_event("send_failed", {"destination": job.destination, "series": job.series_uid,
                                          "job": job.id, "reason": str(exc)})
            return not exc.retryable
        except Exception as exc:  # a bug or a broken file: keep the job, say why
            logger.exception("Job %d: sending to %s failed unexpectedly", job.id, job.destination)
            now = now_fn()
            self.jobs.retry_later(job.id, f"{type(exc).__name__}: {exc}", now, now + self.backoff(job.attempts),
                                  conf.max_attempts, conf.max_age_hours * 3600)
            return True
        self.jobs.complete(job.id, now_fn(), payload={**job.payload, "seg_fallback": note} if note else None)
        logger.info("Job %d: %d object(s) sent to %s%s%s%s", job.id, report.sent, job.destination,
                    f" ({len(files) - len(remaining)} more confirmed by an earlier attempt)"
                    if len(remaining) < len(files) and not has_fallback else "",
                    f", {len(report.warnings)} with warnings" if report.warnings else "",
                    f", {report.transcoded} transcoded" if report.transcoded else "")
        self.on_event("sent", {"destination": job.destination, "count": report.sent,
                               "series": job.series_uid, "job": job.id, "files": list(job.payload["files"])})
        return True

    def _send_seg_fallback(self, job: Job, dest: Any, report: Any, fallback: list[Path],
                           now: float) -> dict[str, Any] | None:
        """After a send that skipped refused SOP classes: send the overlay instead of a refused SEG.

        When the overlay was not produced up front (the destination was not
        known to refuse the SEG), an INFER job of the same rule and model is
        queued that renders only the overlay series and sends it here; later
        series for this destination get their overlay produced with the SEG.

        Returns what was done, recorded in the job's payload (``None`` when nothing was refused).

        Raises
        ------
        SendError
            Permanent when the destination refused another SOP class than SEG
            (no fallback exists for it); as the sender for the fallback send.
        """
        refused = set(report.refused)
        if not refused:
            return None
        others = sorted(refused - SEG_SOP_CLASSES)
        if others:
            names = ", ".join(UID(uid).name for uid in others)
            raise SendError(f"{job.destination} does not accept {names} (refused in association negotiation): "
                            "configure it to store this SOP class, or remove the kind from its outputs",
                            retryable=False)
        if not fallback:
            kind = job.payload["fallback"].get("kind", OutputKind.SC.value)
            render = self.jobs.enqueue(
                JobKind.INFER, job.series_uid, now, rule=job.rule, model=job.model,
                payload={"outputs": [kind], "destinations": [job.destination],
                         "routes": {job.destination: Route((kind,), None).as_payload()}})
            logger.warning("Job %d: %s refused the SEG SOP class in association negotiation; job %d renders "
                           "the overlay series to send instead", job.id, job.destination, render)
            self.on_event("seg_fallback", {"destination": job.destination, "series": job.series_uid,
                                           "job": job.id, "count": 0})
            return {"refused": sorted(refused), "sent_instead": kind, "rendering_job": render}
        sent = self.sender(fallback, dest, self.settings.node.ae_title)
        logger.warning("Job %d: %s refused the SEG SOP class in association negotiation; sent the overlay "
                       "series instead (%d images)", job.id, job.destination, sent.sent)
        self.on_event("seg_fallback", {"destination": job.destination, "series": job.series_uid, "job": job.id,
                                       "count": sent.sent})
        return {"refused": sorted(refused), "sent_instead": "sc", "count": sent.sent,
                "files": list(job.payload["fallback"]["seg"])}

    def recover(self, now: float) -> None:
        """At start: clean the spool's temp files and re-queue interrupted jobs."""
        self.spool.clean_tmp()
        self.jobs.recover(now)
