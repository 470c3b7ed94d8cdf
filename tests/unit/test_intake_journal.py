"""The intake journal: appended instances become files and rows, byte for byte, and survive a crash."""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydicom.filereader import read_file_meta_info
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicom_node.receive import journal as journal_module
from dicom_node.receive.journal import IntakeJournal, read_records, replay_orphans
from dicom_node.spool import Spool
from dicom_node.store import Database, ReceivedInstance, SeriesStore


def _record(spool: Spool, i: int, data: bytes, series: str = "1.2.3.4") -> ReceivedInstance:
    sop = f"{series}.{i + 1}"
    return ReceivedInstance(study_uid="1.2.3", series_uid=series, sop_uid=sop,
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
                            modality="CT", path=spool.relative(spool.instance_path("1.2.3", series, sop)),
                            size=len(data), sha256=hashlib.sha256(data).hexdigest(), calling_ae="MOD",
                            called_ae="NODE", source_host="127.0.0.1")


@pytest.fixture()
def state(tmp_path: Path) -> dict[str, Any]:
    spool = Spool(tmp_path / "state")
    series = SeriesStore(Database(tmp_path / "state" / "state.sqlite3"))
    return {"spool": spool, "series": series}


def _rows(series: SeriesStore) -> dict[str, tuple[str, int]]:
    return {r["sop_uid"]: (r["sha256"], r["size"]) for r in
            series.db.query("SELECT sop_uid, sha256, size FROM instances")}


def test_appended_instances_become_files_and_rows_byte_for_byte(state: dict[str, Any]) -> None:
    spool, series = state["spool"], state["series"]
    recorded: list[tuple[str, str]] = []
    journal = IntakeJournal(spool.intake, spool, series, lambda r, outcome: recorded.append((r.sop_uid, outcome)))
    blobs = [os.urandom(1000 + 37 * i) for i in range(40)]
    threads = [threading.Thread(target=lambda i=i: journal.append(_record(spool, i, blobs[i]), 100.0 + i, blobs[i]))
               for i in range(40)]  # concurrent associations: one fdatasync may cover several
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    journal.close()
    for i, blob in enumerate(blobs):
        assert spool.absolute(_record(spool, i, blob).path).read_bytes() == blob
    assert len(_rows(series)) == 40 and sorted(o for _, o in recorded) == ["new"] * 40
    row = series.db.query("SELECT instance_count, first_received, last_received FROM series")[0]
    assert (row["instance_count"], row["first_received"], row["last_received"]) == (40, 100.0, 139.0) \
        or row["instance_count"] == 40 and row["last_received"] == 139.0
    assert not list(spool.intake.glob("*"))  # all recorded: the journal is gone


def _killed_before_recording(spool: Spool, series: SeriesStore, monkeypatch: pytest.MonkeyPatch) -> IntakeJournal:
    """A journal whose process dies before it materialises anything: its appends stay in the journal."""
    journal = IntakeJournal(spool.intake, spool, series)
    monkeypatch.setattr(journal.materializer, "write_files", lambda items, fd: (_ for _ in ()).throw(
        OSError("the process is killed before it records anything")))
    return journal


