"""Where a node's state lives under ``storage.path``, and the claim that only one node uses it.

Layout::

    <storage.path>/dicom-node.sqlite3      the state database (store/)
    <storage.path>/dicom-node.sqlite3.lock the writers' lock (store/database.py)
    <storage.path>/node.lock               held by the running node (this module)
    <storage.path>/spool/...               received instances and results (spool/)

The receiver processes and the command line open the same database; only
``serve`` claims ``node.lock``: a second node started on the same state
directory would run the same jobs twice, so it is refused at start.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from dicom_node.errors import StartupError
from dicom_node.settings import StorageSettings

DATABASE_NAME = "dicom-node.sqlite3"
NODE_LOCK_NAME = "node.lock"


def state_paths(storage: StorageSettings) -> tuple[Path, Path]:
    """(state directory, database file) of a ``storage:`` section."""
    root = storage.resolved_path()
    return root, root / DATABASE_NAME


def storage_problem(path: Path) -> str | None:
    """Why ``storage.path`` cannot hold the node's state, or ``None`` when it can.

    Nothing is created: the path must be a writable directory, or a path whose
    nearest existing ancestor is a writable directory (the node creates the rest).
    Used by ``check-config`` and at start.
    """
    path = path.expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            return f"storage.path: {probe} is a broken symbolic link"
        probe = probe.parent
    if not probe.is_dir():
        return (f"storage.path: {path} is under {probe}, which is a file, not a directory: "
                "choose another storage.path")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is" if probe == path else f"would be created in {probe}, which is"
        return (f"storage.path: {path} {what} not writable by this user (uid {os.getuid()}): "
                "make it writable by the node's user (chown/chmod) or choose another storage.path")
    return None


class NodeLock:
    """An exclusive, non-blocking ``flock`` on ``<storage.path>/node.lock`` for the node's lifetime.

    The kernel releases it when the process ends, however it ends (SIGKILL
    included), so a stale lock never blocks a restart.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / NODE_LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Claim the state directory.

        Raises
        ------
        StartupError
            Another running node holds it (its pid is in the message), or the
            lock file cannot be created.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StartupError(f"storage.path: cannot create {self.path}: {exc.strerror}: make "
                               f"{self.path.parent} writable by the node's user or choose another storage.path") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StartupError(f"storage.path: another dicom-node (pid {holder}) is running on "
                                   f"{self.path.parent}: stop it, or give this node its own storage.path") from None
            raise StartupError(f"storage.path: cannot lock {self.path}: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the state directory up (also done by the kernel at exit)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
