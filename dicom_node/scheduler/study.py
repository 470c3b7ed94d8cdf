"""Study rules: run a rule once a study has every series it requires (e.g. arterial and venous phase).

The state is derived from the database at every tick, so nothing extra is stored:

- a complete series that fits a required series ("role") of a study rule and
  no series rule waits in state ``complete`` with a reason starting
  :data:`WAITING` (the series tick skips such rows);
- a study rule has *fired* for its current inputs when an INFER job of the rule
  exists on a series of the study, created after the last instance of every
  input (a late instance re-opens its series and makes the rule fire again);
- each role takes the earliest received complete series that fits it (one series per role).

The rule fires when every role has a series and the study is quiet (no series
receiving, none for ``study.quiet_seconds``), or at the latest
``study.max_wait_seconds`` after the first input's last instance.  It queues,
on the first role's series (the *anchor*), one INFER job per model whose payload
names every input (``inputs: {role: series UID}``).  When a role is still missing
at ``max_wait_seconds``, one INFER job of the rule is recorded as *failed* with
the reason (``required series venous never came``), which ``dicom-node status``
shows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from dicom_node.domain import JobKind, SeriesState, SeriesSummary
from dicom_node.rules.matcher import study_roles
from dicom_node.rules.summary import never_process_reason
from dicom_node.store import Database, JobStore, SeriesStore

logger = logging.getLogger(__name__)

__all__ = ["WAITING", "StudyRules"]

#: Reason prefix of a complete series that waits for the other series of its study.
WAITING = "waiting for study"

# Studies are looked at for this long after their last instance, beyond the longest wait.
_SLACK_S = 3600.0


class StudyRules:
    """Evaluates study rules at each tick.

    Parameters
    ----------
    settings:
        Returns the current settings.
    db, series, jobs:
        The state database and its stores.
    summarise:
        Builds the summary of a series row.
    queue:
        ``queue(series_uid, rule, now, extra_payload) -> job ids``: queues the
        rule's INFER jobs (the pipeline's, so outputs and routes are planned
        the same way as for series rules).
    """

    def __init__(self, settings: Callable[[], Any], db: Database, series: SeriesStore, jobs: JobStore,
                 summarise: Callable[[dict[str, Any]], SeriesSummary],
                 queue: Callable[[str, Any, float, dict[str, Any]], list[int]]) -> None:
        self.settings = settings
        self.db = db
        self.series = series
        self.jobs = jobs
        self.summarise = summarise
        self.queue = queue

    def tick(self, now: float) -> None:
        """Fire or give up the study rules whose studies are ready at ``now``."""
        rules = [r for r in self.settings().rules if r.study is not None]
        if not rules:
            return
        horizon = max(r.study.max_wait_seconds + r.study.quiet_seconds for r in rules) + _SLACK_S
        studies = [r["study_uid"] for r in self.db.query(
            "SELECT DISTINCT study_uid FROM series WHERE last_received >= ?", (now - horizon,))]
        for study_uid in studies:
            rows = [dict(r) for r in self.db.query(
                "SELECT * FROM series WHERE study_uid=? ORDER BY first_received, series_uid", (study_uid,))]
            fits = self._fits(rows)
            for rule in rules:
                self._evaluate(rule, rows, fits, now)

    def _fits(self, rows: list[dict[str, Any]]) -> dict[str, dict[str, tuple[str, ...]]]:
        """series UID -> {rule name: roles} for the complete, processable series of a study."""
        fits: dict[str, dict[str, tuple[str, ...]]] = {}
        rules = self.settings().rules
        for row in rows:
            if row["state"] == SeriesState.RECEIVING or row["instance_count"] == 0:
                continue
            try:
                summary = self.summarise(row)
            except Exception as exc:  # noqa: BLE001 - an unreadable series takes no part
                logger.debug("Series %s: no summary for study rules (%s)", row["series_uid"], exc)
                continue
            if never_process_reason(summary) is None:
                fits[row["series_uid"]] = study_roles(rules, summary)
        return fits

    def _evaluate(self, rule: Any, rows: list[dict[str, Any]], fits: dict[str, dict[str, tuple[str, ...]]],
                  now: float) -> None:
        members: dict[str, dict[str, Any]] = {}
        for row in rows:
            for role in fits.get(row["series_uid"], {}).get(rule.name, ()):
                if role not in members and row not in members.values():
                    members[role] = row
        if not members:
            return
        latest_input = max(m["last_received"] for m in members.values())
        uids = [r["series_uid"] for r in rows]
        fired = self.db.query(
            f"SELECT MAX(created_at) AS t FROM jobs WHERE kind=? AND rule=? AND reason NOT LIKE 'superseded%'"
            f" AND series_uid IN ({','.join('?' * len(uids))})", (JobKind.INFER, rule.name, *uids))[0]["t"]
        if fired is not None and fired >= latest_input:
            return
        roles = list(rule.study.series)
        missing = [role for role in roles if role not in members]
        waited = now - min(m["last_received"] for m in members.values())
        anchor = members.get(roles[0]) or next(iter(members.values()))
        inputs = {role: members[role]["series_uid"] for role in roles if role in members}
        if missing:
            if waited >= rule.study.max_wait_seconds:
                self._give_up(rule, anchor, inputs, missing, rows, now)
            return
        receiving = any(r["state"] == SeriesState.RECEIVING for r in rows)
        quiet = not receiving and now - max(r["last_received"] for r in rows) >= rule.study.quiet_seconds
        if not quiet and waited < rule.study.max_wait_seconds:
            return
        self._prepare(anchor, now)
        ids = self.queue(anchor["series_uid"], rule, now, {"study_uid": anchor["study_uid"], "inputs": inputs})
        logger.info("Study %s: rule %s has all its series (%s); job(s) %s queued on series %s",
                    anchor["study_uid"], rule.name, ", ".join(f"{k}={v}" for k, v in inputs.items()),
                    ", ".join(map(str, ids)), anchor["series_uid"])
        self._release(rows, anchor, now, f"input of study rule {rule.name!r}: processed by job(s) "
                      f"{', '.join(map(str, ids))} on series {anchor['series_uid']}")

    def _give_up(self, rule: Any, anchor: dict[str, Any], inputs: dict[str, str], missing: list[str],
                 rows: list[dict[str, Any]], now: float) -> None:
        reason = (f"study rule {rule.name!r}: required series {', '.join(missing)} never came "
                  f"(waited {rule.study.max_wait_seconds:g} s; present: {', '.join(inputs) or 'none'})")
        self._prepare(anchor, now)
        job_id = self.jobs.enqueue(JobKind.INFER, anchor["series_uid"], now, rule=rule.name, model=rule.run[0],
                                   payload={"study_uid": anchor["study_uid"], "inputs": inputs, "missing": missing},
                                   priority=rule.job_priority)
        self.jobs.fail(job_id, reason, now)
        logger.warning("Study %s: %s", anchor["study_uid"], reason)
        self._release(rows, anchor, now, f"{reason} (recorded as job {job_id} on series {anchor['series_uid']})")

    def _prepare(self, anchor: dict[str, Any], now: float) -> None:
        # A series ignored earlier (e.g. before a rules reload) must follow its jobs again.
        if anchor["state"] == SeriesState.IGNORED:
            self.series.set_state(anchor["series_uid"], SeriesState.COMPLETE, now, WAITING)

    def _release(self, rows: list[dict[str, Any]], anchor: dict[str, Any], now: float, reason: str) -> None:
        """Series that waited only for this study rule are settled (``ignored``, with the reason)."""
        for row in rows:
            if (row["series_uid"] != anchor["series_uid"] and row["state"] == SeriesState.COMPLETE
                    and row["reason"].startswith(WAITING)):
                self.series.set_state(row["series_uid"], SeriesState.IGNORED, now, reason)
