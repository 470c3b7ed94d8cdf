"""Spool paths are built from validated UIDs only; writes are atomic."""

from __future__ import annotations

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
