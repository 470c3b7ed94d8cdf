"""A C-STORE data set as it arrives: in memory while small, in a spool file beyond, refused past a size limit.

pynetdicom gathers every data set in a ``BytesIO`` until its last fragment:
a receiver taking one 800 MB instance (a multi-frame secondary capture)
peaked at 920 MB of resident memory, and nothing bounded it: ten
associations sending whole-slide images, or one peer streaming a data set
without end, ran the receiver out of memory and every association on it
with it.  :class:`StoreDimseProvider` gathers a plain C-STORE's data set in
a :class:`DataSetBuffer` instead:

* up to :data:`MEMORY_BYTES` in memory, as before (a CT or MR slice, a
  mammogram: the intake journal takes those bytes);
* past that, in a file under the spool's ``tmp/`` (the spool's filesystem):
  the instance's Part 10 head first (:func:`~dicom_node.receive.journal.part10_head`),
  then every fragment as it is read, its SHA-256 taken on the way.  The
  handler finds a :class:`SpilledDataSet` on the request and makes that file
  the instance's own (``fdatasync``, rename, directory sync) instead of
  appending the bytes to the journal: written once, never held whole;
* past ``node.max_instance_mb`` the bytes are dropped (the rest of the data
  set is still read: the association stays usable) and the request is
  answered ``0xA700`` (Refused: Out of Resources) without calling the
  handler; so is one whose spill file cannot be written, or that would take
  the spool below ``storage.min_free_mb``.  The sender keeps its copy.

A spill file left by a receiver that was killed is removed by
:meth:`~dicom_node.spool.Spool.clean_tmp` at the next start (``*.part``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

logger = logging.getLogger(__name__)

#: Data set bytes kept in memory per C-STORE before they go to a spill file.
MEMORY_BYTES: Final = 32 * 1024 * 1024
#: Spill bytes written between two looks at the spool's free space.
_FREE_CHECK_BYTES: Final = 64 * 1024 * 1024


@dataclass(frozen=True)
class IntakeLimits:
    """What bounds a received data set (module docstring).

    ``max_bytes``: ``node.max_instance_mb``; ``spill_dir``: the spool's
    ``tmp/``; ``free_mb`` and ``min_free_mb``: the spool's free space and
    ``storage.min_free_mb``; ``memory_bytes``: :data:`MEMORY_BYTES` (a
    parameter for tests).
    """

    max_bytes: int
    spill_dir: Path
    free_mb: Callable[[], float]
    min_free_mb: float
    memory_bytes: int = MEMORY_BYTES


class SpilledDataSet(io.BytesIO):
    """A received data set in a spool file behind its Part 10 head; reads as the data set alone.

    ``request.DataSet`` of a C-STORE whose data set went past
    :data:`MEMORY_BYTES` (a ``BytesIO``, as pynetdicom's primitive requires,
    whose reads come from the file).  ``path`` is the whole Part 10 file;
    ``head_size`` its preamble and File Meta Information; ``size`` the data
    set's bytes; ``sha256`` the digest of the whole file.  :meth:`getvalue`
    gives the data set's bytes as pynetdicom's ``BytesIO`` does (for a
    handler that wants them: all of them, in memory); :meth:`commit` makes
    the file an instance's.  Closing it removes the file unless it was
    committed.
    """

    def __init__(self, path: Path, fd: int, head_size: int, size: int, sha256: str) -> None:
        super().__init__()
        self.path, self.head_size, self.size, self.sha256 = path, head_size, size, sha256
        self._fd: int | None = fd
        self._position = 0
        self._committed = False

    @property
    def file_size(self) -> int:
        return self.head_size + self.size

    def read(self, size: int | None = -1) -> bytes:
        if self._fd is None:
            raise ValueError("read from a closed spilled data set")
        left = max(0, self.size - self._position)
        wanted = left if size is None or size < 0 else min(size, left)
        data = os.pread(self._fd, wanted, self.head_size + self._position) if wanted else b""
        self._position += len(data)
        return data

    def read1(self, size: int | None = -1) -> bytes:
        return self.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def getbuffer(self) -> memoryview:
        raise io.UnsupportedOperation("a spilled data set is not in memory: read it, or use its path")

    def write(self, data: Any) -> int:
        raise io.UnsupportedOperation("a spilled data set is read-only")

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def getvalue(self) -> bytes:
        """The whole data set in memory (pynetdicom's ``event.dataset`` and ``encoded_dataset`` call this)."""
        self.seek(0)
        return self.read()

    def commit(self, path: Path) -> None:
        """Make the file ``path`` durably: its data synced, renamed there, the directory synced.

        Raises
        ------
        OSError
            Nothing was renamed when the sync fails; the file stays the spill's.
        """
        if self._fd is None:
            raise ValueError("commit of a closed spilled data set")
        os.fdatasync(self._fd)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, path)
        self._committed = True
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
            if not self._committed:
                self.path.unlink(missing_ok=True)
        super().close()


