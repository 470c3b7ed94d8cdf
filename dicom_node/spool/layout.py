"""Spool paths built from validated UIDs, and the atomic writer."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import itertools
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from dicom_node.errors import InvalidUIDError

logger = logging.getLogger(__name__)

# PS3.5 9.1: components of digits separated by '.', no leading zero in a
# multi-digit component, at most 64 characters.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A worker's warm-up folder under ``tmp/`` (removed by Spool.clean_tmp when a killed worker left it).
WARM_UP_PREFIX = "warm-up-"


def validate_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` as a UID string if it is a valid DICOM UID.

    Raises
    ------
    InvalidUIDError
        If the value is missing, empty, longer than 64 characters or not of
        the form ``1.2.840...`` (digits and dots).  The message never repeats
        more than the first 80 characters of the offending value.
    """
    if value is None:
        raise InvalidUIDError(f"{what} is missing")
    text = str(value).rstrip("\x00").strip()
    if not text:
        raise InvalidUIDError(f"{what} is empty")
    if len(text) > 64:
        raise InvalidUIDError(f"{what} is longer than 64 characters ({len(text)})")
    if not _UID_RE.match(text):
        raise InvalidUIDError(f"{what} {text[:80]!r} is not a valid DICOM UID (digits and dots only)")
    return text


def validate_name(value: str, what: str = "name") -> str:
    """A model or output name used as a path component: ``[A-Za-z0-9_.-]``, no leading dot."""
    if not _NAME_RE.match(value) or value in {".", ".."}:
        raise InvalidUIDError(f"{what} {value[:80]!r} is not usable in a path")
    return value


