"""SQLite state database: connection, schema, migrations.

One connection shared by the node's threads behind a lock; a rollback journal
(``journal_mode=TRUNCATE``) with ``synchronous=FULL`` so that a committed row
survives a power cut, which is what lets the C-STORE handler answer success
only after the commit.

Why not WAL: WAL keeps its index in a ``-shm`` file that every process maps
into memory; a fault under that file (a disk error, a truncation) is a SIGBUS
that kills the process on the spot, intake included, with no status sent and
no log line.  A rollback journal is read and written with ordinary file I/O:
a fault is an error (``SQLITE_IOERR``), the C-STORE handler answers 0xA700 and
the node carries on.  The price is about a millisecond more per commit
(two more fsyncs), measured on this project's CI machine.

Every write waits at most ``busy_timeout_s`` for the database (another
process holding a lock on it, a writer of our own that hangs): then it fails
with :class:`DatabaseBusyError`, well before a sender's DIMSE timeout, so the
C-STORE handler can answer 0xA700 instead of keeping the sender waiting.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicom_node.errors import DicomNodeError, StartupError

logger = logging.getLogger(__name__)

# Each entry migrates the schema from version i to i+1.  Never edit a
# released entry: append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE series (
        series_uid       TEXT PRIMARY KEY,
        study_uid        TEXT NOT NULL,
        state            TEXT NOT NULL,
        modality         TEXT NOT NULL DEFAULT '',
        calling_ae       TEXT NOT NULL DEFAULT '',
        called_ae        TEXT NOT NULL DEFAULT '',
        source_host      TEXT NOT NULL DEFAULT '',
        instance_count   INTEGER NOT NULL DEFAULT 0,
        first_received   REAL NOT NULL,
        last_received    REAL NOT NULL,
        completed_at     REAL,
        reason           TEXT NOT NULL DEFAULT '',
        updated_at       REAL NOT NULL
    );
    CREATE INDEX series_state ON series(state, last_received);
    CREATE TABLE instances (
        sop_uid          TEXT PRIMARY KEY,
        series_uid       TEXT NOT NULL REFERENCES series(series_uid),
        sop_class_uid    TEXT NOT NULL,
        transfer_syntax  TEXT NOT NULL,
        path             TEXT NOT NULL,
        size             INTEGER NOT NULL,
        sha256           TEXT NOT NULL,
        received_at      REAL NOT NULL
    );
    CREATE INDEX instances_series ON instances(series_uid);
    CREATE TABLE jobs (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        kind             TEXT NOT NULL,
        state            TEXT NOT NULL,
        series_uid       TEXT NOT NULL REFERENCES series(series_uid),
        rule             TEXT NOT NULL DEFAULT '',
        model            TEXT NOT NULL DEFAULT '',
        destination      TEXT NOT NULL DEFAULT '',
        payload          TEXT NOT NULL DEFAULT '{}',
        priority         INTEGER NOT NULL DEFAULT 0,
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  REAL NOT NULL DEFAULT 0,
        created_at       REAL NOT NULL,
        updated_at       REAL NOT NULL,
        reason           TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX jobs_due ON jobs(kind, state, next_attempt_at);
    CREATE INDEX jobs_series ON jobs(series_uid);
    CREATE TABLE results (
        sop_uid          TEXT PRIMARY KEY,
        source_series    TEXT NOT NULL REFERENCES series(series_uid),
        model            TEXT NOT NULL,
        kind             TEXT NOT NULL,
        series_uid       TEXT NOT NULL,
        path             TEXT NOT NULL,
        created_at       REAL NOT NULL
    );
    CREATE INDEX results_source ON results(source_series);
    """,
    # 2: the audit trail (append-only: triggers refuse UPDATE and DELETE).
    """
    CREATE TABLE audit (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        at               REAL NOT NULL,
        event            TEXT NOT NULL,
        study_uid        TEXT NOT NULL DEFAULT '',
        series_uid       TEXT NOT NULL DEFAULT '',
        peer_ae          TEXT NOT NULL DEFAULT '',
        peer_host        TEXT NOT NULL DEFAULT '',
        detail           TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_at ON audit(at);
    CREATE INDEX audit_series ON audit(series_uid, at);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    """,
)