class DataSetBuffer:
    """Gathers one C-STORE's data set fragments (module docstring).

    ``limits`` ``None``: in memory, unbounded (pynetdicom's own behaviour).
    ``head``: returns the instance's Part 10 head, or ``None`` when it
    cannot be made (the data set then may not leave memory: refused past
    :data:`MEMORY_BYTES`); called once, when the data set spills.
    """

    def __init__(self, limits: IntakeLimits | None = None, head: Callable[[], bytes | None] | None = None) -> None:
        self.limits = limits
        self._head = head
        self.size = 0  # data set bytes received, kept or not
        self.refused: str | None = None  # why the request is answered 0xA700
        self._memory: io.BytesIO | None = io.BytesIO()
        self._spill: tuple[Path, int, int] | None = None  # path, descriptor, head size
        self._sha = hashlib.sha256()
        self._spilled_since_check = 0

    def write(self, fragment: memoryview) -> None:
        self.size += len(fragment)
        if self.refused is not None:
            return
        limits = self.limits
        if limits is None:
            assert self._memory is not None
            self._memory.write(fragment)
            return
        if self.size > limits.max_bytes:
            self._refuse(f"a data set of more than {limits.max_bytes // (1024 * 1024)} MiB (node.max_instance_mb)")
            return
        if self._spill is None and self.size <= limits.memory_bytes:
            assert self._memory is not None
            self._memory.write(fragment)
            return
        try:
            if self._spill is None:
                self._start_spill(limits)
                if self._spill is None:
                    return
            self._spilled_since_check += len(fragment)
            if self._spilled_since_check >= _FREE_CHECK_BYTES:
                self._spilled_since_check = 0
                free = limits.free_mb()
                if free < limits.min_free_mb:
                    self._refuse(f"the spool has {free:.0f} MB free, below storage.min_free_mb={limits.min_free_mb:g}")
                    return
            self._append(fragment)
        except OSError as exc:
            self._refuse(f"its spill file could not be written: {exc.strerror or exc}")

    def _start_spill(self, limits: IntakeLimits) -> None:
        head = self._head() if self._head is not None else None
        if head is None:
            self._refuse("a large data set on a presentation context the node did not accept")
            return
        free = limits.free_mb()
        if free < limits.min_free_mb:
            self._refuse(f"the spool has {free:.0f} MB free, below storage.min_free_mb={limits.min_free_mb:g}")
            return
        fd, name = tempfile.mkstemp(dir=limits.spill_dir, suffix=".part")
        self._spill = (Path(name), fd, len(head))
        memory, self._memory = self._memory, None
        assert memory is not None
        self._append(memoryview(head))
        self._append(memory.getbuffer())

    def _append(self, data: memoryview) -> None:
        assert self._spill is not None
        self._sha.update(data)
        fd = self._spill[1]
        while data:
            written = os.write(fd, data)
            data = data[written:]

    def _refuse(self, reason: str) -> None:
        self.refused = reason
        self._memory = None
        self.discard()

    def result(self) -> io.BytesIO | SpilledDataSet:
        """The data set once its last fragment is in: pynetdicom's ``BytesIO``, or the spill file."""
        assert self.refused is None
        if self._spill is None:
            assert self._memory is not None
            return self._memory
        path, fd, head_size = self._spill
        self._spill = None
        return SpilledDataSet(path, fd, head_size, self.size, self._sha.hexdigest())

    def discard(self) -> None:
        """Drop what was gathered (the association ended, or the request was refused)."""
        if self._spill is not None:
            path, fd, _ = self._spill
            self._spill = None
            os.close(fd)
            path.unlink(missing_ok=True)
