"""Inference worker process: models run outside the receiver's process.

A model that raises fails its job inside the worker.  A model that hangs
past its timeout, or kills its process (segfault, CUDA abort, OOM killer),
is handled here: the job fails with the reason, a fresh worker is started,
and the node never stops receiving.  Models stay loaded (warm) in the
worker between jobs.

A worker with no job reads and decodes the instances of receiving series it
is told about (:class:`PrefetchHint`, see :mod:`dicom_node.imaging.prefetch`),
one instance at a time between looks at its pipe, so a job that arrives
waits for at most one instance's read.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Final, cast

from dicom_node.heap import collect_after_job, freeze_startup_objects
from dicom_node.imaging.prefetch import Prefetch
from dicom_node.logs import configure_logging
from dicom_node.scheduler.forked import cpu_count
from dicom_node.scheduler.pipeline import InferOutcome, InferTask, ProducedObject, run_infer, warm_up
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from inference.registry import ModelRegistry

logger = logging.getLogger(__name__)


#: Seconds an idle worker waits on its pipe before it drops expired read-ahead series.
_IDLE_CHECK_S = 30.0


@dataclass(frozen=True)
class PrefetchHint:
    """A receiving series' instances so far (spool-relative paths, arrival order), sent to an idle worker."""

    series_uid: str
    paths: tuple[str, ...]


@dataclass(frozen=True)
class ReadAheadQuery:
    """Asks a worker which series it holds read ahead; answered ``("held", {series UID: slices})``."""


class WorkerStopped(Exception):
    """The node stopped the worker while it ran a job; the job stays ``running`` and is re-queued at start."""


def worker_gpus(infer: int | str) -> list[int | None]:
    """The GPU of each worker process for the ``workers.infer`` setting.

    ``auto`` gives one worker per visible GPU (one CPU worker without GPU);
    a number gives that many workers spread round-robin over the GPUs.
    """
    import torch  # here, not at the top: only the worker processes and this count pay for torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    count = max(1, gpus) if infer == "auto" else int(infer)
    return [i % gpus if gpus else None for i in range(count)]


#: Seconds a due job waits for the idle worker that read its series ahead before another worker takes it.
READ_AHEAD_CLAIM_S = 2.0


def leave_to_reader(workers: Sequence[Any], me: Any, now: Callable[[], float]) -> Callable[[str, float], bool]:
    """The ``leave`` of worker ``me``'s drain: a job whose series another idle worker read ahead is its.

    That worker takes the volume it holds instead of this one reading the
    files again.  A job is left only while the reader is idle, alive and the
    job has been due less than :data:`READ_AHEAD_CLAIM_S` (a reader that
    does not come, stopped or restarting, delays a job by that at most).
    """
    others = [w for w in workers if w is not me]

    def leave(series_uid: str, due_since: float) -> bool:
        if not others or now() - due_since >= READ_AHEAD_CLAIM_S:
            return False
        return any(w.holds(series_uid) and not w.busy and w.alive for w in others)

    return leave


#: What :func:`_preload` returns when no job (or stop) came while it loaded.
_NOTHING: Final = object()


def _preload(settings: Settings, registry: ModelRegistry, conn: Connection,
             side: Callable[[object], bool]) -> object:
    """Load the models the rules run (at most ``max_warm_models``), so a first job does not pay the load.

    Messages that come meanwhile are taken between two loads: a read-ahead
    hint or query is handled by ``side`` (which says whether it was one) and
    loading goes on (the series being read ahead is the one whose job will
    need the model); a job, or the stop, ends the preload and is returned
    for the worker's loop to take next (the rest load on first use).
    Returns :data:`_NOTHING` when none came.  A model that cannot be loaded
    is logged, and its jobs say why.
    """
    names = list(dict.fromkeys(name for rule in settings.rules for name in rule.run))
    for name in names[:settings.workers.max_warm_models]:
        try:
            while conn.poll(0):
                message = conn.recv()
                if not side(message):
                    return message
        except (EOFError, OSError):
            return None  # the node is gone: stop
        try:
            registry.get(name)
        except Exception as exc:  # its jobs load it again and fail with the reason
            logger.warning("Model %s: not loaded at the worker's start (%s: %s); its jobs try again",
                           name, type(exc).__name__, str(exc)[:200])
    return _NOTHING


