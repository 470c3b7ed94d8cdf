"""Start-up reconciliation of the spool with the state database.

The C-STORE handler renames a fully written file into place, then commits its
row, then answers success.  A crash (SIGKILL, power cut) can stop it between
any two of these steps; at the next start, before the listener opens:

* a **file without a row** was never acknowledged (the crash came before the
  commit), so the sender will send it again: the file is deleted;
* a **row without a file** cannot be processed: the row is removed and an
  error logged, so the series is never processed with a missing slice
  believed present (a series left empty is marked failed);
* a **row whose file has another size** was being replaced by a new version of
  the same SOP instance when the crash came: the row is updated to the file;
* a series that was **still receiving** keeps its completion timer, restarted
  from now: the downtime was not silence from its sender, who could not
  connect; it completes ``completion.quiet_seconds`` after the start unless
  more instances arrive.

Half-written temp files are removed by :meth:`Spool.clean_tmp`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from dicom_node.spool.layout import Spool, digest
from dicom_node.store.series import SeriesStore

logger = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    """What one reconciliation changed (relative spool paths)."""

    unrecorded_removed: list[str] = field(default_factory=list)
    missing_forgotten: list[str] = field(default_factory=list)
    rerecorded: list[str] = field(default_factory=list)
    receiving: list[str] = field(default_factory=list)


def reconcile(spool: Spool, series: SeriesStore, now: float) -> ReconcileReport:
    """Make the spool's received files and the database's instance rows agree.

    Parameters
    ----------
    spool:
        The spool; only ``spool/incoming`` is examined.
    series:
        The series store holding the instance rows.
    now:
        Current time (seconds since the epoch), recorded on changed series.

    Returns
    -------
    ReconcileReport
        The files removed, the rows forgotten and the rows updated.

    Notes
    -----
    Must run before the DICOM listener starts: a file being written by a
    running association would look unrecorded.
    """
    report = ReconcileReport()
    recorded = {r.path: r for r in series.recorded_files()}
    on_disk = {spool.relative(p): p for p in spool.incoming_files()}
    for rel, path in sorted(on_disk.items()):
        row = recorded.get(rel)
        if row is None:
            path.unlink(missing_ok=True)
            report.unrecorded_removed.append(rel)
            continue
        size = path.stat().st_size
        if size != row.size:
            series.update_instance_file(row.sop_uid, size, digest(path.read_bytes()))
            report.rerecorded.append(rel)
    missing = [r for rel, r in recorded.items() if rel not in on_disk]
    if missing:
        series.forget_instances([r.sop_uid for r in missing], now)
        report.missing_forgotten.extend(r.path for r in missing)
    for rel in report.unrecorded_removed:
        logger.warning("Spool: removed %s: written but never recorded nor acknowledged (the sender will "
                       "send it again)", rel)
    for r in missing:
        logger.error("Spool: instance %s of series %s is recorded but its file %s is missing; row removed "
                     "(ask the sender to send the series again)", r.sop_uid, r.series_uid, r.path)
    for rel in report.rerecorded:
        logger.warning("Spool: %s was replaced by a new version that was not yet recorded; row updated", rel)
    report.receiving = series.restart_quiet_periods(now)
    for uid in report.receiving:
        logger.info("Series %s: was receiving when the node stopped; its quiet period restarts now", uid)
    if not (report.unrecorded_removed or missing or report.rerecorded):
        logger.debug("Spool: %d recorded instance(s), spool and database agree", len(recorded))
    return report
