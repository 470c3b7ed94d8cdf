"""Retention: remove the files and rows of finished work.

A series is *finished* when its state is ``done``, ``ignored`` or ``failed``
and none of its jobs is queued, running or retrying.  Finished series are
removed (received instances, results, thumbnails, and their rows in
``series``, ``instances``, ``jobs`` and ``results``) once they have been
finished for ``storage.retention_hours``, or earlier, oldest first, while the
spool has less than ``storage.cleanup_free_mb`` free.  Work in progress is
never touched.  The audit trail is kept (it is append-only).

Each series is removed in one database transaction that re-checks that it is
still finished: a late instance that re-opens the series, or an operator's
``jobs retry``, takes the database lock first and keeps the series.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dicom_node.domain import JobState, SeriesState
from dicom_node.errors import InvalidUIDError
from dicom_node.spool import Spool, validate_uid
from dicom_node.store import Database

logger = logging.getLogger(__name__)

FINISHED = (SeriesState.DONE, SeriesState.IGNORED, SeriesState.FAILED)
_ACTIVE_JOBS = (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING)

_FINISHED_SQL = (
    "SELECT s.series_uid, s.study_uid, s.updated_at FROM series s"
    f" WHERE s.state IN ({','.join('?' * len(FINISHED))})"
    " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid"
    f" AND j.state IN ({','.join('?' * len(_ACTIVE_JOBS))}))"
    # An input of a study rule's pending job (payload inputs: {role: series_uid}) is still needed.
    " AND NOT EXISTS (SELECT 1 FROM jobs j2, json_each(j2.payload, '$.inputs') AS inp"
    f" WHERE inp.value = s.series_uid AND j2.state IN ({','.join('?' * len(_ACTIVE_JOBS))}))"
)
_FINISHED_PARAMS = (*FINISHED, *_ACTIVE_JOBS, *_ACTIVE_JOBS)


@dataclass
class RetentionReport:
    """What one retention pass removed."""

    expired: list[str] = field(default_factory=list)      # series past retention_hours
    pressure: list[str] = field(default_factory=list)     # series removed early for disk space
    bytes_freed: int = 0


class Retention:
    """Deletes finished work.

    Parameters
    ----------
    db, spool:
        State database and spool.
    storage:
        ``storage:`` settings (``retention_hours``, ``cleanup_threshold_mb()``).
    free_mb:
        Free MiB on the spool filesystem (a parameter so tests can simulate pressure).
    on_purged:
        Called per removed series with ``(study_uid, series_uid, reason, bytes)``
        (audit trail, metrics); must not raise.
    """

    def __init__(self, db: Database, spool: Spool, storage: Any, free_mb: Callable[[], float] | None = None,
                 on_purged: Callable[[str, str, str, int], None] | None = None) -> None:
        self.db = db
        self.spool = spool
        self.storage = storage
        self.free_mb = free_mb or spool.free_mb
        self.on_purged = on_purged or (lambda study, series, reason, size: None)

    def finished_series(self, older_than: float | None = None) -> list[dict[str, Any]]:
        """Finished series, oldest finished first; only those finished at or before ``older_than``."""
        sql = _FINISHED_SQL
        params: list[object] = list(_FINISHED_PARAMS)
        if older_than is not None:
            sql += " AND s.updated_at <= ?"
            params.append(older_than)
        return [dict(r) for r in self.db.query(sql + " ORDER BY s.updated_at, s.series_uid", tuple(params))]

    def run(self, now: float) -> RetentionReport:
        """One pass: expired series first, then the oldest finished ones while space is short."""
        report = RetentionReport()
        cutoff = now - self.storage.retention_hours * 3600
        for row in self.finished_series(older_than=cutoff):
            freed = self.purge(row["series_uid"], f"finished more than {self.storage.retention_hours:g} h ago")
            if freed is not None:
                report.expired.append(row["series_uid"])
                report.bytes_freed += freed
        threshold = self.storage.cleanup_threshold_mb()
        if self.free_mb() < threshold:
            candidates = self.finished_series()
            logger.warning("Retention: %.0f MiB free, below storage.cleanup_free_mb=%d; removing finished "
                           "work early (%d finished series, oldest first)", self.free_mb(), threshold,
                           len(candidates))
            for row in candidates:
                if self.free_mb() >= threshold:
                    break
                freed = self.purge(row["series_uid"], "disk space below storage.cleanup_free_mb")
                if freed is not None:
                    report.pressure.append(row["series_uid"])
                    report.bytes_freed += freed
            if self.free_mb() < threshold:
                logger.warning("Retention: still %.0f MiB free after removing all finished work; the rest is "
                               "work in progress", self.free_mb())
        if report.expired or report.pressure:
            logger.info("Retention: removed %d expired and %d series for disk space (%.1f MiB)",
                        len(report.expired), len(report.pressure), report.bytes_freed / 2**20)
        return report

    def purge(self, series_uid: str, reason: str) -> int | None:
        """Remove one finished series' files and rows; ``None`` if it is no longer finished.

        Files are removed while the transaction holds the database lock, so
        no job can be created for the series meanwhile.
        """
        freed = 0
        with self.db.transaction() as c:
            row = c.execute(_FINISHED_SQL + " AND s.series_uid = ?",
                            (*_FINISHED_PARAMS, series_uid)).fetchone()
            if row is None:
                return None
            study_uid = row["study_uid"]
            paths = [r["path"] for r in c.execute("SELECT path FROM instances WHERE series_uid=?", (series_uid,))]
            paths += [r["path"] for r in c.execute("SELECT path FROM results WHERE source_series=?", (series_uid,))]
            c.execute("DELETE FROM results WHERE source_series=?", (series_uid,))
            c.execute("DELETE FROM jobs WHERE series_uid=?", (series_uid,))
            c.execute("DELETE FROM instances WHERE series_uid=?", (series_uid,))
            c.execute("DELETE FROM series WHERE series_uid=?", (series_uid,))
            for rel in paths:
                freed += self._unlink(rel)
            freed += self._remove_tree(series_uid, study_uid)
        logger.info("Retention: series %s removed (%s)", series_uid, reason)
        self.on_purged(study_uid, series_uid, reason, freed)
        return freed

    def _unlink(self, rel: str) -> int:
        try:
            path = self.spool.absolute(rel)
            size = path.stat().st_size
            path.unlink()
            return size
        except FileNotFoundError:
            return 0
        except (OSError, InvalidUIDError) as exc:
            logger.warning("Retention: could not remove %s: %s", rel, exc)
            return 0

    def _remove_tree(self, series_uid: str, study_uid: str) -> int:
        """Results folder (thumbnails included) and the now empty instance folders."""
        freed = 0
        try:
            results = self.spool.results / validate_uid(series_uid, "SeriesInstanceUID")
            series_dir = self.spool.series_dir(study_uid, series_uid)
        except InvalidUIDError as exc:
            logger.warning("Retention: not removing folders of %s: %s", series_uid, exc)
            return 0
        if results.is_dir():
            for f in results.rglob("*"):
                if f.is_file():
                    freed += f.stat().st_size
            shutil.rmtree(results, ignore_errors=True)
        for d in (series_dir, series_dir.parent):
            try:
                os.rmdir(d)  # only when empty: never removes a file nobody recorded
            except OSError:
                break
        return freed