class Spool:
    """Filesystem layout of received instances and results.

    Parameters
    ----------
    root:
        The state directory (``storage.path``); ``spool/`` is created inside.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "spool"
        self.incoming = self.root / "incoming"
        self.results = self.root / "results"
        self.tmp = self.root / "tmp"
        self.intake = self.root / "intake"  # the receivers' intake journals (dicom_node.receive.journal)
        for d in (self.incoming, self.results, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._resolved_root = self.root.resolve()

    # -- paths -------------------------------------------------------------
    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where a received instance lives; every component validated."""
        return (
            self.incoming
            / validate_uid(study_uid, "StudyInstanceUID")
            / validate_uid(series_uid, "SeriesInstanceUID")
            / f"{validate_uid(sop_uid, 'SOPInstanceUID')}.dcm"
        )

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return (
            self.incoming
            / validate_uid(study_uid, "StudyInstanceUID")
            / validate_uid(series_uid, "SeriesInstanceUID")
        )

    def result_path(self, source_series_uid: str, model: str, kind: str) -> Path:
        return (
            self.results
            / validate_uid(source_series_uid, "SeriesInstanceUID")
            / validate_name(model, "model name")
            / f"{validate_name(kind, 'output kind')}.dcm"
        )

    def result_part_path(self, source_series_uid: str, model: str, kind: str, index: int) -> Path:
        """Where part ``index`` (0-based) of a multi-object result (overlay series) lives."""
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise InvalidUIDError(f"result part index {index!r} is not a non-negative integer")
        return self.result_path(source_series_uid, model, kind).with_name(
            f"{validate_name(kind, 'output kind')}-{index:05d}.dcm")

    def relative(self, path: Path) -> str:
        """Path relative to the spool root, as stored in the database."""
        return str(path.relative_to(self.root))

    def absolute(self, relative: str) -> Path:
        """The file of a stored relative path; refused when it (or a link on its way) leads outside the spool."""
        path = Path(os.path.realpath(self.root / relative))
        if path == self._resolved_root or not path.is_relative_to(self._resolved_root):
            raise InvalidUIDError(f"stored path {relative[:80]!r} is outside the spool")
        return path

    def absolute_all(self, relatives: Iterable[str], directories: dict[str, str | None] | None = None) -> list[Path]:
        """:meth:`absolute` of many stored paths (a series' instances): the same paths, the same refusals.

        ``os.path.realpath`` looks at every component of every path (a dozen
        ``lstat`` calls each: 6-10 ms for a 200-instance series, several
        times per job); here each directory is resolved and checked once,
        and each file is looked at once: a name that is a link, or not a
        plain name, goes through :meth:`absolute` itself.  ``directories``:
        the directories resolved so far (relative -> real path inside the
        spool, or ``None``), kept by a caller that resolves a stream of
        paths in small batches (the intake journal's materialiser) and
        forgets them when the stream ends.
        """
        if directories is None:
            directories = {}
        root, inside_root = str(self.root), str(self._resolved_root)
        prefix = inside_root if inside_root.endswith(os.sep) else inside_root + os.sep
        out: list[Path] = []
        for relative in relatives:  # strings, not pathlib, on the way: this runs for every received instance
            head, name = os.path.split(relative)
            real = directories.get(head, "")
            if real == "":
                resolved = self._plain_directory(inside_root, head)
                if resolved is None:  # a link or an odd name on the way: resolved and checked in full
                    resolved = os.path.realpath(os.path.join(root, head))
                real = directories[head] = resolved if resolved == inside_root or resolved.startswith(prefix) \
                    else None
            path = os.path.join(real, name) if real is not None and name not in {"", ".", ".."} else None
            if path is None or os.path.islink(path):
                out.append(self.absolute(relative))
            else:
                out.append(Path(path))
        return out

    @staticmethod
    def _plain_directory(inside_root: str, head: str) -> str | None:
        """``inside_root/head`` when every component of ``head`` is a plain name and none is a link, else ``None``.

        One ``lstat`` per existing component (what ``os.path.realpath`` does
        for every component of the whole path, the spool's own ancestors
        included); a component that does not exist ends the walk: nothing
        below it can be a link.
        """
        names = head.split(os.sep)
        if any(name in {"", ".", ".."} for name in names):
            return None
        for depth in range(1, len(names) + 1):
            try:
                mode = os.lstat(os.path.join(inside_root, *names[:depth])).st_mode
            except FileNotFoundError:
                break
            if not stat.S_ISDIR(mode):
                return None
        return os.path.join(inside_root, *names)

    # -- writing -----------------------------------------------------------
    def write_atomic(self, path: Path, data: bytes | memoryview) -> None:
        """Write ``data`` to ``path`` so that a crash leaves either nothing or the whole file.

        Temp file in ``spool/tmp`` (same filesystem), ``fsync``, ``rename``,
        then ``fsync`` of the target directory so the rename itself is durable.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def write_unsynced(self, path: Path, data: bytes | memoryview, head: bytes = b"") -> int:
        """Write ``head`` then ``data`` to a temp file renamed to ``path``; returns its open descriptor, not yet synced.

        For a caller that syncs many files at once (the intake journal's
        materialiser): ``os.fsync`` the descriptor, close it, then sync the
        directory.  Readers see the old file or the new one, never a part.
        ``head`` saves the caller joining it to ``data`` (a copy of the whole).
        """
        fd, tmp_name = self._temp_file()
        try:
            parts = [memoryview(head), memoryview(data)]
            while parts:
                written = os.writev(fd, parts)
                while parts and written >= len(parts[0]):  # whole parts written (and empty ones) drop off
                    written -= len(parts[0])
                    parts.pop(0)
                if parts:
                    parts[0] = parts[0][written:]
            try:
                os.replace(tmp_name, path)
            except FileNotFoundError:  # the series' first file: its directory is made (not looked for each time)
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp_name, path)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise
        return fd

    def _temp_file(self) -> tuple[int, str]:
        """A new ``tmp/*.part`` file, open for writing: named by this process and a counter (``mkstemp``'s
        random names cost more than the rest of writing a file's metadata), ``mkstemp``'s if that name is taken."""
        name = os.path.join(self.tmp, f"{os.getpid()}-{next(_TEMP_NAMES)}.part")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), name
        except FileExistsError:  # left by an earlier process of the same ID
            return tempfile.mkstemp(dir=self.tmp, suffix=".part")

    def sync_filesystem(self) -> None:
        """Make every file written under the spool so far durable, with its directory entry: one ``syncfs``.

        For a writer that leaves its files unsynced while another durable copy
        exists (the intake journal's materialiser) and must make them durable
        before it gives that copy up.  Where ``syncfs`` is not available, ``sync``.

        Raises
        ------
        OSError
            The filesystem reported a write error.
        """
        fd = os.open(self.root, os.O_RDONLY)
        try:
            _syncfs(fd)
        finally:
            os.close(fd)

    @staticmethod
    def settle(fds: list[int], directories: set[Path]) -> None:
        """Sync and close the descriptors :meth:`write_unsynced` returned, then sync their directories once.

        Closes every descriptor even when a sync fails (the error is raised
        after); ``fds`` is emptied.
        """
        error: OSError | None = None
        while fds:
            fd = fds.pop()
            try:
                os.fsync(fd)
            except OSError as exc:
                error = error or exc
            finally:
                os.close(fd)
        if error is not None:
            raise error
        for directory in directories:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def clean_tmp(self) -> int:
        """Remove half-written temp files and warm-up folders left by a crash; returns how many.

        A worker's warm-up (:func:`dicom_node.scheduler.pipeline.warm_up`)
        works in ``tmp/warm-up-*``; a worker stopped or killed during it
        leaves that folder behind.  Called at the node's start, before any
        worker runs.
        """
        count = 0
        for leftover in self.tmp.glob("*.part"):
            leftover.unlink(missing_ok=True)
            count += 1
        for folder in self.tmp.glob(f"{WARM_UP_PREFIX}*"):
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)
                count += 1
        if count:
            logger.warning("Spool: removed %d half-written temp file(s) or warm-up folder(s) left by an earlier "
                           "crash", count)
        return count

    def free_mb(self) -> float:
        """Free space on the spool filesystem in MiB."""
        return shutil.disk_usage(self.root).free / (1024 * 1024)

    def incoming_files(self) -> list[Path]:
        """Every received instance file in the spool (``incoming/<study>/<series>/<sop>.dcm``)."""
        return [p for p in self.incoming.glob("*/*/*.dcm") if p.is_file()]

    def remove_series(self, study_uid: str, series_uid: str) -> None:
        shutil.rmtree(self.series_dir(study_uid, series_uid), ignore_errors=True)


#: Numbers of this process's temp files (``next`` is atomic under the GIL).
_TEMP_NAMES = itertools.count()


def digest(data: bytes | memoryview, *more: bytes | memoryview) -> str:
    """SHA-256 of received bytes, ``more`` following ``data`` (identifies duplicates of the same SOP instance)."""
    sha = hashlib.sha256(data)
    for part in more:
        sha.update(part)
    return sha.hexdigest()


def _load_syncfs() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name, use_errno=True).syncfs if name else None
    except (OSError, AttributeError):
        return None
    if function is not None:
        function.argtypes = [ctypes.c_int]
        function.restype = ctypes.c_int
    return function


_SYNCFS = _load_syncfs()


def _syncfs(fd: int) -> None:
    """``syncfs(2)`` of the filesystem holding ``fd`` (Linux; ``sync`` elsewhere); the GIL is released meanwhile."""
    if _SYNCFS is None:
        os.sync()
        return
    if _SYNCFS(fd) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"syncfs: {os.strerror(errno)}")
