"""Series read and decoded while they arrive, so the volume is ready when the series completes.

A worker process that has nothing to do is told which series are receiving
(their instance paths in the spool).  It reads each instance once
(:func:`pydicom.dcmread`), decodes its pixels and rescales them to modality
units into one ``float32`` buffer per series, in arrival order.  When the
series' job comes, :func:`dicom_node.imaging.load_series` takes the read
datasets and the decoded slices from here instead of reading the files
again; it still checks the whole series as it would on its own, so a
volume built from here equals the one built from the files, value for value.

What is kept, and for how long:

- At most ``max_bytes`` of decoded slices (``workers.prefetch_mb``) over
  every series; past it the rest of a series is read when its job runs.
  The buffer of a series reserves the room the budget leaves (only the
  slots filled become resident: nothing is copied as the series grows) and
  becomes the job's volume itself when it holds exactly that
  volume's slices (put in volume order in place, then trimmed); otherwise
  the slices are copied out.
- An entry is used once: the job that takes a series' slices drops what is
  left of that series (its datasets are the job's from then on).
- A series nobody asked for within :data:`EXPIRY_S` of its last addition
  (ignored by the rules, its job sent elsewhere) is dropped.
- A file changed since it was read (size, inode or modification time) is
  read again, never taken from here.

Nothing here raises for a bad file: an instance that cannot be read or
decoded is left to the job's own load, which reports it as it would.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

__all__ = ["EXPIRY_S", "Prefetch"]

#: Seconds a series' decoded slices are kept after its last instance was added, unless a job takes them.
EXPIRY_S = 600.0

_FileKey = tuple[int, int, int]  # (inode, size, mtime_ns)


def _file_key(path: Path) -> _FileKey | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class _Entry:
    key: _FileKey
    dataset: Dataset
    slot: int | None  # index into the series' buffer; None when only the dataset is kept
    at_load: bool = False  # read by the job's own load (catch_up), not ahead of it


@dataclass
class _Series:
    rows: int = 0
    columns: int = 0
    buffer: np.ndarray | None = None
    count: int = 0
    entries: dict[str, _Entry] = field(default_factory=dict)
    added: float = 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of the slices held (the buffer's unused slots are not resident)."""
        return self.count * self.rows * self.columns * 4


def _permute_in_place(buffer: np.ndarray, source: list[int]) -> None:
    """Reorder ``buffer``'s slices so that slice ``z`` becomes what slice ``source[z]`` was (a permutation).

    Follows each cycle with one slice of scratch: every slice is copied once,
    nothing of the buffer's size is allocated.
    """
    done = [False] * len(source)
    for start in range(len(source)):
        if done[start] or source[start] == start:
            continue
        scratch = buffer[start].copy()
        z = start
        while True:
            done[z] = True
            k = source[z]
            if k == start:
                buffer[z] = scratch
                break
            buffer[z] = buffer[k]
            z = k