#: Rollback journal, truncated after each commit: no memory-mapped ``-shm`` file (see the module docstring).
JOURNAL_MODE = "TRUNCATE"
#: How long a write waits for the database before it fails (``storage.database_busy_timeout_s``).
DEFAULT_BUSY_TIMEOUT_S = 10.0


class DatabaseBusyError(DicomNodeError):
    """The state database stayed locked past the busy deadline; the operation may succeed later."""

    retryable = True


class Database:
    """The node's SQLite database.

    Parameters
    ----------
    path:
        Database file; created with the schema when missing.  ``":memory:"``
        is accepted for tests of pure logic.
    """

    def __init__(self, path: Path | str, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=busy_timeout_s
        )
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        # Writers in other processes (the receivers) queue on this file lock: a blocked writer
        # wakes as soon as the lock is free, where SQLite's own busy handler sleeps and polls.
        self._lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600) if path != ":memory:" else None
        with self._writer():
            self._conn.execute(f"PRAGMA journal_mode={JOURNAL_MODE}")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()

    @contextmanager
    def _writer(self) -> Iterator[None]:
        """This thread, and no other thread or process, may write now."""
        with self._lock:
            if self._lock_fd is not None:
                self._flock_within_deadline()
            try:
                yield
            finally:
                if self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _flock_within_deadline(self) -> None:
        """Take the writers' file lock, polling (0.5 ms doubling to 20 ms) until ``busy_timeout_s``."""
        assert self._lock_fd is not None
        deadline = time.monotonic() + self.busy_timeout_s
        pause = 0.0005
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DatabaseBusyError(f"the state database {self.path} has been locked by another writer for "
                                            f"more than {self.busy_timeout_s:.0f} s", retryable=True) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.02)

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"State database {self.path} has schema version {version}, newer than this "
                f"dicom-node ({len(MIGRATIONS)}); upgrade dicom-node or use another storage.path"
            )
        for i in range(version, len(MIGRATIONS)):
            logger.info("Database: migrating schema %d -> %d", i, i + 1)
            self._conn.executescript("BEGIN;" + MIGRATIONS[i] + f"; PRAGMA user_version={i + 1}; COMMIT;")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction holding the node-wide write lock; committed on exit."""
        with self._writer():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        """Read-only query outside a transaction."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def ping(self) -> bool:
        try:
            self.query("SELECT 1")
            return True
        except sqlite3.Error:
            return False

    def write_problem(self) -> str | None:
        """Why a write to the database fails now (``None`` when it works), for ``/readyz``.

        Rewrites the schema version with its own value: a real commit through
        the journal and the fsyncs, without changing any row.
        """
        try:
            with self.transaction() as conn:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                conn.execute(f"PRAGMA user_version={version}")
        except (sqlite3.Error, DatabaseBusyError) as exc:
            return str(exc)
        return None

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


def open_database(path: Path, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> Database:
    """Open the node's state database at start, turning every failure into one line naming ``storage.path``.

    Raises
    ------
    StartupError
        The database is locked by another process, is not a SQLite database,
        or cannot be opened.
    """
    try:
        return Database(path, busy_timeout_s)
    except DatabaseBusyError as exc:
        raise StartupError(f"storage.path: {exc}: stop the process that holds it (fuser {path}) and start "
                           "again") from None
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise StartupError(f"storage.path: the state database {path} is locked by another process "
                               f"({exc}): stop the process that holds it (fuser {path}) and start again") from None
        raise StartupError(f"storage.path: cannot open the state database {path}: {exc}: check the "
                           "permissions and free space of storage.path") from None
    except sqlite3.DatabaseError as exc:
        raise StartupError(f"storage.path: {path} is not a dicom-node state database ({exc}): move it "
                           "away or choose another storage.path") from None
