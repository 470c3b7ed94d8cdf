"""Several receiver processes behind one DICOM port.

pynetdicom decodes PDUs and answers C-STOREs in Python, so one process
receives on one core whatever the number of associations.  With
``node.receivers`` above 1 the node starts that many receiver processes.
The main process listens on the port; each connection it accepts is handed
(the socket itself, ``SCM_RIGHTS`` over a Unix socket pair) to the receiver
process with the fewest running associations, so concurrent senders are
spread evenly.  (``SO_REUSEPORT`` would let the kernel pick a process by a
hash of the peer's address: with 4 senders and 2 processes, all 4 land on
one process one time in 8, and 3 on one process half the time.)

Each receiver writes to the spool and records in the state database itself
(a file lock orders the writers), so an instance is still durable before
its success status.  What the main process needs to know (metrics, audit
trail, the end of each connection for the connection caps) comes back as
events, each process over a pipe of its own: a process killed while it
writes one (SIGKILL, the OOM killer) breaks only its own pipe.  (One
``multiprocessing.Queue`` shared by all used to carry them: its writers
share a lock, and a process killed holding it stopped every other
process's events for good, the node's start included.)
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any, cast

import pydicom.config

from dicom_node.errors import StartupError
from dicom_node.heap import freeze_startup_objects
from dicom_node.logs import configure_logging
from dicom_node.receive.guard import ConnectionCaps
from dicom_node.receive.handlers import StoreHandler
from dicom_node.receive.journal import replay_orphans
from dicom_node.receive.server import Receiver, server_ssl_context
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from dicom_node.store import Database, SeriesStore
from dicom_node.store.layout import state_paths
from dicom_node.tcp import listen_error

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 60.0
_SUPERVISE_INTERVAL_S = 1.0
_RESTART_INTERVAL_S = 5.0
_EVENTS_AT_ONCE = 256  # read from one pipe before the others get their turn


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
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's stop event is all there is
        logger.warning("Receiver process cannot follow its parent's death on this system")
    if os.getppid() != parent_pid:
        os._exit(0)


class _Events:
    """A receiver process's events to the main process, over its own pipe.

    :meth:`put` never waits on the main process: a writer thread sends, in
    order, what the association threads put.  :meth:`close` sends what is left.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="receiver-events", daemon=True)
        self._thread.start()

    def put(self, event: tuple[Any, ...]) -> None:
        self._queue.put(event)

    def _write(self) -> None:
        while (event := self._queue.get()) is not None:
            try:
                self._conn.send(event)
            except (OSError, ValueError):  # the main process has gone or closed its end
                return

    def close(self, timeout_s: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._conn.close()


def _child_main(settings: Settings, events_conn: Connection, parent_pid: int, channel: socket.socket,
                index: int, finished: Any, address: tuple[str, int]) -> None:
    """Entry point of one receiver process: serve the connections handed over ``channel`` until it closes.

    ``finished[index]`` counts the associations this process has ended; only
    this process writes it (under a lock of its own), the main process reads it.
    """
    _die_with_parent(parent_pid)
    events = _Events(events_conn)
    try:
        _serve(settings, events, channel, index, finished, address)
    finally:
        events.close()


def _serve(settings: Settings, events: _Events, channel: socket.socket, index: int, finished: Any,
           address: tuple[str, int]) -> None:
    configure_logging(settings.logging.level, settings.logging.journald, process=f"receiver-{index}")
    # The main process owns shutdown (it sets ``stop``); Ctrl-C in a terminal must not cut a C-STORE.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # pydicom checks every value it reads against its VR (a regular expression per UID) only to warn: in a
    # receiver that is each UID of every association request (a peer proposing 120 contexts: ~500 of them)
    # and of every C-STORE, while the handler validates the UIDs it uses itself and stores the bytes as sent.
    # Only this process reads with the check off; what the node reads for rules and results keeps it.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

    count_lock = threading.Lock()

    def ended(host: str) -> None:
        with count_lock:
            finished[index] += 1
        events.put(("closed", index, host))  # the main process's connection caps

    try:
        root, db_path = state_paths(settings.storage)
        db = Database(db_path, settings.storage.database_busy_timeout_s)
        series = SeriesStore(db, reopen_late=settings.completion.reprocess_late_arrivals)
        spool = Spool(root)
        recorded = lambda record, outcome: events.put(("recorded", record, outcome))  # noqa: E731
        handler = StoreHandler(spool, series, settings.storage.min_free_mb, on_recorded=recorded,
                               on_released=lambda ae, uids: events.put(("released", ae, uids)))
        replay_orphans(spool.intake, spool, series, recorded)  # a receiver that died before recording its own
        handler.attach_journal()
        receiver = Receiver(settings.node, handler,
                            on_association=lambda *args: events.put(("association", *args)))
        receiver.start_handed(address, on_finished=ended)
    except BaseException as exc:  # certificate unreadable...: the parent reports it
        events.put(("failed", f"{type(exc).__name__}: {exc}"))
        return
    events.put(("listening", index, os.getpid()))
    logger.info("Receiver process %d (pid %d) serves connections accepted on %s:%d", index, os.getpid(), *address)
    freeze_startup_objects(f"receiver-{index}")
    _take_connections(channel, receiver)  # until the main process closes the channel: stop
    receiver.stop()
    handler.close()  # the journal's last instances recorded
    channel.close()
    db.close()


def _take_connections(channel: socket.socket, receiver: Any) -> None:
    """Run an association for every connection the main process hands over, until it closes the channel."""
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(channel, 256, 1)
        except OSError:
            return
        if not fds:  # the main process closed the channel: stopping
            return
        receiver.serve_connection(socket.socket(fileno=fds[0]), message.decode("ascii", "replace"))


def listening_socket(host: str, port: int, backlog: int = 128) -> socket.socket:
    """The node's DICOM port, bound and listening (IPv4 or IPv6, as ``host`` is)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class ReceiverPool:
    """The node's receiver processes and the listener that hands them connections.

    Parameters
    ----------
    settings:
        Node settings (pickled to each process).
    processes:
        How many receiver processes.
    on_recorded, on_association, on_released:
        The main process's hooks, called from a thread that drains the
        processes' events (same signatures as on :class:`StoreHandler` and
        :class:`Receiver`).
    """

    def __init__(self, settings: Settings, processes: int, *,
                 on_recorded: Callable[[Any, str], None],
                 on_association: Callable[[bool, str, str, str], None],
                 on_released: Callable[[str, list[str]], None] | None = None) -> None:
        self.settings = settings
        self.count = processes
        self.hooks: dict[str, Callable[..., None]] = {
            "recorded": on_recorded, "association": on_association}
        if on_released is not None:
            self.hooks["released"] = on_released
        self._ctx = mp.get_context("spawn")
        # Each process's end of its event pipe; replaced ones are closed by the thread that reads them.
        self._readers: list[Connection | None] = [None] * processes
        self._retired: list[Connection] = []
        self._readers_lock = threading.Lock()
        # Associations handed to each process (written here only) and ended by it (written there only):
        # no lock shared between processes, which one that died holding it would leave locked.
        self._handed = [0] * processes
        self._finished: Any = self._ctx.RawArray("q", processes)
        node = settings.node
        self.caps = ConnectionCaps(node.max_connections, node.max_connections_per_host)
        self._hosts: list[dict[str, int]] = [{} for _ in range(processes)]  # open connections per process
        self._hosts_lock = threading.Lock()
        self._procs: list[Any] = [None] * processes
        self._channels: list[socket.socket | None] = [None] * processes
        self._started = [0.0] * processes  # monotonic time each process was (re)started
        # The pid of each process once it has said it serves ("listening"); 0 while it starts.  A process
        # started again is handed connections only when no serving one is alive: its start-up (imports, the
        # database, the journal's replay) takes seconds, tens of them on a loaded machine, which a peer
        # would spend waiting for the answer to its association request.
        self._serving = [0] * processes
        self._address: tuple[str, int] | None = None
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()

    def start(self) -> tuple[str, int]:
        """Listen, start the processes; returns the (host, port) listened on once all serve.

        Raises
        ------
        StartupError
            The port cannot be bound, the TLS files cannot be loaded, or a
            receiver process could not start (its database locked...).
        """
        node = self.settings.node
        if node.tls is not None:
            server_ssl_context(node.tls)  # fails here, in one line, not in every receiver process
        try:
            self._listener = listening_socket(node.host, node.port)
        except OSError as exc:
            raise listen_error("node", node.host, node.port, exc) from None
        address = self._address = (str(self._listener.getsockname()[0]), int(self._listener.getsockname()[1]))
        for i in range(self.count):
            self._spawn(i)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not all(self._serving):
            if time.monotonic() > deadline:
                self.stop()
                raise StartupError(f"node.receivers: the receiver processes did not start within "
                                   f"{_START_TIMEOUT_S:.0f} s (an overloaded machine?)")
            for event in self._poll_events(0.2):
                if event[0] == "failed":
                    self.stop()
                    raise StartupError(f"node.receivers: a receiver process could not start: {event[1]}")
                self._dispatch(event)  # "listening", or a very early event of another kind
            for i, proc in enumerate(self._procs):
                if not self._serving[i] and not proc.is_alive():  # died before it said anything
                    self.stop()
                    raise StartupError(f"node.receivers: receiver process {i} ended while starting "
                                       f"(exit code {proc.exitcode})")
        self._threads = [threading.Thread(target=self._drain_events, name="receiver-events", daemon=True),
                         threading.Thread(target=self._accept, name="dicom-listener", daemon=True),
                         threading.Thread(target=self._supervise, name="receiver-supervisor", daemon=True)]
        for thread in self._threads:
            thread.start()
        if not node.allowed_peers:
            logger.warning("node.allowed_peers is empty: any host and AE title may send to this node")
        logger.info("Listening as %s on %s:%d; %d receiver processes serve the associations",
                    node.ae_title, address[0], address[1], self.count)
        return str(address[0]), int(address[1])

    def _spawn(self, i: int) -> None:
        """Start receiver process ``i`` (again) with a new channel."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one message per connection
        reader, writer = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_child_main, name=f"dicom-node-receiver-{i}",
            args=(self.settings, writer, os.getpid(), theirs, i, self._finished, self._address),
            daemon=True)
        proc.start()
        theirs.close()
        writer.close()
        with self._readers_lock:  # what the dead process had not sent is lost with it
            if self._readers[i] is not None:
                self._retired.append(self._readers[i])  # type: ignore[arg-type]
            self._readers[i] = reader
        old = self._channels[i]
        self._procs[i], self._channels[i], self._started[i] = proc, ours, time.monotonic()
        self._serving[i] = 0
        self._handed[i] = self._finished[i]  # what a dead process was running has ended with it
        with self._hosts_lock:
            self.caps.forget(self._hosts[i])
            self._hosts[i] = {}
        if old is not None:
            old.close()

    def _supervise(self) -> None:
        """Start a receiver process again when one has died (at most every ``_RESTART_INTERVAL_S`` each)."""
        while not self._closing.wait(_SUPERVISE_INTERVAL_S):
            for i, proc in enumerate(self._procs):
                if proc.is_alive() or time.monotonic() - self._started[i] < _RESTART_INTERVAL_S:
                    continue
                if self._closing.is_set():
                    return
                logger.error("Receiver process %d (pid %d) died (exit code %s); starting it again",
                             i, proc.pid, proc.exitcode)
                try:
                    self._spawn(i)
                except OSError as exc:
                    logger.error("Receiver process %d could not be started again: %s", i, exc)

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._closing.is_set():
            try:
                conn, peer = listener.accept()
            except OSError as exc:
                if self._closing.is_set() or listener.fileno() < 0:
                    return
                logger.error("Accepting a DICOM connection failed: %s", exc)  # e.g. out of descriptors
                self._closing.wait(0.1)
                continue
            host = str(peer[0])
            if not self.caps.admit(host):  # over node.max_connections(_per_host): closed at once
                conn.close()
                continue
            try:
                if not self._hand_over(conn, host):
                    self.caps.release(host)
            finally:
                conn.close()  # the receiver process holds its own descriptor now

    def _hand_over(self, conn: socket.socket, host: str) -> bool:
        """Give ``conn`` (from ``host``) to the serving receiver process running the fewest associations.

        A process still starting (started again after it died) comes after every serving one: it gets the
        connection only when none of them is alive, and answers it once it serves.
        """
        running, serving = self.running, self._serving_now()
        for i in sorted(range(self.count), key=lambda i: (not serving[i], running[i])):
            proc, channel = self._procs[i], self._channels[i]
            if channel is None or not proc.is_alive():
                continue
            self._handed[i] += 1
            with self._hosts_lock:
                self._hosts[i][host] = self._hosts[i].get(host, 0) + 1
            try:
                socket.send_fds(channel, [host.encode("ascii")], [conn.fileno()])
                return True
            except OSError as exc:
                self._handed[i] -= 1
                self._closed(i, host, release=False)
                logger.error("Receiver process %d did not take a connection: %s", i, exc)
        logger.error("No receiver process is alive: DICOM connection closed unanswered")
        return False

    def _closed(self, index: int, host: str, release: bool = True) -> None:
        """A connection handed to process ``index`` has ended."""
        with self._hosts_lock:
            count = self._hosts[index].get(host, 0)
            if count <= 0:
                return  # counted before that process was started again: already forgotten
            if count == 1:
                del self._hosts[index][host]
            else:
                self._hosts[index][host] = count - 1
            if release:
                self.caps.release(host)

    def _dispatch(self, event: tuple[Any, ...]) -> None:
        if event[0] == "failed":  # a process started again could not serve
            logger.error("A receiver process could not start: %s", event[1])
            return
        if event[0] == "listening":
            index, pid = int(event[1]), int(event[2])
            proc = self._procs[index]
            if proc is not None and proc.pid == pid:  # not a message of an earlier process of that index
                self._serving[index] = pid
            return
        if event[0] == "closed":
            self._closed(int(event[1]), str(event[2]))
            return
        hook = self.hooks.get(event[0])
        if hook is None:
            return
        try:
            hook(*event[1:])
        except Exception:
            logger.exception("Receiver event %s: a metrics/audit hook failed", event[0])

    def _poll_events(self, timeout_s: float) -> list[tuple[Any, ...]]:
        """The events that have arrived, or the first to arrive within ``timeout_s`` (one thread at a time).

        A pipe whose process has ended (or died in the middle of an event)
        is closed and left; the process started again has a new one.
        """
        with self._readers_lock:
            retired, self._retired = self._retired, []
            readers = [r for r in self._readers if r is not None]
        for reader in retired:
            reader.close()
        if not readers:
            time.sleep(timeout_s)
            return []
        events = []
        for ready in wait(readers, timeout_s):
            reader = cast(Connection, ready)
            try:
                events.append(reader.recv())
                while len(events) < _EVENTS_AT_ONCE and reader.poll():  # what else is there already
                    events.append(reader.recv())
            except (EOFError, OSError, ValueError, pickle.UnpicklingError):
                with self._readers_lock:
                    self._readers = [None if r is reader else r for r in self._readers]
                reader.close()
        return events

    def _drain_events(self) -> None:
        while not self._closing.is_set():
            for event in self._poll_events(0.5):
                self._dispatch(event)

    @property
    def alive(self) -> int:
        """How many receiver processes are running."""
        return sum(p is not None and p.is_alive() for p in self._procs)

    def _serving_now(self) -> list[bool]:
        """For each receiver process: alive, and it has said it serves since it was last started."""
        return [p is not None and p.pid == pid and p.is_alive() for p, pid in zip(self._procs, self._serving)]

    @property
    def serving(self) -> int:
        """How many receiver processes are alive and serve (started, not still starting)."""
        return sum(self._serving_now())

    @property
    def running(self) -> list[int]:
        """Associations each receiver process is running (handed over and not yet ended)."""
        return [handed - finished for handed, finished in zip(self._handed, self._finished)]

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop listening, then stop every process (running associations end), then the event channel."""
        self._closing.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in the acceptor thread
            except OSError:
                pass
            self._listener.close()
        for thread in self._threads:  # acceptor, supervisor (no new process after this) and event drain
            thread.join(5)
        for channel in self._channels:  # a receiver process stops when its channel closes
            if channel is not None:
                channel.close()
        # Their events are read while they stop (a process waits for its last ones to be taken).
        deadline = time.monotonic() + timeout_s
        while any(p is not None and p.is_alive() for p in self._procs) and time.monotonic() < deadline:
            for event in self._poll_events(0.1):
                self._dispatch(event)
        for proc in self._procs:
            if proc is None:
                continue
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                logger.warning("Receiver process %d did not stop in %.0f s; killing it", proc.pid, timeout_s)
                proc.kill()
                proc.join(5)
        # Events the processes sent while stopping still reach the hooks.
        while any(r is not None for r in self._readers) and (events := self._poll_events(0.05)):
            for event in events:
                self._dispatch(event)
        for reader in self._readers:
            if reader is not None:
                reader.close()
        self._readers = [None] * self.count
        self._procs, self._channels, self._threads = [], [], []
