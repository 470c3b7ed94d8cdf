"""Series completion policy and job state transitions, with time as a parameter."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.domain import JobKind, JobState, SeriesState
from dicom_node.store import Database, InstanceOutcome, JobStore, ReceivedInstance, SeriesStore


def _inst(sop: str, series: str = "1.2.3.4", sha: str = "a") -> ReceivedInstance:
    return ReceivedInstance(study_uid="1.2.3", series_uid=series, sop_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                            transfer_syntax="1.2.840.10008.1.2.1", modality="CT", path=f"incoming/{sop}.dcm",
                            size=10, sha256=sha, calling_ae="MOD", called_ae="NODE", source_host="127.0.0.1")


@pytest.fixture()
def db(tmp_path: Path) -> Database:
    return Database(tmp_path / "state.sqlite3")


def test_series_completes_only_after_quiet_period(db: Database) -> None:
    series = SeriesStore(db)
    series.record_instance(_inst("1.1"), now=100.0)
    series.record_instance(_inst("1.2"), now=110.0)
    assert series.complete_quiet(now=139.0, quiet_seconds=30) == []
    assert series.get("1.2.3.4")["state"] == SeriesState.RECEIVING
    assert series.complete_quiet(now=140.0, quiet_seconds=30) == ["1.2.3.4"]
    row = series.get("1.2.3.4")
    assert row["state"] == SeriesState.COMPLETE and row["instance_count"] == 2


def test_duplicates_and_replacements(db: Database) -> None:
    series = SeriesStore(db)
    assert series.record_instance(_inst("1.1", sha="a"), 0) == InstanceOutcome.NEW
    assert series.record_instance(_inst("1.1", sha="a"), 1) == InstanceOutcome.DUPLICATE
    assert series.record_instance(_inst("1.1", sha="b"), 2) == InstanceOutcome.REPLACED
    assert series.get("1.2.3.4")["instance_count"] == 1


def test_late_instance_reopens_a_finished_series(db: Database) -> None:
    series = SeriesStore(db)
    series.record_instance(_inst("1.1"), 0)
    series.complete_quiet(100, 30)
    series.set_state("1.2.3.4", SeriesState.DONE, 101)
    series.record_instance(_inst("1.2"), 200)
    assert series.get("1.2.3.4")["state"] == SeriesState.RECEIVING
    # A duplicate does not re-open it.
    series.complete_quiet(300, 30)
    series.record_instance(_inst("1.2"), 301)
    assert series.get("1.2.3.4")["state"] == SeriesState.COMPLETE


def test_job_transitions_drive_series_state(db: Database) -> None:
    series, jobs = SeriesStore(db), JobStore(db)
    series.record_instance(_inst("1.1"), 0)
    series.complete_quiet(100, 30)
    infer = jobs.enqueue(JobKind.INFER, "1.2.3.4", 100, model="lungs")
    assert series.get("1.2.3.4")["state"] == SeriesState.QUEUED
    job = jobs.claim(JobKind.INFER, 101)
    assert job is not None and job.id == infer and job.state == JobState.RUNNING and job.attempts == 1
    assert series.get("1.2.3.4")["state"] == SeriesState.RUNNING
    send = jobs.enqueue(JobKind.SEND, "1.2.3.4", 102, destination="pacs", payload={"files": ["a"]})
    jobs.complete(infer, 102)
    assert series.get("1.2.3.4")["state"] == SeriesState.SENDING
    assert jobs.claim(JobKind.SEND, 103).id == send
    assert jobs.retry_later(send, "down", 103, next_attempt_at=200, max_attempts=3) == JobState.RETRYING
    assert jobs.claim(JobKind.SEND, 150) is None  # not due yet
    assert jobs.claim(JobKind.SEND, 200).attempts == 2
    jobs.complete(send, 201)
    assert series.get("1.2.3.4")["state"] == SeriesState.DONE


def test_an_infer_job_completes_with_its_sends_and_rows_in_one_transaction(db: Database) -> None:
    series, jobs = SeriesStore(db), JobStore(db)
    series.record_instance(_inst("1.1"), 0)
    series.complete_quiet(100, 30)
    infer = jobs.enqueue(JobKind.INFER, "1.2.3.4", 100, rule="ct", model="lungs")
    jobs.claim(JobKind.INFER, 101)

    def broken(c: object) -> None:
        c.execute("INSERT INTO results (sop_uid, source_series, model, kind, series_uid, path, created_at)"  # type: ignore[attr-defined]
                  " VALUES ('9.1', '1.2.3.4', 'lungs', 'seg', '9', 'results/seg.dcm', 102)")
        raise OSError("the disk fails in the middle")

    with pytest.raises(OSError):
        jobs.complete_with(infer, 102, payload={"files": ["a"]}, sends=[("pacs", {"files": ["a"]})], also=broken)
    assert jobs.get(infer).state == JobState.RUNNING, "nothing of it committed: the job is run again"
    assert [j.kind for j in jobs.for_series("1.2.3.4")] == [JobKind.INFER]
    assert db.query("SELECT COUNT(*) AS n FROM results")[0]["n"] == 0

    waiting = jobs.enqueue(JobKind.SEND, "1.2.3.4", 101, rule="ct", model="lungs", destination="old",
                           payload={"files": ["a"]})  # left by an earlier run of the job
    ids = jobs.complete_with(infer, 103, payload={"files": ["a"]},
                             sends=[("pacs", {"files": ["a"]}), ("old", {"files": ["a"]})],
                             also=lambda c: c.execute(
                                 "INSERT INTO results (sop_uid, source_series, model, kind, series_uid, path,"
                                 " created_at) VALUES ('9.1', '1.2.3.4', 'lungs', 'seg', '9', 'results/seg.dcm', 103)"))
    done = jobs.get(infer)
    assert done.state == JobState.DONE and done.payload == {"files": ["a"]}
    assert ids[1] == waiting, "a twin still waiting is made due, not queued twice"
    sends = [j for j in jobs.for_series("1.2.3.4") if j.kind == JobKind.SEND]
    assert sorted((j.id, j.destination, j.rule, j.model) for j in sends) == sorted(
        [(waiting, "old", "ct", "lungs"), (ids[0], "pacs", "ct", "lungs")])
    assert db.query("SELECT COUNT(*) AS n FROM results")[0]["n"] == 1
    assert series.get("1.2.3.4")["state"] == SeriesState.SENDING


def test_send_dies_after_max_attempts_and_can_be_requeued(db: Database) -> None:
    series, jobs = SeriesStore(db), JobStore(db)
    series.record_instance(_inst("1.1"), 0)
    series.complete_quiet(100, 30)
    send = jobs.enqueue(JobKind.SEND, "1.2.3.4", 100, destination="pacs")
    for t in range(2):
        jobs.claim(JobKind.SEND, 1000 + t)
        state = jobs.retry_later(send, "refused", 1000 + t, 1000 + t, max_attempts=2)
    assert state == JobState.DEAD
    row = series.get("1.2.3.4")
    assert row["state"] == SeriesState.FAILED and "refused" in row["reason"]
    assert jobs.requeue([send], 2000) == 1
    assert jobs.get(send).state == JobState.QUEUED and jobs.get(send).attempts == 0


def test_priority_orders_the_queue(db: Database) -> None:
    series, jobs = SeriesStore(db), JobStore(db)
    series.record_instance(_inst("1.1"), 0)
    low = jobs.enqueue(JobKind.INFER, "1.2.3.4", 1, model="a", priority=0)
    stat = jobs.enqueue(JobKind.INFER, "1.2.3.4", 2, model="b", priority=10)
    assert jobs.claim(JobKind.INFER, 3).id == stat
    assert jobs.claim(JobKind.INFER, 3).id == low


def test_recover_requeues_running_jobs_and_fails_repeat_crashers(db: Database) -> None:
    series, jobs = SeriesStore(db), JobStore(db, max_infer_attempts=2)
    series.record_instance(_inst("1.1"), 0)
    series.complete_quiet(100, 30)
    infer = jobs.enqueue(JobKind.INFER, "1.2.3.4", 100, model="m")
    send = jobs.enqueue(JobKind.SEND, "1.2.3.4", 100, destination="pacs")
    jobs.claim(JobKind.INFER, 101)
    jobs.claim(JobKind.SEND, 101)
    assert jobs.recover(200) == 2
    assert jobs.get(infer).state == JobState.QUEUED
    assert jobs.get(send).state == JobState.RETRYING
    jobs.claim(JobKind.INFER, 201)
    jobs.recover(300)
    assert jobs.get(infer).state == JobState.FAILED
    assert "interrupted" in jobs.get(infer).reason


def test_database_reopens_with_schema(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.sqlite3")
    SeriesStore(db).record_instance(_inst("1.1"), 0)
    db.close()
    db2 = Database(tmp_path / "s.sqlite3")
    assert SeriesStore(db2).get("1.2.3.4")["instance_count"] == 1
    assert db2.query("PRAGMA journal_mode")[0][0] == "truncate"  # a rollback journal: no memory-mapped -shm (store/database.py)
