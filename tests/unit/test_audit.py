"""The audit trail: append-only rows, queries by time/series/event, pipeline events translated."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dicom_node.durations import parse_duration
from dicom_node.store import Database
from dicom_node.store.audit import AuditEvent, AuditLog


@pytest.fixture()
def audit(tmp_path: Path) -> AuditLog:
    return AuditLog(Database(tmp_path / "state.sqlite3"), clock=lambda: 1000.0)


def test_rows_cannot_be_changed_or_deleted(audit: AuditLog) -> None:
    audit.record(AuditEvent.SERIES_RECEIVED, series_uid="1.2.3", peer_ae="MOD", peer_host="10.0.0.1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        with audit.db.transaction() as c:
            c.execute("UPDATE audit SET peer_ae='X'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        with audit.db.transaction() as c:
            c.execute("DELETE FROM audit")
    assert [r.peer_ae for r in audit.query()] == ["MOD"]


def test_query_filters_by_time_series_and_event(audit: AuditLog) -> None:
    audit.record(AuditEvent.ASSOCIATION_ACCEPTED, peer_ae="PACS", peer_host="10.0.0.2", at=10.0)
    audit.record(AuditEvent.SERIES_RECEIVED, series_uid="1.2.3", at=20.0)
    audit.record(AuditEvent.SERIES_COMPLETED, series_uid="1.2.3", at=30.0)
    audit.record(AuditEvent.SERIES_RECEIVED, series_uid="1.2.4", at=40.0)
    assert [r.event for r in audit.query(since=25.0)] == ["series_completed", "series_received"]
    assert [r.at for r in audit.query(series_uid="1.2.3")] == [20.0, 30.0]
    assert [r.series_uid for r in audit.query(event="series_received")] == ["1.2.3", "1.2.4"]
    assert [r.at for r in audit.query(limit=2)] == [30.0, 40.0]  # the newest, oldest first
    with pytest.raises(ValueError):
        audit.query(event="no_such_event")


def test_pipeline_events_become_audit_rows(audit: AuditLog) -> None:
    audit.on_association(False, "EVIL ", "10.9.9.9", "AE title and host not in node.allowed_peers")
    audit.on_pipeline_event("rule_matched", {"series": "1.2.3", "rule": "chest-ct", "models": ["lungs"]})
    audit.on_pipeline_event("infer_finished", {
        "series": "1.2.3", "job": 1, "model": "lungs", "version": "1.0", "ok": True, "error": "",
        "seconds": {"load": 0.1, "model": 1.0, "encode": 0.2},
        "objects": [{"kind": "seg", "sop_uid": "2.25.1", "series_uid": "2.25.2"}]})
    audit.on_pipeline_event("send_failed", {"series": "1.2.3", "job": 2, "destination": "pacs",
                                            "reason": "association rejected"})
    rows = audit.query()
    assert [r.event for r in rows] == ["association_refused", "rule_matched", "model_run", "objects_produced",
                                       "send_failed"]
    assert rows[0].peer_ae == "EVIL" and rows[0].detail["reason"].startswith("AE title")
    assert rows[2].detail["version"] == "1.0" and rows[2].detail["ok"] is True
    assert rows[3].detail["objects"][0]["sop_uid"] == "2.25.1"
    assert rows[4].detail == {"destination": "pacs", "job": 2, "reason": "association rejected"}


def test_sent_event_lists_the_sop_instance_uids_of_the_files(audit: AuditLog) -> None:
    now = 1.0
    with audit.db.transaction() as c:
        c.execute("INSERT INTO series (series_uid, study_uid, state, first_received, last_received, updated_at)"
                  " VALUES ('1.2.3','1.2','done',?,?,?)", (now, now, now))
        c.execute("INSERT INTO results VALUES ('2.25.9','1.2.3','lungs','seg','2.25.8','results/1.2.3/lungs/seg.dcm',1)")
    audit.on_pipeline_event("sent", {"series": "1.2.3", "job": 3, "destination": "pacs", "count": 1,
                                     "files": ["results/1.2.3/lungs/seg.dcm"]})
    assert audit.query(event="sent")[0].detail["sop_uids"] == ["2.25.9"]


def test_a_broken_database_does_not_break_the_caller(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = Database(tmp_path / "s.sqlite3")
    audit = AuditLog(db)
    db.close()
    audit.record(AuditEvent.SERIES_RECEIVED, series_uid="1.2.3")  # logged, not raised
    assert "could not record series_received" in caplog.text


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("24h", 86400),
                                               ("1.5d", 129600), ("2w", 1209600)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_parse_duration_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="24h"):
        parse_duration("yesterday")
