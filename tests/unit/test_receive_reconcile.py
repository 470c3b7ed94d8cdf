"""Start-up reconciliation of spool and database, and the late-arrival switch."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dicom_node.domain import SeriesState
from dicom_node.spool import Spool
from dicom_node.spool.layout import digest
from dicom_node.spool.reconcile import reconcile
from dicom_node.store import Database, InstanceOutcome, ReceivedInstance, SeriesStore

STUDY, SERIES = "1.2.3", "1.2.3.4"


@pytest.fixture()
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path)


@pytest.fixture()
def db(tmp_path: Path) -> Database:
    return Database(tmp_path / "state.sqlite3")


def _receive(spool: Spool, series: SeriesStore, sop: str, data: bytes, now: float,
             series_uid: str = SERIES) -> str:
    """What the C-STORE handler does: atomic write, then the row."""
    path = spool.instance_path(STUDY, series_uid, sop)
    spool.write_atomic(path, data)
    return series.record_instance(
        ReceivedInstance(study_uid=STUDY, series_uid=series_uid, sop_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                         transfer_syntax="1.2.840.10008.1.2.1", modality="CT", path=spool.relative(path),
                         size=len(data), sha256=digest(data), calling_ae="MOD", called_ae="NODE",
                         source_host="127.0.0.1"), now)


def test_agreeing_spool_and_database_are_left_alone(spool: Spool, db: Database) -> None:
    series = SeriesStore(db)
    for i in range(3):
        _receive(spool, series, f"1.1.{i}", b"x" * (i + 1), now=10.0 + i)
    report = reconcile(spool, series, now=20.0)
    assert report.unrecorded_removed == report.missing_forgotten == report.rerecorded == []
    assert len(spool.incoming_files()) == 3
    row = series.get(SERIES)
    assert row["instance_count"] == 3 and row["state"] == SeriesState.RECEIVING


def test_receiving_series_keep_their_completion_timer_from_the_restart(spool: Spool, db: Database) -> None:
    series = SeriesStore(db)
    _receive(spool, series, "1.1.2", b"x", now=10.0, series_uid="1.2.3.5")
    _receive(spool, series, "1.1.1", b"x", now=12.0)
    assert series.complete_quiet(now=41.0, quiet_seconds=30) == ["1.2.3.5"]  # complete before the crash
    # The node was down from 13 to 100: the sender of 1.2.3.4 could not connect meanwhile.
    report = reconcile(spool, series, now=100.0)
    assert report.receiving == [SERIES]
    assert series.get("1.2.3.5")["state"] == SeriesState.COMPLETE  # settled series are untouched
    assert series.complete_quiet(now=129.0, quiet_seconds=30) == []
    assert series.complete_quiet(now=130.0, quiet_seconds=30) == [SERIES]  # the timer still runs out


def test_unrecorded_file_is_deleted(spool: Spool, db: Database, caplog: pytest.LogCaptureFixture) -> None:
    series = SeriesStore(db)
    _receive(spool, series, "1.1.1", b"acknowledged", now=1.0)
    # A crash between the rename and the commit: the file is there, the row is not.
    orphan = spool.instance_path(STUDY, SERIES, "1.1.2")
    spool.write_atomic(orphan, b"never acknowledged")
    with caplog.at_level(logging.WARNING):
        report = reconcile(spool, series, now=2.0)
    assert report.unrecorded_removed == [spool.relative(orphan)]
    assert not orphan.exists()
    assert spool.instance_path(STUDY, SERIES, "1.1.1").read_bytes() == b"acknowledged"
    assert "never recorded" in caplog.text
    assert series.get(SERIES)["instance_count"] == 1


def test_recorded_instance_without_file_is_forgotten(spool: Spool, db: Database,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    series = SeriesStore(db)
    for i in range(3):
        _receive(spool, series, f"1.1.{i}", b"data", now=float(i))
    lost = spool.instance_path(STUDY, SERIES, "1.1.1")
    lost.unlink()
    with caplog.at_level(logging.ERROR):
        report = reconcile(spool, series, now=5.0)
    assert report.missing_forgotten == [spool.relative(lost)]
    assert "1.1.1" in caplog.text and "missing" in caplog.text
    assert series.get(SERIES)["instance_count"] == 2
    assert sorted(series.instance_paths(SERIES)) == sorted(spool.relative(p) for p in spool.incoming_files())
    # The sender sends it again: a new instance, not a duplicate of a row that pointed at nothing.
    assert _receive(spool, series, "1.1.1", b"data", now=6.0) == InstanceOutcome.NEW


def test_series_left_without_files_fails_instead_of_being_processed(spool: Spool, db: Database) -> None:
    series = SeriesStore(db)
    _receive(spool, series, "1.1.1", b"data", now=1.0)
    spool.instance_path(STUDY, SERIES, "1.1.1").unlink()
    reconcile(spool, series, now=2.0)
    row = series.get(SERIES)
    assert row["instance_count"] == 0 and row["state"] == SeriesState.FAILED
    assert "missing" in row["reason"]


def test_replacement_interrupted_before_commit_is_rerecorded(spool: Spool, db: Database) -> None:
    series = SeriesStore(db)
    _receive(spool, series, "1.1.1", b"version one", now=1.0)
    # The new version was renamed into place, then the node died before recording it.
    path = spool.instance_path(STUDY, SERIES, "1.1.1")
    spool.write_atomic(path, b"version two, longer")
    report = reconcile(spool, series, now=2.0)
    assert report.rerecorded == [spool.relative(path)]
    # Sending the new version again is now a no-op duplicate; the old one would be a replacement.
    assert _receive(spool, series, "1.1.1", b"version two, longer", now=3.0) == InstanceOutcome.DUPLICATE


def test_half_written_temp_files_are_removed(spool: Spool) -> None:
    (spool.tmp / "abc.part").write_bytes(b"half")
    assert spool.clean_tmp() == 1
    assert list(spool.tmp.iterdir()) == []


@pytest.mark.parametrize("reprocess", [True, False])
def test_late_arrival_switch(spool: Spool, db: Database, reprocess: bool,
                             caplog: pytest.LogCaptureFixture) -> None:
    series = SeriesStore(db, reopen_late=reprocess)
    _receive(spool, series, "1.1.1", b"a", now=0.0)
    series.complete_quiet(now=100.0, quiet_seconds=30)
    series.set_state(SERIES, SeriesState.DONE, now=101.0)
    with caplog.at_level(logging.WARNING):
        assert _receive(spool, series, "1.1.2", b"b", now=200.0) == InstanceOutcome.NEW
    row = series.get(SERIES)
    assert row["instance_count"] == 2  # stored and recorded either way
    assert len(spool.incoming_files()) == 2
    if reprocess:
        assert row["state"] == SeriesState.RECEIVING
    else:
        assert row["state"] == SeriesState.DONE
        assert "reprocess_late_arrivals" in caplog.text
        assert series.complete_quiet(now=1000.0, quiet_seconds=30) == []