class Prefetch:
    """Read and decoded instances of receiving series, per series, bounded by bytes.

    Parameters
    ----------
    max_bytes:
        Most bytes of decoded slices kept over every series (0: nothing is
        decoded ahead; datasets are not kept either).
    clock:
        Seconds (monotonic); a parameter for tests.
    """

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self._series: dict[str, _Series] = {}
        self._owner: dict[str, str] = {}  # path -> series UID
        self._pending: dict[str, list[str]] = {}  # series UID -> paths still to read, in arrival order

    # -- the worker's idle loop ----------------------------------------------
    def hint(self, series_uid: str, paths: Iterable[str]) -> None:
        """The instances of a receiving series so far (absolute paths, arrival order); new ones are read later."""
        if self.max_bytes <= 0:
            return
        known = self._series.get(series_uid)
        self._pending[series_uid] = [p for p in paths if known is None or p not in known.entries]

    @property
    def busy(self) -> bool:
        """Whether an instance is waiting to be read (:meth:`step` has work)."""
        return any(self._pending.values())

    def step(self) -> bool:
        """Read and decode one waiting instance; ``False`` when nothing was waiting (or room ran out)."""
        self.expire()
        for uid, paths in list(self._pending.items()):
            if not paths:
                del self._pending[uid]
                continue
            if self._used_bytes() >= self.max_bytes:
                return False  # full: the rest waits for room (a job taking its series, an expiry)
            self._add(uid, Path(paths.pop(0)))
            return True
        return False

    def expire(self) -> None:
        """Drop series whose last instance was added more than :data:`EXPIRY_S` ago."""
        now = self.clock()
        for uid in [u for u, s in self._series.items() if now - s.added > EXPIRY_S]:
            logger.debug("Prefetch: series %s expired (no job took it)", uid)
            self.drop_series(uid)

    def _used_bytes(self) -> int:
        return sum(s.nbytes for s in self._series.values())

    def _add(self, series_uid: str, path: Path) -> None:
        from dicom_node.imaging.series import DEFER_SIZE, convert_for_load, decode_plane

        key = _file_key(path)
        if key is None:
            return
        try:
            ds = pydicom.dcmread(path, defer_size=DEFER_SIZE)  # its pixel bytes are let go once decoded
        except Exception as exc:  # the job's own load reports it
            logger.debug("Prefetch: cannot read %s (%s)", path, exc)
            return
        series = self._series.setdefault(series_uid, _Series())
        series.added = self.clock()
        slot: int | None = None
        convert_for_load(ds)
        plane = decode_plane(ds)
        if plane is not None and (series.buffer is None or plane.shape == (series.rows, series.columns)):
            slot = self._store(series, plane)
        old = series.entries.pop(str(path), None)
        if old is not None and old.slot is not None:
            logger.debug("Prefetch: %s read again (changed)", path)
        series.entries[str(path)] = _Entry(key, ds, slot)
        self._owner[str(path)] = series_uid

    def _store(self, series: _Series, plane: np.ndarray) -> int | None:
        rows, columns = plane.shape
        slice_bytes = rows * columns * 4
        if self._used_bytes() + slice_bytes > self.max_bytes:
            return None
        if series.buffer is None or series.count == series.buffer.shape[0]:
            # Room for as many slices as the budget allows now, reserved once and never zero-filled: a page
            # becomes resident when its slice is written, so the unused slots cost address space only, and
            # a growing series is not copied into a larger buffer (which held it twice at that moment).
            capacity = 0 if series.buffer is None else series.buffer.shape[0]
            grown = capacity + (self.max_bytes - self._used_bytes()) // slice_bytes
            try:
                bigger = np.empty((grown, rows, columns), np.float32)
            except MemoryError:  # address space refused (strict overcommit): the job reads the rest
                return None
            if series.buffer is None:
                series.rows, series.columns = rows, columns
            else:  # room came back (another series taken or dropped) after this one had filled its own
                bigger[:series.count] = series.buffer[:series.count]
            series.buffer = bigger
        series.buffer[series.count] = plane
        series.count += 1
        return series.count - 1

    # -- the job's load --------------------------------------------------------
    def catch_up(self, paths: Iterable[Path]) -> int:
        """Read here the instances of a series being read ahead that its job finds not yet read; returns how many.

        A series that completes as soon as its last instance is recorded (a
        C-FIND peer asked on release) reaches its job before the idle worker
        has read its last instances.  Reading those into the series' buffer
        (within the budget, as :meth:`step` would) lets :meth:`volume` hand
        the buffer over instead of copying the whole volume out for the few
        slices it lacks.  Paths of series not read ahead are left to the load.
        """
        names = [str(p) for p in paths]
        owners = {self._owner[n] for n in names if n in self._owner}
        if len(owners) != 1:
            return 0
        uid = owners.pop()
        series = self._series[uid]
        missing = [n for n in names if n not in series.entries]
        pending = self._pending.get(uid)
        if pending:
            self._pending[uid] = [n for n in pending if n not in set(missing)]
        for name in missing:
            self._add(uid, Path(name))
            entry = series.entries.get(name)
            if entry is not None:
                entry.at_load = True
        return len(missing)

    def dataset(self, path: Path) -> Dataset | None:
        """The dataset read from ``path``, if it was read here and the file has not changed since."""
        uid = self._owner.get(str(path))
        if uid is None:
            return None
        entry = self._series[uid].entries.get(str(path))
        if entry is None or _file_key(path) != entry.key:
            return None
        return entry.dataset

    def volume(self, ordered: list[tuple[Path, Dataset]]) -> tuple[np.ndarray | None, list[np.ndarray | None]]:
        """The decoded slices of ``ordered`` (the volume's slices in ``z`` order, each its file and dataset).

        Returns
        -------
        (volume, planes)
            ``volume``: the series' buffer itself when it holds exactly these
            slices (put in this order in place, then handed over: no second
            volume is allocated), else ``None``;
            ``planes``: for each slice its decoded plane (a view of the
            buffer) or ``None`` where it must be decoded from its dataset.
        """
        slots: list[tuple[_Series, int] | None] = []
        for path, ds in ordered:
            uid = self._owner.get(str(path))
            series = self._series.get(uid) if uid is not None else None
            entry = series.entries.get(str(path)) if series is not None else None
            good = series is not None and entry is not None and entry.dataset is ds and entry.slot is not None
            slots.append((series, entry.slot) if good else None)  # type: ignore[arg-type,union-attr]
        first = slots[0] if slots else None
        if first is not None and first[0].count == len(ordered) and all(
                s is not None and s[0] is first[0] for s in slots) and \
                sorted(s[1] for s in slots) == list(range(len(ordered))):  # type: ignore[index]
            series = first[0]
            buffer, series.buffer = series.buffer, None
            assert buffer is not None
            _permute_in_place(buffer, [s[1] for s in slots])  # type: ignore[index]
            buffer.resize((series.count, series.rows, series.columns), refcheck=False)  # trim, in place
            return buffer, []
        return None, [None if s is None or s[0].buffer is None else s[0].buffer[s[1]] for s in slots]

    def taken(self, paths: Iterable[Path]) -> int:
        """A job loaded ``paths``: drop every series they belong to; returns how many were read ahead here."""
        names = [str(p) for p in paths]
        used = 0
        for uid in {self._owner[n] for n in names if n in self._owner}:
            entries = self._series[uid].entries
            used += sum(1 for n in names if n in entries and not entries[n].at_load)
            self.drop_series(uid)
        return used

    def drop_series(self, series_uid: str) -> None:
        series = self._series.pop(series_uid, None)
        self._pending.pop(series_uid, None)
        if series is not None:
            for path in series.entries:
                self._owner.pop(path, None)

    def held(self) -> dict[str, int]:
        """Series UID -> decoded slices held (for logs and tests)."""
        return {uid: s.count for uid, s in self._series.items()}