def test_a_crash_leaves_the_journal_and_the_next_start_records_it(state: dict[str, Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spool, series = state["spool"], state["series"]
    journal = _killed_before_recording(spool, series, monkeypatch)
    blobs = [os.urandom(5000) for _ in range(3)]
    for i, blob in enumerate(blobs):
        journal.append(_record(spool, i, blob), 10.0, blob)
    (segment,) = spool.intake.glob("*.journal")
    # A crash mid-append of a fourth: its bytes are cut short (never acknowledged).
    header, crc = journal_module.encode_header(_record(spool, 3, blobs[0]), 10.0, blobs[0])
    head = journal_module.record_head(header, crc, len(blobs[0]), 0)
    with open(segment, "ab") as f:
        f.write(head + blobs[0][:100])
    fd = os.open(segment, os.O_RDONLY)
    records, end, torn = read_records(fd)
    os.close(fd)
    assert len(records) == 3 and torn == len(head) + 100 and end + torn == segment.stat().st_size
    # The process is gone (its lock released) without recording: what it leaves is replayed.
    os.close(journal._lock_fd)
    assert _rows(series) == {}
    synced_with: list[list[str]] = []  # the journal's segments when the spool is synced
    real_sync = spool.sync_filesystem
    monkeypatch.setattr(spool, "sync_filesystem", lambda: (
        synced_with.append([p.name for p in spool.intake.glob("*.journal")]), real_sync())[1])
    assert replay_orphans(spool.intake, spool, series) == 3
    assert synced_with == [[segment.name]], "the files synced before the segment holding them is deleted"
    for i, blob in enumerate(blobs):
        assert spool.absolute(_record(spool, i, blob).path).read_bytes() == blob
    assert set(_rows(series)) == {f"1.2.3.4.{i + 1}" for i in range(3)}
    assert not list(spool.intake.glob("*.journal"))
    assert replay_orphans(spool.intake, spool, series) == 0


def test_a_crash_after_the_files_before_the_rows_is_recorded_at_the_next_start(
        state: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    spool, series = state["spool"], state["series"]
    journal = IntakeJournal(spool.intake, spool, series)
    written = threading.Event()
    files: list[Any] = []
    real_write = journal.materializer.write_files

    def write_files(items: Any, fd: int, fresh: bool = False) -> Any:
        out = real_write(items, fd, fresh)
        files.extend(items)
        if len(files) == 3:
            written.set()
        return out

    monkeypatch.setattr(journal.materializer, "write_files", write_files)
    monkeypatch.setattr(journal.materializer, "record", lambda digested: (_ for _ in ()).throw(
        OSError("the process is killed between the files and the rows")))
    blobs = [os.urandom(4000) for _ in range(3)]
    for i, blob in enumerate(blobs):
        journal.append(_record(spool, i, blob), 10.0, blob)
    assert written.wait(10)
    for i, blob in enumerate(blobs):  # every file is there, no row
        assert spool.absolute(_record(spool, i, blob).path).read_bytes() == blob
    os.close(journal._lock_fd)  # the process is gone: its journal is an orphan
    assert _rows(series) == {}
    assert replay_orphans(spool.intake, spool, series) == 3
    for i, blob in enumerate(blobs):
        assert spool.absolute(_record(spool, i, blob).path).read_bytes() == blob
    assert {sop: size for sop, (_, size) in _rows(series).items()} == {
        f"1.2.3.4.{i + 1}": len(blob) for i, blob in enumerate(blobs)}
    assert not list(spool.intake.glob("*.journal"))


def test_a_crash_after_the_rows_leaves_files_and_rows_as_they_are_at_the_next_start(
        state: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after recording, before a sync of the spool gave its segment back: the replay finds each file and
    row there (one query for the batch) and writes none again; one file lost meanwhile, one whose row has another
    digest, and one of the right size holding zeros (never synced before a power loss), are written again."""
    spool, series = state["spool"], state["series"]
    monkeypatch.setattr(journal_module, "IDLE_S", 3600.0)  # killed before intake was idle long enough
    journal = IntakeJournal(spool.intake, spool, series)
    blobs = [os.urandom(3000) for _ in range(5)]
    for i, blob in enumerate(blobs):
        journal.append(_record(spool, i, blob), 10.0, blob)
    for _ in range(500):
        if len(_rows(series)) == 5:
            break
        threading.Event().wait(0.01)
    assert len(_rows(series)) == 5 and len(list(spool.intake.glob("*.journal"))) == 1, "recorded, not given back"
    os.close(journal._lock_fd)  # the process is gone: its journal is an orphan
    paths = [spool.absolute(_record(spool, i, blob).path) for i, blob in enumerate(blobs)]
    inodes = [p.stat().st_ino for p in paths]
    paths[1].unlink()  # lost since
    with series.db.transaction() as c:  # not this content's row
        c.execute("UPDATE instances SET sha256='0' WHERE sop_uid='1.2.3.4.3'")
    with open(paths[4], "r+b") as f:  # its size on disk, its data never written back
        f.write(bytes(len(blobs[4])))
    queries: list[str] = []
    real_query = series.db.query
    monkeypatch.setattr(series.db, "query", lambda sql, *a, **k: queries.append(sql) or real_query(sql, *a, **k))
    assert replay_orphans(spool.intake, spool, series) == 5
    assert sum("sha256 FROM instances WHERE sop_uid IN" in q for q in queries) == 1
    assert [p.read_bytes() for p in paths] == blobs
    assert paths[0].stat().st_ino == inodes[0] and paths[3].stat().st_ino == inodes[3], "not written again"
    assert paths[2].stat().st_ino != inodes[2], "its row had another digest: written again"
    assert paths[4].stat().st_ino != inodes[4], "its bytes are not the recorded digest's: written again"
    assert len(_rows(series)) == 5 and not list(spool.intake.glob("*.journal"))


def test_a_live_receivers_journal_is_not_replayed(state: dict[str, Any]) -> None:
    spool, series = state["spool"], state["series"]
    journal = IntakeJournal(spool.intake, spool, series)
    assert replay_orphans(spool.intake, spool, series) == 0
    assert list(spool.intake.glob("*.journal"))
    journal.close()


def test_while_the_database_refuses_rows_intake_is_refused_then_resumes(state: dict[str, Any],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    spool, series = state["spool"], state["series"]
    monkeypatch.setattr(journal_module, "RETRY_S", 0.05)
    journal = IntakeJournal(spool.intake, spool, series)
    real = series.record_instances
    broken = threading.Event()
    broken.set()

    def record(batch: Any) -> Any:
        if broken.is_set():
            raise OSError("disk I/O error")
        return real(batch)

    monkeypatch.setattr(series, "record_instances", record)
    blob = os.urandom(2000)
    journal.append(_record(spool, 0, blob), 1.0, blob)
    for _ in range(200):
        if journal.refusal():
            break
        threading.Event().wait(0.01)
    assert "could not record it: disk I/O error" in (journal.refusal() or "")
    broken.clear()
    for _ in range(200):
        if not journal.refusal() and journal.backlog() == 0:
            break
        threading.Event().wait(0.01)
    assert journal.refusal() is None and set(_rows(series)) == {"1.2.3.4.1"}
    journal.close()


def test_segments_rotate_and_are_removed_once_recorded(state: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    spool, series = state["spool"], state["series"]
    monkeypatch.setattr(journal_module, "SEGMENT_BYTES", 20_000)
    journal = IntakeJournal(spool.intake, spool, series)
    blobs = [os.urandom(6000) for _ in range(12)]
    for i, blob in enumerate(blobs):
        journal.append(_record(spool, i, blob), 1.0, blob)
    journal.close()
    assert journal._seq > 1  # several segments were used
    assert not list(spool.intake.glob("*.journal"))
    assert len(_rows(series)) == 12


def test_after_recorded_waits_for_what_was_appended_before_it(state: dict[str, Any],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    spool, series = state["spool"], state["series"]
    journal = IntakeJournal(spool.intake, spool, series)
    seen: list[int] = []
    journal.after_recorded(lambda: seen.append(-1))  # nothing appended: at once, in this thread
    assert seen == [-1]
    real = series.record_instances
    gate = threading.Event()

    def record(batch: Any) -> Any:
        gate.wait(10)  # the materialiser is held until the callbacks are registered
        return real(batch)

    monkeypatch.setattr(series, "record_instances", record)
    blobs = [os.urandom(500) for _ in range(3)]
    for i, blob in enumerate(blobs):
        journal.append(_record(spool, i, blob), 1.0 + i, blob)
    done = threading.Event()
    journal.after_recorded(lambda: (seen.append(len(_rows(series))), done.set()))
    assert seen == [-1], "called before its instances were recorded"
    gate.set()
    assert done.wait(10)
    assert seen == [-1, 3], "called once all three were recorded, not before"
    journal.close()


def _batches(series: SeriesStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of each batch the materialiser records from now on (one transaction each)."""
    sizes: list[int] = []
    real = series.record_instances

    def record(batch: Any) -> Any:
        sizes.append(len(batch))
        return real(batch)

    monkeypatch.setattr(series, "record_instances", record)
    return sizes


def test_a_stream_of_appends_is_recorded_in_one_transaction_at_its_release(state: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    spool, series = state["spool"], state["series"]
    monkeypatch.setattr(journal_module, "GATHER_S", 5.0)  # far longer than the six appends take
    sizes = _batches(series, monkeypatch)
    journal = IntakeJournal(spool.intake, spool, series)
    blobs = [os.urandom(700) for _ in range(6)]
    for i, blob in enumerate(blobs):
        journal.append(_record(spool, i, blob), 1.0 + i, blob)
    done = threading.Event()
    journal.after_recorded(done.set)  # a release: it also ends the gathering
    assert done.wait(4), "the release waited for the gathering to run out"
    assert sizes == [6], "the appends were not gathered into one transaction"
    assert len(_rows(series)) == 6
    journal.close()


def test_a_full_batch_or_a_stop_ends_the_gathering_at_once(state: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    spool, series = state["spool"], state["series"]
    monkeypatch.setattr(journal_module, "GATHER_S", 30.0)
    monkeypatch.setattr(journal_module, "BATCH", 4)
    sizes = _batches(series, monkeypatch)
    journal = IntakeJournal(spool.intake, spool, series)
    blobs = [os.urandom(300) for _ in range(6)]
    for i, blob in enumerate(blobs[:4]):
        journal.append(_record(spool, i, blob), 1.0 + i, blob)
    pause = threading.Event()
    for _ in range(100):  # four written are a full batch: recorded without waiting 30 s
        if sizes:
            break
        pause.wait(0.05)
    assert sizes == [4]
    for i, blob in enumerate(blobs[4:], start=4):
        journal.append(_record(spool, i, blob), 1.0 + i, blob)
    closing = threading.Thread(target=journal.close)
    closing.start()
    closing.join(10)
    assert not closing.is_alive(), "close waited for the gathering to run out"
    assert sizes == [4, 2] and len(_rows(series)) == 6
    assert not list(spool.intake.glob("*"))


def _bare_record(spool: Spool, i: int, data: bytes) -> ReceivedInstance:
    """As the handler appends it: the data set alone, its size, no digest yet."""
    return replace(_record(spool, i, data), size=len(data), sha256="")


@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45", "2.25.1", "1.2.826.0.1.3680043.8.498." + "1" * 38,
                                     "1.2.826.0.1.3680043.8.498." + "1" * 37])
@pytest.mark.parametrize(("sop_class", "syntax"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2"),  # CT, implicit VR
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1"),  # MR, explicit VR
    ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.1.2.4.50"),  # SEG, JPEG baseline
    ("1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.1.2.1.99")])  # Comprehensive SR, deflated
def test_the_file_head_is_pynetdicoms_for_every_uid_length(sop_uid: str, sop_class: str, syntax: str) -> None:
    """The File Meta Information is encoded once per (class, syntax) and takes each instance's UID and group
    length: the bytes are pynetdicom's, for odd and even UID lengths up to 64 characters."""
    record = ReceivedInstance(
        study_uid="1.2.3", series_uid="1.2.3.4", sop_uid=sop_uid, sop_class_uid=sop_class, transfer_syntax=syntax,
        modality="OT", path="incoming/x.dcm", size=0, sha256="", calling_ae="MOD", called_ae="NODE",
        source_host="127.0.0.1")
    for _ in range(2):  # encoded, then from the remembered encoding
        meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_uid, transfer_syntax=syntax)
        assert journal_module.part10_head(record) == b"\0" * 128 + b"DICM" + encode_file_meta(meta)


def test_a_bare_data_set_becomes_the_file_pynetdicom_would_write(state: dict[str, Any]) -> None:
    spool, series = state["spool"], state["series"]
    recorded: list[ReceivedInstance] = []
    journal = IntakeJournal(spool.intake, spool, series, lambda r, outcome: recorded.append(r))
    blobs = [os.urandom(3000 + i) for i in range(3)]
    for i, blob in enumerate(blobs):
        journal.append(_bare_record(spool, i, blob), 10.0, blob, bare=True)
    journal.close()
    rows = _rows(series)
    for i, blob in enumerate(blobs):
        record = _record(spool, i, blob)
        meta = create_file_meta(sop_class_uid=record.sop_class_uid, sop_instance_uid=record.sop_uid,
                                transfer_syntax=record.transfer_syntax)
        expected = b"\0" * 128 + b"DICM" + encode_file_meta(meta) + blob  # pynetdicom's encoded_dataset()
        assert spool.absolute(record.path).read_bytes() == expected
        assert rows[record.sop_uid] == (hashlib.sha256(expected).hexdigest(), len(expected))
        file_meta = read_file_meta_info(spool.absolute(record.path))
        assert file_meta.MediaStorageSOPInstanceUID == record.sop_uid
        assert file_meta.TransferSyntaxUID == record.transfer_syntax
    assert [r.size for r in recorded] == [rows[r.sop_uid][1] for r in recorded]


def test_bare_and_whole_records_left_by_a_crash_are_both_replayed(state: dict[str, Any],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A journal written before bare records existed (whole files) and after, in one segment.
    spool, series = state["spool"], state["series"]
    journal = _killed_before_recording(spool, series, monkeypatch)
    whole, bare = os.urandom(2000), os.urandom(2100)
    journal.append(_record(spool, 0, whole), 10.0, whole)
    journal.append(_bare_record(spool, 1, bare), 10.0, bare, bare=True)
    fd = os.open(next(spool.intake.glob("*.journal")), os.O_RDONLY)
    records, _, _ = read_records(fd)
    os.close(fd)
    assert [r.bare for r in records] == [False, True]
    os.close(journal._lock_fd)
    assert replay_orphans(spool.intake, spool, series) == 2
    assert spool.absolute(_record(spool, 0, whole).path).read_bytes() == whole
    second = spool.absolute(_record(spool, 1, bare).path).read_bytes()
    assert second.endswith(bare) and second[128:132] == b"DICM"
    assert _rows(series)["1.2.3.4.2"] == (hashlib.sha256(second).hexdigest(), len(second))


def test_live_appends_do_not_look_up_recorded_digests_and_a_resent_instance_is_a_duplicate(
        state: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    spool, series = state["spool"], state["series"]
    blob = os.urandom(4000)
    first = IntakeJournal(spool.intake, spool, series)
    first.append(_bare_record(spool, 0, blob), 10.0, blob, bare=True)
    first.close()
    path = spool.absolute(_record(spool, 0, blob).path)
    stored = path.read_bytes()

    def looked_up(uids: Any) -> dict[str, str]:
        raise AssertionError("a live append looked up the recorded digests")

    monkeypatch.setattr(series, "recorded_digests", looked_up)
    outcomes: list[str] = []
    again = IntakeJournal(spool.intake, spool, series, lambda r, outcome: outcomes.append(outcome))
    again.append(_bare_record(spool, 0, blob), 11.0, blob, bare=True)  # the sender sends it again
    again.close()
    assert outcomes == ["duplicate"]
    assert path.read_bytes() == stored and len(_rows(series)) == 1


def test_journal_space_is_given_back_only_after_a_sync_of_the_spool(state: dict[str, Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The files are written unsynced: a segment whose records are all recorded stays until a ``syncfs`` of the
    spool has returned (while it fails, the segments are kept), and the spool's files are never synced one by one."""
    spool, series = state["spool"], state["series"]
    monkeypatch.setattr(journal_module, "SEGMENT_BYTES", 20_000)
    failing = threading.Event()
    failing.set()
    syncs: list[int] = []

    def sync_filesystem() -> None:
        syncs.append(len(list(spool.intake.glob("*.journal"))))
        if failing.is_set():
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool, "sync_filesystem", sync_filesystem)
    synced_files: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced_files.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(journal_module.os, "fsync", fsync)
    journal = IntakeJournal(spool.intake, spool, series)
    blobs = [os.urandom(6000) for _ in range(12)]
    for i, blob in enumerate(blobs):
        journal.append(_record(spool, i, blob), 1.0, blob)
    for _ in range(500):
        if len(_rows(series)) == 12 and syncs:
            break
        threading.Event().wait(0.01)
    assert len(_rows(series)) == 12 and syncs, "recorded, and a sync tried"
    assert len(list(spool.intake.glob("*.journal"))) == journal._seq > 1, "no segment given back while sync fails"
    failing.clear()
    for _ in range(500):
        if len(list(spool.intake.glob("*.journal"))) == 1:
            break
        threading.Event().wait(0.01)
    assert len(list(spool.intake.glob("*.journal"))) == 1, "the sealed segments deleted once a sync returned"
    calls = len(syncs)
    journal.close()
    assert len(syncs) == calls + 1 and not list(spool.intake.glob("*"))
    assert not [p for p in synced_files if str(spool.incoming) in p], "a spool file synced on its own"


def test_the_current_segment_is_rewound_after_a_sync_once_intake_is_idle(state: dict[str, Any],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No sync while a stream goes on (its instances recorded between appends); once no instance came for
    ``IDLE_S``, one sync, then the segment is rewound: the next stream's records overwrite the earlier lap's (of
    the same sizes, so their boundaries fall on the old records), and a crash then replays the new lap alone."""
    spool, series = state["spool"], state["series"]
    monkeypatch.setattr(journal_module, "IDLE_S", 0.5)
    syncs: list[int] = []
    real_sync = spool.sync_filesystem
    journal = IntakeJournal(spool.intake, spool, series)
    (segment,) = spool.intake.glob("*.journal")

    def records() -> list[str]:
        fd = os.open(segment, os.O_RDONLY)
        try:
            return [item.record.sop_uid for item in read_records(fd)[0]]
        finally:
            os.close(fd)

    monkeypatch.setattr(spool, "sync_filesystem", lambda: (syncs.append(len(records())), real_sync())[1])
    blobs = [os.urandom(12_000) for _ in range(20)]
    for i, blob in enumerate(blobs):  # every 0.1 s: each recorded before the next
        journal.append(_record(spool, i, blob), 1.0, blob)
        threading.Event().wait(0.1)
    assert syncs == [], "synced while the stream went on"
    for _ in range(300):
        if journal._segment.size == 0:
            break
        threading.Event().wait(0.01)
    assert journal._segment.size == 0 and syncs == [20], "rewound after one sync"
    assert journal.materializer._directories == {}, "the stream's directories forgotten once it ended"
    assert records() == [] and segment.stat().st_size > 200_000, "nothing of the first lap is read back"
    again = [os.urandom(12_000) for _ in range(3)]
    monkeypatch.setattr(journal.materializer, "write_files", lambda items, fd, fresh=False: (_ for _ in ()).throw(
        OSError("the process is killed before it records the second stream")))
    for i, blob in enumerate(again):
        journal.append(_record(spool, i, blob, series="1.2.3.5"), 2.0, blob)
    assert records() == ["1.2.3.5.1", "1.2.3.5.2", "1.2.3.5.3"], "the second lap's records, none of the first's"
    fd = os.open(segment, os.O_RDONLY)
    try:
        assert read_records(fd)[2] == 0, "what is left of the first lap is not a torn record (no replay warning)"
    finally:
        os.close(fd)
    os.close(journal._lock_fd)  # the process is gone
    assert replay_orphans(spool.intake, spool, series) == 3
    assert len(_rows(series)) == 23


def test_a_journal_of_the_form_before_laps_is_replayed(state: dict[str, Any]) -> None:
    """A segment left by a version whose records had no lap (magic DNJ1) is still read and recorded."""
    spool, series = state["spool"], state["series"]
    spool.intake.mkdir(parents=True, exist_ok=True)
    blobs = [os.urandom(2000) for _ in range(2)]
    with open(spool.intake / "4242-abcd-000001.journal", "wb") as f:
        for i, blob in enumerate(blobs):
            header, crc = journal_module.encode_header(_record(spool, i, blob), 5.0, blob)
            f.write(struct.pack("<4sIQI", b"DNJ1", len(header), len(blob), crc) + header + blob)
    (spool.intake / "4242-abcd.lock").touch()
    assert replay_orphans(spool.intake, spool, series) == 2
    for i, blob in enumerate(blobs):
        assert spool.absolute(_record(spool, i, blob).path).read_bytes() == blob
