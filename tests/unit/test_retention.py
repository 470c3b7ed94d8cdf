"""Retention removes finished work only: after retention_hours, or earlier (oldest first) under disk pressure."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.domain import JobKind, SeriesState
from dicom_node.scheduler.retention import Retention
from dicom_node.settings import StorageSettings
from dicom_node.spool import Spool
from dicom_node.store import Database, JobStore, ReceivedInstance, SeriesStore

HOUR = 3600.0
STUDY = "1.2.840.99.1"


class Env:
    def __init__(self, tmp: Path) -> None:
        self.db = Database(tmp / "state.sqlite3")
        self.spool = Spool(tmp)
        self.series = SeriesStore(self.db)
        self.jobs = JobStore(self.db)
        self.free = 10_000.0
        self.purged: list[tuple[str, str]] = []

    def retention(self, **storage: object) -> Retention:
        return Retention(self.db, self.spool, StorageSettings(min_free_mb=100, retention_hours=72, **storage),
                         free_mb=lambda: self.free,
                         on_purged=lambda study, series, reason, size: self.purged.append((series, reason)))

    def add_series(self, uid: str, at: float, n: int = 2) -> list[Path]:
        files = []
        for i in range(n):
            sop = f"{uid}.{i + 1}"
            path = self.spool.instance_path(STUDY, uid, sop)
            self.spool.write_atomic(path, b"x" * 1000)
            files.append(path)
            self.series.record_instance(ReceivedInstance(
                study_uid=STUDY, series_uid=uid, sop_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax="1.2.840.10008.1.2.1", modality="CT", path=self.spool.relative(path), size=1000,
                sha256=sop, calling_ae="MOD", called_ae="NODE", source_host="127.0.0.1"), at)
        self.series.complete_quiet(at + 30, 30)
        return files

    def finish(self, uid: str, at: float, with_result: bool = True) -> Path | None:
        job = self.jobs.enqueue(JobKind.INFER, uid, at, model="lungs")
        self.jobs.claim(JobKind.INFER, at)
        result = None
        if with_result:
            result = self.spool.result_path(uid, "lungs", "seg")
            self.spool.write_atomic(result, b"s" * 500)
            self.spool.write_atomic(result.with_name("thumbnail.png"), b"p" * 100)
            with self.db.transaction() as c:
                c.execute("INSERT INTO results VALUES (?,?,?,?,?,?,?)",
                          (f"2.25.{job}", uid, "lungs", "seg", "2.25.7", self.spool.relative(result), at))
        self.jobs.complete(job, at)
        return result


@pytest.fixture()
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_expired_finished_series_are_removed_with_files_and_rows(env: Env) -> None:
    files = env.add_series("1.2.3.1", 0)
    result = env.finish("1.2.3.1", 100)
    assert result is not None
    report = env.retention().run(now=100 + 72 * HOUR - 1)
    assert report.expired == [] and all(f.exists() for f in files)
    report = env.retention().run(now=100 + 72 * HOUR)
    assert report.expired == ["1.2.3.1"]
    assert report.bytes_freed == 2 * 1000 + 500 + 100
    assert not any(f.exists() for f in files) and not result.parent.parent.exists()
    assert not (env.spool.incoming / STUDY).exists()
    for table in ("series", "instances", "jobs", "results"):
        assert env.db.query(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"] == 0, table
    assert env.purged == [("1.2.3.1", "finished more than 72 h ago")]


def test_work_in_progress_is_never_removed(env: Env) -> None:
    env.add_series("1.2.3.1", 0)                       # complete, no job yet
    env.add_series("1.2.3.2", 0)
    env.jobs.enqueue(JobKind.INFER, "1.2.3.2", 10, model="lungs")  # queued
    env.add_series("1.2.3.3", 0)
    job = env.jobs.enqueue(JobKind.INFER, "1.2.3.3", 10, model="lungs")
    env.jobs.claim(JobKind.INFER, 10)                  # running
    env.add_series("1.2.3.4", 0)
    env.finish("1.2.3.4", 10)
    send = env.jobs.enqueue(JobKind.SEND, "1.2.3.4", 20, destination="pacs")
    env.jobs.claim(JobKind.SEND, 20)
    env.jobs.retry_later(send, "PACS down", 20, 10**9, max_attempts=5)  # retrying: still sending
    env.add_series("1.2.3.5", 0)                       # receiving again
    env.series.set_state("1.2.3.5", SeriesState.RECEIVING, 0)
    env.free = 0.0  # and the disk is full
    report = env.retention().run(now=1000 * HOUR)
    assert report.expired == [] and report.pressure == []
    assert len(env.db.query("SELECT * FROM series")) == 5
    assert env.jobs.get(job) is not None


def test_failed_ignored_and_dead_series_are_finished_work(env: Env) -> None:
    env.add_series("1.2.3.1", 0)
    env.series.set_state("1.2.3.1", SeriesState.IGNORED, 40, "no rule matched")
    env.add_series("1.2.3.2", 0)
    job = env.jobs.enqueue(JobKind.INFER, "1.2.3.2", 40, model="lungs")
    env.jobs.claim(JobKind.INFER, 40)
    env.jobs.fail(job, "not a volume", 40)
    assert env.series.get("1.2.3.2")["state"] == SeriesState.FAILED
    report = env.retention().run(now=40 + 72 * HOUR)
    assert sorted(report.expired) == ["1.2.3.1", "1.2.3.2"]


def test_disk_pressure_removes_oldest_finished_first_until_enough_space(env: Env) -> None:
    for i, t in enumerate((300.0, 100.0, 200.0)):
        uid = f"1.2.3.{i + 1}"
        env.add_series(uid, t - 50)
        env.finish(uid, t)
    env.free = 150.0  # below the default threshold 2 * min_free_mb = 200
    retention = env.retention()
    original = retention.purge

    def purge_and_free(uid: str, reason: str) -> int | None:
        freed = original(uid, reason)
        env.free += 30.0
        return freed

    retention.purge = purge_and_free  # type: ignore[method-assign]
    report = retention.run(now=1000.0)
    # 150 -> 180 -> 210 MiB: two series, the two finished first.
    assert report.pressure == ["1.2.3.2", "1.2.3.3"] and report.expired == []
    assert [r["series_uid"] for r in env.db.query("SELECT series_uid FROM series")] == ["1.2.3.1"]
    assert all("disk space" in reason for _, reason in env.purged)


def test_cleanup_threshold_is_configurable(env: Env) -> None:
    env.add_series("1.2.3.1", 0)
    env.finish("1.2.3.1", 50)
    env.free = 150.0
    assert env.retention(cleanup_free_mb=120).run(now=100.0).pressure == []
    assert env.retention(cleanup_free_mb=160).run(now=100.0).pressure == ["1.2.3.1"]


def test_a_series_reopened_meanwhile_is_kept(env: Env) -> None:
    env.add_series("1.2.3.1", 0)
    env.finish("1.2.3.1", 50)
    retention = env.retention()
    candidates = retention.finished_series(older_than=10**9)
    assert [c["series_uid"] for c in candidates] == ["1.2.3.1"]
    env.add_series("1.2.3.1", 100, n=3)  # a late instance re-opens it before the purge
    env.series.set_state("1.2.3.1", SeriesState.RECEIVING, 100)
    assert retention.purge("1.2.3.1", "test") is None
    assert env.series.get("1.2.3.1") is not None


def test_input_of_a_pending_study_rule_job_is_kept(env: Env) -> None:
    """A study rule's second series is 'ignored' itself, but a queued job still needs its files."""
    arterial_files = env.add_series("1.2.3.10", 0)
    venous_files = env.add_series("1.2.3.11", 0)
    env.series.set_state("1.2.3.11", SeriesState.IGNORED, 40, "input of study rule 'phases'")
    job = env.jobs.enqueue(JobKind.INFER, "1.2.3.10", 50, model="enhancing",
                           payload={"inputs": {"arterial": "1.2.3.10", "venous": "1.2.3.11"}})
    report = env.retention().run(now=100 * HOUR)
    assert report.expired == []
    assert all(f.exists() for f in arterial_files + venous_files)
    env.jobs.claim(JobKind.INFER, 100 * HOUR)
    env.jobs.complete(job, 100 * HOUR)
    report = env.retention().run(now=200 * HOUR)
    assert sorted(report.expired) == ["1.2.3.10", "1.2.3.11"]
