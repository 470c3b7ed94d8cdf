"""Re-evaluate the rules over series already received (``dicom-node rules replay``).

A dry run by default: for each series received since a given time, what the
current rules say, and whether that differs from the rules that ran on it.
With ``apply``, the series whose outcome changed go back to ``complete``: the
running node dispatches them at its next tick with the rules it has loaded
(reload them first: SIGHUP or edit the file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dicom_node.domain import JobKind, RuleVerdict, SeriesState, SeriesSummary
from dicom_node.durations import parse_duration
from dicom_node.rules.matcher import explain, match, study_roles
from dicom_node.rules.summary import never_process_reason, read_series
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from dicom_node.store import Database, JobStore, SeriesStore

__all__ = ["ReplayItem", "parse_duration", "replay"]


@dataclass
class ReplayItem:
    """One series: what the rules say now, and what ran before."""

    row: dict[str, Any]
    summary: SeriesSummary | None
    verdicts: list[RuleVerdict] = field(default_factory=list)
    never: str = ""
    error: str = ""
    now_rules: tuple[str, ...] = ()
    before_rules: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return not self.error and set(self.now_rules) != set(self.before_rules)


def replay(settings: Settings, db: Database, spool: Spool, since: float, *, apply: bool = False,
           now: float) -> list[ReplayItem]:
    """Evaluate ``settings.rules`` over the series whose last instance arrived after ``since``.

    Parameters
    ----------
    settings:
        The configuration whose rules are evaluated.
    db, spool:
        The node's state.
    since:
        Seconds since the epoch.
    apply:
        Put every series whose outcome changed back to ``complete`` (the
        running node re-dispatches it).  Series still receiving are skipped.
    now:
        Current time (recorded as the change time).

    Returns
    -------
    list[ReplayItem]
        Oldest first.
    """
    series, jobs = SeriesStore(db), JobStore(db)
    rows = [dict(r) for r in db.query(
        "SELECT * FROM series WHERE last_received >= ? AND state != ? ORDER BY last_received",
        (since, SeriesState.RECEIVING))]
    items: list[ReplayItem] = []
    for row in rows:
        before = tuple(dict.fromkeys(j.rule for j in jobs.for_series(row["series_uid"])
                                     if j.kind == JobKind.INFER and not j.reason.startswith("superseded")))
        item = ReplayItem(row, None, before_rules=before)
        items.append(item)
        paths = series.instance_paths(row["series_uid"])
        try:
            attributes, facts = read_series(spool.absolute_all(paths))
        except Exception as exc:  # noqa: BLE001 - files gone (retention) or unreadable: say so, go on
            item.error = f"cannot read the series from the spool ({type(exc).__name__}: {exc})" if paths \
                else "no files left in the spool"
            continue
        facts.update({k: row[k] for k in ("instance_count", "calling_ae", "called_ae", "source_host")})
        item.summary = SeriesSummary(row["study_uid"], row["series_uid"], attributes, facts)
        item.never = never_process_reason(item.summary) or ""
        if item.never:
            continue
        item.verdicts = explain(settings.rules, item.summary)
        item.now_rules = tuple(m.rule for m in match(settings.rules, item.summary)) + tuple(
            study_roles(settings.rules, item.summary))
    if apply:
        for item in items:
            if item.changed:
                series.set_state(item.row["series_uid"], SeriesState.COMPLETE, now, "")
    return items
