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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.domain import JobKind, JobState
from dicom_node.http.metrics import Metrics
from dicom_node.http.server import HttpServer
from dicom_node.receive.handlers import StoreHandler
from dicom_node.receive.server import Receiver
from dicom_node.scheduler.service import Pipeline
from dicom_node.scheduler.worker import WorkerProcess
from dicom_node.send.dimse import send_files
from dicom_node.spool import Spool
from dicom_node.store import Database

logger = logging.getLogger(__name__)


class ForcedShutdown(Exception):
    """A second stop signal arrived while the node was finishing its work."""


def state_paths(settings: Any) -> tuple[Path, Path]:
    """(state directory, database file) for a configuration."""
    root = settings.storage.resolved_path()
    return root, root / "dicom-node.sqlite3"


class Node:
    """A running dicom-node.

    Parameters
    ----------
    settings:
        Validated settings.
    clock:
        Current time in seconds since the epoch (a parameter for tests).
    """

    def __init__(self, settings: Any, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        root, db_path = state_paths(settings)
        root.mkdir(parents=True, exist_ok=True)
        self.db = Database(db_path)
        self.spool = Spool(root)
        self.metrics = Metrics()
        self.store_handler = StoreHandler(self.spool, self._series_store(), settings.storage.min_free_mb,
                                          clock=clock, on_stored=self.metrics.on_stored)
        self.receiver = Receiver(settings.node, self.store_handler)
        self.workers = [WorkerProcess(settings) for _ in range(settings.workers.infer)]
        self.pipeline = Pipeline(settings, self.db, self.spool, self.workers[0], send_files,
                                 on_event=self.metrics.on_event)
        self.scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(len(self.workers) + 3)},
                                             job_defaults={"coalesce": True, "max_instances": 1})
        self.http: HttpServer | None = None
        if settings.http.enabled:
            self.http = HttpServer(settings.http.host, settings.http.port, self.metrics,
                                   self.readiness, self.refresh_gauges)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self.dicom_address: tuple[str, int] | None = None

    def _series_store(self) -> Any:
        from dicom_node.store import SeriesStore

        return SeriesStore(self.db)

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        """Recover from an earlier stop, then start worker, scheduler, HTTP and the DICOM listener."""
        self.pipeline.recover(self.clock())
        for w in self.workers:
            w.start()
        tick = self.settings.completion.tick_seconds
        self.scheduler.add_job(self._tick, "interval", seconds=tick, id="tick", next_run_time=_now_dt())
        for i, w in enumerate(self.workers):
            self.scheduler.add_job(self._drain_infer, "interval", seconds=1, id=f"infer-{i}", args=[w])
        self.scheduler.add_job(self._drain_send, "interval", seconds=1, id="send")
        self.scheduler.start()
        if self.http is not None:
            self.http.start()
        self.dicom_address = self.receiver.start()

    def _tick(self) -> None:
        try:
            self.pipeline.tick(self.clock())
        except Exception:
            logger.exception("Completion tick failed; will try again at the next tick")

    def _drain_infer(self, worker: WorkerProcess) -> None:
        try:
            self.pipeline.drain_infer(self.clock, should_stop=self._stopping.is_set, runner=worker)
        except Exception:
            logger.exception("INFER loop failed; will try again")

    def _drain_send(self) -> None:
        try:
            self.pipeline.drain_send(self.clock, should_stop=self._stopping.is_set)
        except Exception:
            logger.exception("SEND loop failed; will try again")

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
        logger.info("Stopping: DICOM listener closed; running work may finish (up to %.0f s)", grace)
        self.receiver.stop()
        waiter = threading.Thread(target=self.scheduler.shutdown, kwargs={"wait": True}, daemon=True)
        waiter.start()
        waiter.join(grace)
        if waiter.is_alive():
            logger.warning("Running work did not finish within %.0f s; it will be re-queued at next start", grace)
        for w in self.workers:
            w.stop(force=waiter.is_alive())
        if self.http is not None:
            self.http.stop()
        self.db.close()
        self._stopped.set()
        logger.info("Stopped")

    def run_forever(self) -> None:
        """Serve until SIGTERM/SIGINT; a second signal raises :class:`ForcedShutdown`."""
        signals = (signal.SIGTERM, signal.SIGINT)
        previous = {s: signal.getsignal(s) for s in signals}
        stop_requested = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if stop_requested.is_set():
                raise ForcedShutdown(f"second {signal.Signals(signum).name}: forcing stop")
            logger.info("%s received: finishing current work (send it again to force)",
                        signal.Signals(signum).name)
            stop_requested.set()

        for s in signals:
            signal.signal(s, on_signal)
        try:
            self.start()
            while not stop_requested.wait(1.0):
                pass
            stopper = threading.Thread(target=self.stop, name="stop", daemon=True)
            stopper.start()
            while stopper.is_alive():
                stopper.join(0.2)
        except ForcedShutdown:
            for w in self.workers:
                w.stop(force=True)
            raise
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # -- health ----------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, str]]:
        checks: dict[str, str] = {}
        ok = True
        if self.db.ping():
            checks["database"] = "ok"
        else:
            ok, checks["database"] = False, "unreachable"
        if os.access(self.spool.incoming, os.W_OK):
            checks["spool"] = "writable"
        else:
            ok, checks["spool"] = False, "not writable"
        free = self.spool.free_mb()
        if free < self.settings.storage.min_free_mb:
            ok = False
        checks["free_mb"] = f"{free:.0f}"
        alive = sum(w.alive for w in self.workers)
        checks["workers"] = f"{alive}/{len(self.workers)} alive"
        ok = ok and alive == len(self.workers) and not self._stopping.is_set()
        return ok, checks

    def refresh_gauges(self) -> None:
        counts = self.pipeline.jobs.counts()
        for kind in JobKind:
            for state in JobState:
                self.metrics.jobs.labels(kind=kind, state=state).set(counts.get((kind, state), 0))
        self.metrics.spool_free.set(self.spool.free_mb() * 1024 * 1024)


def _now_dt() -> Any:
    from datetime import datetime

    return datetime.now().astimezone()