def _child_main(conn: Connection, settings: Settings, gpu: int | None, preload: bool = False) -> None:
    """Entry point of the worker process: serve tasks until the pipe closes.

    ``gpu`` is this worker's GPU: models with ``device: auto`` run on it.
    ``preload``: load the rules' models first (``workers.preload_models``;
    not after a restart, so a model whose load hangs or kills the process
    costs its own jobs only).
    """
    configure_logging(settings.logging.level, settings.logging.journald, process="worker")
    if gpu is not None:
        import torch

        torch.cuda.set_device(gpu)
        logger.info("Worker bound to GPU %d (%s)", gpu, torch.cuda.get_device_name(gpu))
    # The parent owns shutdown: a Ctrl-C in a terminal must not kill a job half-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    registry = ModelRegistry(settings.models, max_warm=settings.workers.max_warm_models,
                             state_dir=settings.storage.resolved_path())
    spool = Spool(settings.storage.resolved_path())
    prefetch = Prefetch(settings.workers.prefetch_mb * 2**20)
    parallel_encode = settings.workers.parallel_encode and cpu_count() >= 2
    conn.send(("ready", None))
    try:
        logger.debug("Worker warmed up in %.2f s", warm_up(settings.outputs, spool.tmp))
    except Exception:  # a defect of the results path; the first job will show it too: serve on
        logger.exception("Worker warm-up failed (the first job pays the one-time costs instead)")
    freeze_startup_objects("worker")  # before the models: an unloaded model must stay collectable

    def side(message: object) -> bool:
        """Handle a read-ahead hint or query; ``False`` for anything else (a job, the stop)."""
        if isinstance(message, PrefetchHint):
            prefetch.hint(message.series_uid, [str(p) for p in spool.absolute_all(message.paths)])
            return True
        if isinstance(message, ReadAheadQuery):
            conn.send(("held", {} if prefetch.busy else prefetch.held()))
            return True
        return False

    pending = _preload(settings, registry, conn, side) if preload else _NOTHING
    while True:
        if pending is not _NOTHING:
            task, pending = pending, _NOTHING
        else:
            try:
                if prefetch.busy and not conn.poll(0) and prefetch.step():
                    continue  # one instance read ahead; look at the pipe again
                if not conn.poll(_IDLE_CHECK_S):
                    prefetch.expire()
                    continue
                task = conn.recv()
            except (EOFError, OSError):
                return
        if task is None:
            registry.close()
            return
        if side(task):
            continue
        gc.disable()  # no full collection in the middle of the job: one after it, once its result is sent
        try:
            outcome = run_infer(cast(InferTask, task), registry, spool, settings.outputs, prefetch, parallel_encode,
                                ready=lambda objects: conn.send(("objects", objects)))
            conn.send(("done", outcome))
        finally:
            gc.enable()
        collect_after_job()


