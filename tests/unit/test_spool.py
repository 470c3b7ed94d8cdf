"""Spool paths are built from validated UIDs only; writes are atomic."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import pytest

from dicom_node.errors import InvalidUIDError
from dicom_node.spool import Spool, validate_uid


@pytest.mark.parametrize("bad", ["../../x", "", "   ", None, "1.2.3/4", "1.2..3", "1.02.3", "1." + "1" * 70,
                                 "1.2.3\\4", "1.2.abc", ".1.2", "1.2.3."])
def test_hostile_or_invalid_uids_are_refused(bad: object) -> None:
    with pytest.raises(InvalidUIDError):
        validate_uid(bad)


def test_valid_uids_pass_and_are_normalised() -> None:
    assert validate_uid("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"
    assert validate_uid("1.2.3\x00") == "1.2.3"  # even-length padding from the wire
    assert validate_uid("2.25.0") == "2.25.0"


def test_instance_path_refuses_traversal(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(InvalidUIDError):
        spool.instance_path("1.2.3", "../../etc", "1.2.3.4")
    with pytest.raises(InvalidUIDError):
        spool.result_path("1.2.3", "../model", "seg")
    path = spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert path == tmp_path / "spool" / "incoming" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"


def test_absolute_refuses_paths_outside_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(InvalidUIDError):
        spool.absolute("../../etc/passwd")


def _absolute_or_refused(spool: Spool, relative: str) -> Path | str:
    try:
        return spool.absolute(relative)
    except InvalidUIDError as exc:
        return f"refused: {exc}"


def test_absolute_all_gives_what_absolute_gives_links_and_traversals_included(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "state")
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.dcm").write_bytes(b"x")
    series = spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.1").parent
    series.mkdir(parents=True)
    for i in range(1, 4):
        spool.instance_path("1.2.3", "1.2.3.4", f"1.2.3.4.{i}").write_bytes(b"DICM")
    (series / "to-outside.dcm").symlink_to(outside / "secret.dcm")  # a planted link: refused
    (series / "to-inside.dcm").symlink_to(series / "1.2.3.4.1.dcm")  # resolved to its target
    (spool.incoming / "1.2.3" / "linked-series").symlink_to(series)  # a directory link inside the spool
    (spool.incoming / "1.2.3" / "escaping-series").symlink_to(outside / "dir")
    (outside / "dir" / "a.dcm").write_bytes(b"x")
    base = "incoming/1.2.3/1.2.3.4"
    cases = [f"{base}/1.2.3.4.{i}.dcm" for i in range(1, 4)] + [
        f"{base}/missing.dcm", f"{base}/to-inside.dcm", "incoming/1.2.3/linked-series/1.2.3.4.2.dcm",
        f"{base}/../1.2.3.4/1.2.3.4.3.dcm", f"{base}/..", f"{base}/.", f"{base}/", "incoming",
        "incoming/9.9/9.9.9/9.9.9.1.dcm", f"{base}/1.2.3.4.1.dcm/x.dcm", f"{base}//1.2.3.4.2.dcm",
    ]
    assert spool.absolute_all(cases) == [spool.absolute(c) for c in cases]
    assert spool.absolute_all([f"{base}/to-inside.dcm"]) == [series / "1.2.3.4.1.dcm"]
    for hostile in [f"{base}/to-outside.dcm", "incoming/1.2.3/escaping-series/a.dcm", "../../etc/passwd",
                    str(outside / "secret.dcm"), "..", "", f"{base}/../../../../outside/secret.dcm"]:
        assert str(_absolute_or_refused(spool, hostile)).startswith("refused"), hostile
        with pytest.raises(InvalidUIDError):
            spool.absolute_all([f"{base}/1.2.3.4.1.dcm", hostile])


def test_atomic_write_leaves_no_temp_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    target = spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    spool.write_atomic(target, b"DICM-bytes")
    assert target.read_bytes() == b"DICM-bytes"
    assert list(spool.tmp.iterdir()) == []


def test_clean_tmp_removes_half_written_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    (spool.tmp / "abc.part").write_bytes(b"half")
    assert spool.clean_tmp() == 1
    assert list(spool.tmp.iterdir()) == []


def test_clean_tmp_removes_warm_up_folders_left_by_a_killed_worker(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    left = spool.tmp / "warm-up-k2j4x0"
    (left / "incoming").mkdir(parents=True)
    (left / "incoming" / "CT0001.dcm").write_bytes(b"DICM")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.dcm").write_bytes(b"DICM")
    (spool.tmp / "warm-up-link").symlink_to(outside)  # a link is not followed into what it points at
    (spool.tmp / "warm-up-file").write_bytes(b"not ours")  # nor is a file of that name a folder of ours
    assert spool.clean_tmp() == 1
    assert sorted(p.name for p in spool.tmp.iterdir()) == ["warm-up-file", "warm-up-link"]
    assert (outside / "keep.dcm").exists()


def test_write_unsynced_writes_the_head_then_the_data_through_short_writes(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from dicom_node.spool.layout import digest

    spool = Spool(tmp_path / "state")
    real_writev = os.writev
    calls: list[int] = []

    def short_writev(fd: int, buffers: list[memoryview]) -> int:  # as a signal or a full pipe may cut a write
        calls.append(len(buffers))
        return real_writev(fd, [memoryview(b"".join(bytes(b) for b in buffers))[:7]])

    monkeypatch.setattr(os, "writev", short_writev)
    head, data = b"H" * 20, bytes(range(256)) * 3
    path = spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    fd = spool.write_unsynced(path, data, head)
    os.close(fd)
    assert path.read_bytes() == head + data
    assert len(calls) == -(-(len(head) + len(data)) // 7) and calls[0] == 2
    fd = spool.write_unsynced(path, data)  # no head
    os.close(fd)
    assert path.read_bytes() == data
    assert digest(head, data) == digest(head + data) == __import__("hashlib").sha256(head + data).hexdigest()


def test_sync_filesystem_uses_syncfs_and_raises_its_error(tmp_path: Path) -> None:
    from dicom_node.spool import layout

    spool = Spool(tmp_path / "state")
    spool.write_unsynced(spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5"), b"data")
    spool.sync_filesystem()
    if sys.platform.startswith("linux"):
        assert layout._SYNCFS is not None, "glibc's syncfs not found"
        with pytest.raises(OSError) as raised:
            layout._syncfs(-1)
        assert raised.value.errno == errno.EBADF


def test_write_unsynced_makes_a_missing_directory_and_steps_past_a_taken_temp_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import itertools
    import os

    from dicom_node.spool import layout

    spool = Spool(tmp_path / "spool")
    path = spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    os.close(spool.write_unsynced(path, b"first"))  # its series' directory did not exist
    assert path.read_bytes() == b"first"
    monkeypatch.setattr(layout, "_TEMP_NAMES", itertools.count(7))
    taken = spool.tmp / f"{os.getpid()}-7.part"
    taken.write_bytes(b"an earlier process's")
    os.close(spool.write_unsynced(path, b"second"))
    assert path.read_bytes() == b"second" and taken.read_bytes() == b"an earlier process's"
    assert sorted(p.name for p in spool.tmp.iterdir()) == [taken.name]


def test_absolute_all_with_a_callers_directories_checks_each_directory_once(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    spool = Spool(tmp_path / "spool")
    relatives = [spool.relative(spool.instance_path("1.2.3", "1.2.3.4", f"1.2.3.4.{i}")) for i in range(1, 4)]
    spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.1").parent.mkdir(parents=True)
    directories: dict[str, str | None] = {}
    looked: list[str] = []
    real_lstat = os.lstat
    monkeypatch.setattr(os, "lstat", lambda p, *a, **k: (looked.append(str(p)), real_lstat(p, *a, **k))[1])
    first = [spool.absolute_all([r], directories)[0] for r in relatives]  # three batches of one, as a stream
    directory_looks = [p for p in looked if not p.endswith(".dcm")]
    assert first == [spool.absolute(r) for r in relatives]
    assert len(directory_looks) == len(set(directory_looks)), "a directory looked at again"
    assert list(directories.values()) == [str(first[0].parent)]
