"""Several receiver processes on one DICOM port.

pynetdicom decodes PDUs and answers C-STOREs in Python, so one process
receives on one core whatever the number of associations.  With
``node.receivers`` above 1 the node starts that many listener processes,
all bound to the same port with ``SO_REUSEPORT`` (the kernel spreads new
associations over them).  Each writes to the spool and records in the
state database itself (SQLite's own locking orders the writers), so an
instance is still durable before its success status.  What the main process
needs to know (metrics, audit trail) comes back as events on a queue.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 60.0


def receiver_count(setting: int | str) -> int:
    """Listener processes for ``node.receivers``: ``auto`` is one per CPU core, at most 4."""
    if setting == "auto":
        return max(1, min(4, os.cpu_count() or 1))
    return int(setting)


def _die_with_parent(parent_pid: int) -> None:
    """Never outlive the main process: a receiver without its node must not acknowledge anything.

    The kernel kills this process when the main process dies (``PR_SET_PDEATHSIG``,
    even by SIGKILL); if it died before that was set, exit now.
    """
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's stop event is all there is
        logger.warning("Receiver process cannot follow its parent's death on this system")
    if os.getppid() != parent_pid:
        os._exit(0)


def _child_main(settings: Any, events: Any, stop: Any, parent_pid: int) -> None:
    """Entry point of one receiver process: listen until ``stop`` is set."""
    import signal

    from dicom_node.app import state_paths
    from dicom_node.logs import configure_logging
    from dicom_node.receive.handlers import StoreHandler
    from dicom_node.receive.server import Receiver
    from dicom_node.spool import Spool
    from dicom_node.store import Database, SeriesStore

    _die_with_parent(parent_pid)
    configure_logging(settings.logging.level, settings.logging.journald, process="receiver")
    # The main process owns shutdown (it sets ``stop``); Ctrl-C in a terminal must not cut a C-STORE.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        root, db_path = state_paths(settings)
        db = Database(db_path)
        series = SeriesStore(db, reopen_late=settings.completion.reprocess_late_arrivals)
        handler = StoreHandler(Spool(root), series, settings.storage.min_free_mb,
                               on_stored=lambda size, outcome: events.put(("stored", size, outcome)),
                               on_recorded=lambda record, outcome: events.put(("recorded", record, outcome)))
        receiver = Receiver(settings.node, handler,
                            on_association=lambda *args: events.put(("association", *args)))
        host, port = receiver.start(reuse_port=True)
    except BaseException as exc:  # bind failure, bad certificate...: the parent reports it
        events.put(("failed", f"{type(exc).__name__}: {exc}"))
        return
    events.put(("listening", host, port))
    stop.wait()
    receiver.stop()
    db.close()


class ReceiverPool:
    """The node's receiver processes.

    Parameters
    ----------
    settings:
        Node settings (pickled to each process).
    processes:
        How many listener processes.
    on_stored, on_recorded, on_association:
        The main process's hooks, called from a thread that drains the
        processes' events (same signatures as on :class:`StoreHandler` and
        :class:`Receiver`).
    """

    def __init__(self, settings: Any, processes: int, *,
                 on_stored: Callable[[int, str], None],
                 on_recorded: Callable[[Any, str], None],
                 on_association: Callable[[bool, str, str, str], None]) -> None:
        self.settings = settings
        self.count = processes
        self.hooks: dict[str, Callable[..., None]] = {
            "stored": on_stored, "recorded": on_recorded, "association": on_association}
        self._ctx = mp.get_context("spawn")
        self._events: Any = self._ctx.Queue()
        self._stop = self._ctx.Event()
        self._procs: list[Any] = []
        self._drain: threading.Thread | None = None
        self._closing = threading.Event()

    def start(self) -> tuple[str, int]:
        """Start the processes; returns the (host, port) they listen on once all do.

        Raises
        ------
        RuntimeError
            If a process could not listen (port in use, certificate unreadable...).
        """
        for i in range(self.count):
            proc = self._ctx.Process(target=_child_main, name=f"dicom-node-receiver-{i}",
                                     args=(self.settings, self._events, self._stop, os.getpid()), daemon=True)
            proc.start()
            self._procs.append(proc)
        address: tuple[str, int] | None = None
        for _ in range(self.count):
            try:
                event = self._events.get(timeout=_START_TIMEOUT_S)
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"receiver processes did not start within {_START_TIMEOUT_S:.0f} s") from None
            if event[0] == "failed":
                self.stop()
                raise RuntimeError(f"a receiver process could not listen: {event[1]}")
            if event[0] == "listening":
                address = (str(event[1]), int(event[2]))
            else:  # a very early association: hand it to the hooks like the rest
                self._dispatch(event)
        self._drain = threading.Thread(target=self._drain_events, name="receiver-events", daemon=True)
        self._drain.start()
        assert address is not None
        if not self.settings.node.allowed_peers:
            logger.warning("node.allowed_peers is empty: any host and AE title may send to this node")
        logger.info("%d receiver processes share port %d", self.count, address[1])
        return address

    def _dispatch(self, event: tuple[Any, ...]) -> None:
        hook = self.hooks.get(event[0])
        if hook is None:
            return
        try:
            hook(*event[1:])
        except Exception:
            logger.exception("Receiver event %s: a metrics/audit hook failed", event[0])

    def _drain_events(self) -> None:
        while not self._closing.is_set():
            try:
                event = self._events.get(timeout=0.5)
            except queue.Empty:
                continue
            except (EOFError, OSError):
                return
            self._dispatch(event)

    @property
    def alive(self) -> int:
        """How many receiver processes are running."""
        return sum(p.is_alive() for p in self._procs)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Close every listener (running associations end), then the event channel."""
        self._stop.set()
        for proc in self._procs:
            proc.join(timeout_s)
            if proc.is_alive():
                logger.warning("Receiver process %d did not stop in %.0f s; killing it", proc.pid, timeout_s)
                proc.kill()
                proc.join(5)
        # Events the processes sent while stopping still reach the hooks.
        while True:
            try:
                self._dispatch(self._events.get_nowait())
            except (queue.Empty, EOFError, OSError):
                break
        self._closing.set()
        if self._drain is not None:
            self._drain.join(2)
        self._procs = []