class WorkerProcess:
    """Parent-side handle of one worker process.

    Parameters
    ----------
    settings:
        The node's settings (pickled to the child at start).
    """

    def __init__(self, settings: Settings, gpu: int | None = None) -> None:
        self._closed = False  # close() was called: no restart, an interrupted job is not failed
        self.settings = settings
        self.gpu = gpu
        self._ctx = mp.get_context("spawn")
        self._proc: Any = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._hinted: dict[str, int] = {}  # series UID -> instance count last told to this process
        self._started = False  # a restart does not preload the models (one may be why it restarted)

    def start(self) -> None:
        parent, child = self._ctx.Pipe()
        preload = self.settings.workers.preload_models and not self._started
        self._started = True
        self._proc = self._ctx.Process(target=_child_main, name="dicom-node-worker",
                                       args=(child, self.settings, self.gpu, preload),
                                       daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        self._hinted = {}
        logger.info("Worker process %d started%s", self._proc.pid,
                    f" on GPU {self.gpu}" if self.gpu is not None else " (CPU)")

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def busy(self) -> bool:
        """Whether it runs a job now."""
        return self._lock.locked()

    def holds(self, series_uid: str) -> bool:
        """Whether this worker was told to read ``series_uid`` ahead (since its last start)."""
        return series_uid in self._hinted

    def run(self, task: InferTask, timeout_s: float,
            ready: Callable[[list[ProducedObject]], None] | None = None) -> InferOutcome:
        """Run ``task`` in the worker; never raises for a model's failure.

        ``timeout_s`` is the node's default (``workers.infer_timeout_s``); a
        model's own ``timeout_s`` replaces it.  On timeout the worker is
        killed and restarted; if it died the job fails with its exit code.
        ``ready`` is called here with the objects the job has finished while
        it still makes others (see :func:`~dicom_node.scheduler.pipeline.run_infer`).
        """
        spec = self.settings.models.get(task.model)
        timeout_s = float(getattr(spec, "timeout_s", None) or timeout_s)
        with self._lock:
            if self._closed:
                raise WorkerStopped("the node is stopping: no new job is started")
            if not self.alive:
                self.start()
            assert self._conn is not None
            try:
                self._conn.send(task)
                while True:
                    if not self._conn.poll(timeout_s):
                        self._restart(f"timeout after {timeout_s:.0f} s")
                        return InferOutcome(ok=False, error=f"model {task.model} timed out after "
                                                             f"{timeout_s:.0f} s; worker restarted")
                    kind, value = self._conn.recv()
                    if kind == "done":
                        return value
                    if kind == "objects" and ready is not None:
                        ready(value)
            except (EOFError, OSError, BrokenPipeError):
                if self._closed:  # the node killed it to stop: the job is not the model's failure
                    raise WorkerStopped(f"job of model {task.model} interrupted by the node's forced stop; "
                                        "it is queued again at the next start") from None
                code = self._proc.exitcode if self._proc is not None else None
                if self._proc is not None:
                    self._proc.join(5)
                    code = self._proc.exitcode
                self._restart(f"worker died (exit code {code})")
                return InferOutcome(ok=False, error=f"worker process died during model {task.model} "
                                                    f"(exit code {code}); worker restarted")

    def prefetch(self, series_uid: str, paths: list[str]) -> bool:
        """Tell the worker, if it is idle, about a receiving series' instances so far; never waits for a job.

        Returns whether the worker now knows them (told now or before); ``False``
        while it runs a job (it is told at the next call after that).
        """
        if self._hinted.get(series_uid) == len(paths):
            return True
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self._closed or not self.alive or self._conn is None:
                return False
            self._conn.send(PrefetchHint(series_uid, tuple(paths)))
            if len(self._hinted) >= 1024:
                self._hinted.clear()
            self._hinted[series_uid] = len(paths)
            return True
        except (OSError, BrokenPipeError):
            return False
        finally:
            self._lock.release()

    def read_ahead(self, timeout_s: float = 60.0) -> dict[str, int] | None:
        """Series UID -> slices this worker holds decoded, once it has read every instance it was told about.

        ``{}`` while reads are still waiting; ``None`` if it runs a job, is
        not alive, or did not answer within ``timeout_s`` (its warm-up).  An
        answer that comes late is passed over by :meth:`run`.
        """
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if self._closed or not self.alive or self._conn is None:
                return None
            self._conn.send(ReadAheadQuery())
            while self._conn.poll(timeout_s):
                kind, value = self._conn.recv()
                if kind == "held":
                    return dict(value)
            return None
        except (EOFError, OSError, BrokenPipeError):
            return None
        finally:
            self._lock.release()

    def _restart(self, why: str) -> None:
        logger.error("Worker process: %s; starting a new one", why)
        self.stop(force=True)
        self.start()

    def close(self) -> None:
        """Stop for good (the node is stopping): kill the process; a job it was running stays ``running``."""
        self._closed = True
        self.stop(force=True)

    def stop(self, force: bool = False) -> None:
        if self._proc is None:
            return
        if not force and self._conn is not None:
            try:
                self._conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc = None
        self._conn = None
