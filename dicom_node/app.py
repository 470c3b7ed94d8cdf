"""Composition root: builds every object of a running node and owns its lifecycle.

Reading order of the pipeline::

    receive (C-STORE -> spool + store)  ->  tick (quiet series complete)
      -> rules (match)  ->  INFER jobs (worker process: imaging -> model -> SEG/SR)
      -> SEND jobs (C-STORE back to the PACS)

Shutdown: the first SIGTERM/SIGINT stops intake (the DICOM listener closes),
lets the running job finish (up to ``workers.shutdown_grace_s``), and
stops; a second signal forces an immediate stop.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.domain import JobKind, JobState, SeriesState
from dicom_node.errors import ConfigError, StartupError
from dicom_node.heap import freeze_startup_objects
from dicom_node.http.metrics import Metrics
from dicom_node.http.server import HttpServer
from dicom_node.http.status import render_status
from dicom_node.http.thumbnail import get_thumbnail
from dicom_node.receive.handlers import StoreHandler
from dicom_node.receive.journal import replay_orphans
from dicom_node.receive.pool import ReceiverPool, receiver_count
from dicom_node.receive.server import Receiver
from dicom_node.scheduler.ray_engine import RayEngine, RayRunner, describe_cluster, infer_queue
from dicom_node.scheduler.retention import Retention
from dicom_node.scheduler.service import Pipeline
from dicom_node.scheduler.worker import WorkerProcess, WorkerStopped, leave_to_reader, worker_gpus
from dicom_node.send.deliver import deliver
from dicom_node.settings import Settings, load_settings
from dicom_node.spool import Spool
from dicom_node.spool.reconcile import reconcile
from dicom_node.store import SeriesStore, open_database
from dicom_node.store.audit import AuditEvent, AuditLog
from dicom_node.store.layout import NodeLock, state_paths, storage_problem
from dicom_node.systemd_notify import sd_notify, watchdog_interval
from dicom_node.tcp import listen_error

logger = logging.getLogger(__name__)

#: Seconds between read-ahead passes while series arrive (headers here, pixels in idle workers: prefetch_mb).
#: Short enough that the worker is told of the last instances before a series completes by C-FIND at release.
_PREFETCH_INTERVAL_S = 0.2


class ForcedShutdown(Exception):
    """A second stop signal arrived while the node was finishing its work."""


class Node:
    """A running dicom-node.

    Parameters
    ----------
    settings:
        Validated settings.
    clock:
        Current time in seconds since the epoch (a parameter for tests).
    config_path:
        The configuration file, re-read on SIGHUP to reload the rules.
    """

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time,
                 config_path: Path | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.config_path = config_path
        self._config_stamp = _file_stamp(config_path)
        root, db_path = state_paths(settings.storage)
        self.lock = _claim_state(root)
        try:
            self.db = open_database(db_path, settings.storage.database_busy_timeout_s)
        except StartupError:
            self.lock.release()
            raise
        self.spool = Spool(root)
        self.metrics = Metrics()
        self.audit = AuditLog(self.db, clock)
        self._receiving: set[str] = set()  # series whose arrival is in the audit trail
        self.store_handler = StoreHandler(self.spool, self._series_store(), settings.storage.min_free_mb,
                                          clock=clock, on_recorded=self._on_recorded,
                                          on_released=self._on_released)
        self.receiver: Receiver | ReceiverPool
        receivers = receiver_count(settings.node.receivers)
        if receivers > 1:
            self.receiver = ReceiverPool(settings, receivers, on_recorded=self._on_recorded,
                                         on_association=self._on_association, on_released=self._on_released)
        else:
            self.receiver = Receiver(settings.node, self.store_handler, on_association=self._on_association)
        self.ray: RayEngine | None = None
        self.workers: list[Any]
        if settings.workers.engine == "ray":
            # Models run as Ray actors; each runner loads and encodes one job at a time in this process.
            self.ray = RayEngine(settings, on_placed=lambda job, where: self.pipeline.jobs.note_running(
                job, where, self.clock()))
            self.workers = [RayRunner(self.ray, self.spool, settings.outputs)
                            for _ in range(settings.workers.ray.max_jobs)]
        else:
            self.workers = [WorkerProcess(settings, gpu) for gpu in worker_gpus(settings.workers.infer)]
        self.pipeline = Pipeline(settings, self.db, self.spool, self.workers[0], deliver,
                                 on_event=self._on_event)
        self.retention = Retention(self.db, self.spool, settings.storage, on_purged=self._on_purged)
        self.scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(len(self.workers) + 4)},
                                             job_defaults={"coalesce": True, "max_instances": 1})
        self.http: HttpServer | None = None
        if settings.http.enabled:
            try:
                self.http = HttpServer(settings.http.host, settings.http.port, self.metrics,
                                       self.readiness, self.refresh_gauges, status_page=self.status_page,
                                       thumbnail=lambda series, model: get_thumbnail(self.db, self.spool, series,
                                                                                     model),
                                       token=settings.http.token,
                                       request_timeout_s=settings.http.request_timeout_s,
                                       max_connections=settings.http.max_connections)
            except OSError as exc:
                self.db.close()
                self.lock.release()
                raise listen_error("http", settings.http.host, settings.http.port, exc) from None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._last_tick = clock()
        self._completion_wake: float | None = None  # when the next tick is brought forward to
        self.dicom_address: tuple[str, int] | None = None

    def _series_store(self) -> SeriesStore:
        return SeriesStore(self.db, reopen_late=self.settings.completion.reprocess_late_arrivals)

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        """Recover from an earlier stop, open the DICOM listener, then start workers, scheduler and HTTP.

        Raises
        ------
        StartupError
            The DICOM port cannot be opened (or its TLS files loaded); nothing
            else has been started then, and the state directory is released.
        """
        if self.ray is not None:
            try:
                self.ray.connect()
            except StartupError:
                self.db.close()
                self.lock.release()
                self._stopped.set()
                raise
            self.ray.resolve_interrupted(self.pipeline.jobs.in_state(JobState.RUNNING))
        self.pipeline.recover(self.clock())
        # Instances acknowledged before a stop but not yet recorded: recorded first, then the spool reconciled.
        try:
            replay_orphans(self.spool.intake, self.spool, self.store_handler.series, self._on_recorded)
        except Exception as exc:  # the database or the spool refuses: nothing is lost, the journal stays
            self.db.close()
            self.lock.release()
            self._stopped.set()
            raise StartupError(f"storage.path: the intake journal in {self.spool.intake} could not be recorded "
                               f"({type(exc).__name__}: {exc}); it is kept for the next start") from exc
        reconcile(self.spool, self.store_handler.series, self.clock())  # before the listener opens
        if isinstance(self.receiver, Receiver):  # in this process: its intake journal (the pool's are theirs)
            self.store_handler.attach_journal()
        try:
            self.dicom_address = self.receiver.start()  # first: a port in use stops the start here
        except StartupError:
            if self.http is not None:
                self.http.stop()
            self.db.close()
            self.lock.release()
            self._stopped.set()
            raise
        # Senders could not connect until now (starting receivers can take seconds): a series that was
        # receiving gets its whole quiet period from the moment the port is open.
        self.store_handler.series.restart_quiet_periods(self.clock())
        for w in self.workers:
            w.start()
        if self.ray is not None:
            self.ray.warm()
        tick = self.settings.completion.tick_seconds
        self.scheduler.add_job(self._tick, "interval", seconds=tick, id="tick", next_run_time=_now_dt())
        for i, w in enumerate(self.workers):
            self.scheduler.add_job(self._drain_infer, "interval", seconds=1, id=f"infer-{i}", args=[w])
        self.scheduler.add_job(self._drain_send, "interval", seconds=1, id="send")
        self.scheduler.add_job(self._prefetch, "interval", seconds=_PREFETCH_INTERVAL_S, id="prefetch")
        self.scheduler.add_job(self._check_destinations, "interval", seconds=self.settings.send.health_check_s,
                               id="destination-health")
        self.scheduler.add_job(self._retention, "interval", seconds=self.settings.storage.cleanup_interval_s,
                               id="retention", next_run_time=_now_dt())
        self.scheduler.start()
        if self.http is not None:
            self.http.start()

    def _tick(self) -> None:
        self._last_tick = self.clock()
        try:
            if self.pipeline.tick(self.clock()):
                self._wake("infer-")  # new work: no need to wait for the next interval
            self._schedule_completion()
        except Exception:
            logger.exception("Completion tick failed; will try again at the next tick")

    def _on_instance(self) -> None:
        """An instance arrived: make sure a tick comes when its series' quiet time ends."""
        if self._completion_wake is None:
            self._schedule_completion()

    def _on_released(self, calling_ae: str, series_uids: list[str]) -> None:
        """A peer released an association whose instances are all recorded: a C-FIND peer is asked now."""
        if self.pipeline.completion.released(calling_ae, series_uids, self.clock()):
            self._wake("tick")

    def _schedule_completion(self) -> None:
        """Bring the next tick forward to the moment the earliest receiving series can complete."""
        due = self.pipeline.completion.next_due(self.clock())
        self._completion_wake = due
        if due is None or self._stopping.is_set():
            return
        job = self.scheduler.get_job("tick")
        when = datetime.fromtimestamp(due + 0.01).astimezone()
        if job is not None and (job.next_run_time is None or when < job.next_run_time):
            job.modify(next_run_time=when)

    def _wake(self, prefix: str) -> None:
        """Run the interval jobs named ``prefix*`` now (they are skipped if already running)."""
        if self._stopping.is_set():
            return
        now = _now_dt()
        for job in self.scheduler.get_jobs():
            if job.id.startswith(prefix):
                job.modify(next_run_time=now)

    def _drain_infer(self, worker: WorkerProcess) -> None:
        try:
            if self.pipeline.drain_infer(self.clock, should_stop=self._stopping.is_set, runner=worker,
                                         leave=leave_to_reader(self.workers, worker, self.clock)):
                self._wake("send")  # results are waiting to go out
        except WorkerStopped as exc:
            logger.warning("%s", exc)
        except Exception:
            logger.exception("INFER loop failed; will try again")

    def _prefetch(self) -> None:
        """Read ahead while series arrive: their headers' geometry here, their pixels in an idle worker.

        Pixels only of series the rules match as far as they have arrived;
        each series is read ahead by one worker (by its UID); not with Ray,
        whose runners load each series in this process at the job's start.
        """
        if self._stopping.is_set():
            return
        hint = self.ray is None and self.settings.workers.prefetch_mb > 0
        try:
            for series_uid, paths, wanted in self.pipeline.receiving():
                if hint and wanted:
                    self.workers[zlib.crc32(series_uid.encode()) % len(self.workers)].prefetch(series_uid, paths)
        except Exception:
            logger.exception("Read-ahead hint failed; will try again")

    def _retention(self) -> None:
        if self._stopping.is_set():
            return
        try:
            self.retention.run(self.clock())
        except Exception:
            logger.exception("Retention pass failed; will try again")

    # -- audit trail and metrics hooks ------------------------------------------
    def _on_event(self, name: str, data: dict[str, Any]) -> None:
        """Pipeline events feed the metrics and the audit trail; neither may stop the pipeline."""
        if name == "series_completed":
            self._receiving.discard(str(data.get("series", "")))
        elif name == "results_ready":  # SEND jobs were queued (a job's end, or its SEG/SR while it makes the rest)
            self._wake("send")
        for sink in (self.metrics.on_event, self.audit.on_pipeline_event):
            try:
                sink(name, data)
            except Exception:
                logger.exception("Event %s: a metrics/audit hook failed", name)

    def _on_association(self, accepted: bool, ae_title: str, host: str, reason: str) -> None:
        self.metrics.on_association(accepted, ae_title, host, reason)
        self.audit.on_association(accepted, ae_title, host, reason)

    def _on_recorded(self, record: Any, outcome: str) -> None:
        self.metrics.on_stored(record.size, outcome)
        if outcome != "duplicate":
            self._on_instance()
        if outcome == "duplicate" or record.series_uid in self._receiving:
            return
        self._receiving.add(record.series_uid)
        self.audit.record(AuditEvent.SERIES_RECEIVED, study_uid=record.study_uid, series_uid=record.series_uid,
                          peer_ae=record.calling_ae, peer_host=record.source_host, modality=record.modality)

    def _on_purged(self, study_uid: str, series_uid: str, reason: str, size: int) -> None:
        self.metrics.purged.labels(reason="expired" if "ago" in reason else "disk_pressure").inc()
        self.metrics.purged_bytes.inc(size)
        self.audit.record(AuditEvent.SERIES_PURGED, study_uid=study_uid, series_uid=series_uid, reason=reason,
                          bytes=size)

    def status_page(self) -> bytes:
        cluster = None
        if self.ray is not None:
            cluster = describe_cluster(self.ray.snapshot(), infer_queue(self.db))
        return render_status(self.db, self.spool, studies=self.settings.http.status_studies,
                             show_phi=self.settings.http.show_phi, node_title=self.settings.node.ae_title,
                             cluster=cluster)

    def reload_rules(self) -> bool:
        """SIGHUP: re-read the configuration file and take its rules; other sections need a restart.

        The new rules are taken only when the file is valid and every model
        and destination they use is the one already running.
        """
        if self.config_path is None:
            logger.warning("Rules reload: no configuration file (embedded default); nothing to reload")
            return False
        try:
            new = load_settings(self.config_path)
        except ConfigError as exc:
            logger.error("Rules reload: %s is invalid; keeping the current rules:\n%s", self.config_path, exc)
            return False
        for rule in new.rules:
            changed = [m for m in rule.run if new.models.get(m) != self.settings.models.get(m)]
            changed += [d for d in rule.send_to if new.destinations.get(d) != self.settings.destinations.get(d)]
            if changed:
                logger.error("Rules reload: rule %s uses new or changed models/destinations (%s), which need a "
                             "restart; keeping the current rules", rule.name, ", ".join(changed))
                return False
        others = [k for k in type(new).model_fields if k != "rules" and getattr(new, k) != getattr(self.settings, k)]
        self.settings = self.settings.model_copy(update={"rules": new.rules})
        self.pipeline.settings = self.settings
        logger.info("Rules reload: %d rule(s) loaded from %s%s", len(new.rules), self.config_path,
                    f"; changes to {', '.join(others)} take effect at the next restart" if others else "")
        return True

    def reload_rules_if_changed(self) -> bool:
        """Reload the rules (see :meth:`reload_rules`) when the configuration file changed on disk.

        Called about every second while serving; a change is a new modification
        time, size or inode (editors that replace the file).  An invalid new
        file is logged once and the current rules stay.

        Returns
        -------
        bool
            Whether new rules were taken.
        """
        stamp = _file_stamp(self.config_path)
        if stamp == self._config_stamp:
            return False
        self._config_stamp = stamp
        logger.info("Configuration file %s changed on disk; reloading its rules", self.config_path)
        return self.reload_rules()

    def _drain_send(self) -> None:
        try:
            self.pipeline.drain_send(self.clock, should_stop=self._stopping.is_set)
        except Exception:
            logger.exception("SEND loop failed; will try again")

    def _check_destinations(self) -> None:
        """Destination health: a destination with waiting jobs that answers again gets them now."""
        if self._stopping.is_set():
            return
        try:
            self.pipeline.check_destinations(self.clock())
        except Exception:
            logger.exception("Destination health check failed; will try again")

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: intake first, then let running jobs finish (up to the grace period).

        A job still running after ``workers.shutdown_grace_s`` is abandoned
        with its worker; it stays ``running`` in the database and is queued
        again at the next start.
        """
        if self._stopped.is_set():
            return
        grace = self.settings.workers.shutdown_grace_s if grace_s is None else grace_s
        self._stopping.set()
        sd_notify("STOPPING=1")
        logger.info("Stopping: DICOM listener closed; running work may finish (up to %.0f s)", grace)
        self.receiver.stop()
        self.store_handler.close()  # what the intake journal holds is recorded before the rest stops
        waiter = threading.Thread(target=self.scheduler.shutdown, kwargs={"wait": True}, daemon=True)
        waiter.start()
        waiter.join(grace)
        if waiter.is_alive():
            logger.warning("Running work did not finish within %.0f s; it will be re-queued at next start", grace)
        for w in self.workers:
            if waiter.is_alive():
                w.close()  # past the grace period: its job stays 'running', queued again at the next start
            else:
                w.stop()
        if self.ray is not None:
            self.ray.close()
        if self.http is not None:
            self.http.stop()
        self.db.close()
        self.lock.release()
        self._stopped.set()
        logger.info("Stopped")

    def run_forever(self) -> None:
        """Serve until SIGTERM/SIGINT; a second signal raises :class:`ForcedShutdown`."""
        signals = (signal.SIGTERM, signal.SIGINT)
        previous = {s: signal.getsignal(s) for s in (*signals, signal.SIGHUP)}
        stop_requested = threading.Event()
        reload_requested = threading.Event()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            reload_requested.set()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if stop_requested.is_set():
                raise ForcedShutdown(f"second {signal.Signals(signum).name}: forcing stop")
            logger.info("%s received: finishing current work (send it again to force)",
                        signal.Signals(signum).name)
            stop_requested.set()

        for s in signals:
            signal.signal(s, on_signal)
        signal.signal(signal.SIGHUP, on_hup)
        watchdog_s = watchdog_interval()
        last_ping = time.monotonic()
        try:
            self.start()
            freeze_startup_objects("main")  # a serving process only (tests start nodes in their own process)
            sd_notify("READY=1\nSTATUS=receiving")
            while not stop_requested.wait(min(1.0, watchdog_s or 1.0)):
                if reload_requested.is_set():
                    reload_requested.clear()
                    sd_notify("RELOADING=1")
                    self.reload_rules()
                    sd_notify("READY=1")
                elif self.config_path is not None:
                    self.reload_rules_if_changed()
                if watchdog_s and self.alive():
                    sd_notify("WATCHDOG=1")
            stopper = threading.Thread(target=self.stop, name="stop", daemon=True)
            stopper.start()
            while stopper.is_alive():
                stopper.join(min(0.2, watchdog_s or 0.2))
                if watchdog_s and time.monotonic() - last_ping >= watchdog_s:
                    sd_notify("WATCHDOG=1")  # a long graceful stop is not a hang
                    last_ping = time.monotonic()
        except ForcedShutdown:
            for w in self.workers:
                w.close()  # a job it was running stays 'running': queued again at the next start
            if self.ray is not None:
                self.ray.close()
            raise
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # -- health ----------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, str]]:
        checks: dict[str, str] = {}
        ok = True
        if not self.db.ping():
            ok, checks["database"] = False, "unreachable"
        elif (problem := self.db.write_problem()) is not None:
            ok, checks["database"] = False, f"writes fail: {problem}"
        else:
            checks["database"] = "ok"
        problem = _write_probe((self.spool.tmp, self.spool.incoming))
        if problem is None:
            checks["spool"] = "writable"
        else:
            ok, checks["spool"] = False, f"not writable: {problem}"
        free = self.spool.free_mb()
        if free < self.settings.storage.min_free_mb:
            ok = False
        checks["free_mb"] = f"{free:.0f}"
        alive = sum(w.alive for w in self.workers)
        checks["workers"] = f"{alive}/{len(self.workers)} alive"
        ok = ok and alive == len(self.workers) and not self._stopping.is_set()
        if isinstance(self.receiver, ReceiverPool):
            serving = self.receiver.serving
            checks["receivers"] = f"{serving}/{self.receiver.count} serving"
            ok = ok and serving == self.receiver.count
        return ok, checks

    def refresh_gauges(self) -> None:
        counts = self.pipeline.jobs.counts()
        for kind in JobKind:
            for state in JobState:
                self.metrics.jobs.labels(kind=kind, state=state).set(counts.get((kind, state), 0))
        self.metrics.spool_free.set(self.spool.free_mb() * 1024 * 1024)
        for kind in JobKind:
            self.metrics.queue.labels(kind=kind).set(counts.get((kind, JobState.QUEUED), 0)
                                                     + counts.get((kind, JobState.RETRYING), 0))
        queue = infer_queue(self.db)
        self.metrics.infer_queue.clear()
        for model in self.settings.models:
            for what in ("waiting", "running"):
                self.metrics.infer_queue.labels(model=model, state=what).set(queue.get(model, {}).get(what, 0))
        if self.ray is not None:
            self._refresh_cluster_gauges()
        by_state = {r["state"]: r["n"] for r in self.db.query("SELECT state, COUNT(*) AS n FROM series GROUP BY state")}
        for series_state in SeriesState:
            self.metrics.series.labels(state=series_state).set(by_state.get(series_state, 0))

    def _refresh_cluster_gauges(self) -> None:
        assert self.ray is not None
        snap = self.ray.snapshot()
        m = self.metrics
        for gauge in (m.ray_nodes, m.ray_actors, m.ray_gpu_peak, m.ray_gpu_share):
            gauge.clear()
        names = {n["node_id"]: n["hostname"] or n["ip"] for n in snap["nodes"]}
        for alive in (True, False):
            m.ray_nodes.labels(alive=str(alive).lower()).set(sum(n["alive"] is alive for n in snap["nodes"]))
        for model, pool in snap["models"].items():
            for a in pool["actors"]:
                node = names.get(a["node_id"], a["node_id"][:12])
                m.ray_actors.labels(model=model, node=node, busy=str(a["busy"]).lower()).inc()
                m.ray_gpu_share.labels(model=model, actor=a["name"], node=node).set(a["num_gpus"])
                m.ray_gpu_peak.labels(model=model, actor=a["name"], node=node).set(a["peak_gpu_bytes"])

    def alive(self) -> bool:
        """Liveness for the systemd watchdog: database answers, scheduler ticks."""
        stale = 30 + 10 * self.settings.completion.tick_seconds
        return self.db.ping() and self.scheduler.running and self.clock() - self._last_tick < stale


def _claim_state(root: Path) -> NodeLock:
    """Create the state directory and claim it for this node (one line naming ``storage.path`` if not)."""
    problem = storage_problem(root)
    if problem is not None:
        raise StartupError(problem)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"storage.path: cannot create {root}: {exc.strerror}: make it writable by the "
                           "node's user or choose another storage.path") from None
    lock = NodeLock(root)
    lock.acquire()
    return lock


def _write_probe(dirs: tuple[Path, ...]) -> str | None:
    """Create and delete a file in each folder (``os.access`` says yes to root on a read-only mount)."""

    for d in dirs:
        try:
            fd, name = tempfile.mkstemp(dir=d, prefix=".probe-")
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            return f"{d.name}: {exc.strerror or exc}"
    return None


def _file_stamp(path: Path | None) -> tuple[int, int, int] | None:
    """(modification time, size, inode) of a file, ``None`` when there is none."""
    if path is None:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _now_dt() -> Any:
    return datetime.now().astimezone()
