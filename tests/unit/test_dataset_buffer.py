"""DataSetBuffer: small data sets in memory, large ones in a spool file (never whole in memory), too large refused."""

from __future__ import annotations

import errno
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.receive import dataset_buffer
from dicom_node.receive.dataset_buffer import DataSetBuffer, IntakeLimits, SpilledDataSet
from dicom_node.receive.journal import part10_head_for

SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage


def _limits(tmp_path: Path, max_bytes: int = 10_000, memory_bytes: int = 1000, free: float = 1e9,
            min_free: float = 10) -> IntakeLimits:
    spill = tmp_path / "tmp"
    spill.mkdir(exist_ok=True)
    return IntakeLimits(max_bytes=max_bytes, spill_dir=spill, free_mb=lambda: free, min_free_mb=min_free,
                        memory_bytes=memory_bytes)


def _fed(buffer: DataSetBuffer, data: bytes, fragment: int) -> DataSetBuffer:
    for start in range(0, len(data), fragment):
        buffer.write(memoryview(data)[start:start + fragment])
    return buffer


def _data_set(sop_uid: str, pixel_bytes: int) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASS, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "OT"
    ds.BitsAllocated = 8
    ds.PixelData = bytes(range(256)) * (pixel_bytes // 256)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def test_a_small_data_set_stays_in_memory(tmp_path: Path) -> None:
    data = os.urandom(1000)
    result = _fed(DataSetBuffer(_limits(tmp_path), lambda: b"HEAD"), data, 300).result()
    assert type(result) is io.BytesIO and result.getvalue() == data
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_large_data_set_is_its_part10_file_in_the_spool_never_whole_in_memory(tmp_path: Path) -> None:
    sop_uid = generate_uid()
    data = _data_set(sop_uid, 6000)
    head = part10_head_for(SOP_CLASS, sop_uid, ExplicitVRLittleEndian)
    buffer = _fed(DataSetBuffer(_limits(tmp_path), lambda: head), data, 700)
    assert buffer._memory is None  # what was in memory went to the file when it spilled
    spilled = buffer.result()
    assert isinstance(spilled, SpilledDataSet)
    assert spilled.path.parent == tmp_path / "tmp" and spilled.path.read_bytes() == head + data
    assert (spilled.head_size, spilled.size, spilled.file_size) == (len(head), len(data), len(head) + len(data))
    assert spilled.sha256 == hashlib.sha256(head + data).hexdigest()
    # read as the data set alone, as pynetdicom's BytesIO reads
    assert spilled.getvalue() == data
    spilled.seek(10)
    assert spilled.read(5) == data[10:15] and spilled.tell() == 15
    assert spilled.seek(-3, io.SEEK_END) == len(data) - 3 and spilled.read() == data[-3:]
    with pytest.raises(io.UnsupportedOperation):
        spilled.getbuffer()
    # the file is a Part 10 file of the instance
    read = pydicom.dcmread(spilled.path, stop_before_pixels=True)
    assert read.SOPInstanceUID == read.file_meta.MediaStorageSOPInstanceUID == sop_uid
    spilled.close()
    assert not spilled.path.exists()


def test_a_committed_spill_file_is_the_instance_file(tmp_path: Path) -> None:
    data = os.urandom(3000)
    spilled = _fed(DataSetBuffer(_limits(tmp_path), lambda: b"HEAD"), data, 1000).result()
    assert isinstance(spilled, SpilledDataSet)
    target = tmp_path / "spool" / "study" / "series" / "sop.dcm"
    spilled.commit(target)
    spilled.close()
    assert target.read_bytes() == b"HEAD" + data and list((tmp_path / "tmp").iterdir()) == []


def test_past_the_limit_the_bytes_are_dropped_and_the_reason_names_the_key(tmp_path: Path) -> None:
    buffer = _fed(DataSetBuffer(_limits(tmp_path, max_bytes=5000), lambda: b"HEAD"), os.urandom(12_000), 1000)
    assert buffer.refused is not None and "node.max_instance_mb" in buffer.refused
    assert buffer.size == 12_000  # the rest was still read
    assert list((tmp_path / "tmp").iterdir()) == []  # the spill file went with it
    in_memory = _fed(DataSetBuffer(_limits(tmp_path, max_bytes=5000, memory_bytes=10_000)), os.urandom(6000), 1000)
    assert in_memory.refused is not None and in_memory._memory is None


def test_the_spool_floor_and_a_failing_disk_refuse_and_remove_the_spill_file(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    low = _fed(DataSetBuffer(_limits(tmp_path, free=5, min_free=10), lambda: b"HEAD"), os.urandom(3000), 1000)
    assert low.refused is not None and "storage.min_free_mb" in low.refused

    free = [1e9]
    monkeypatch.setattr(dataset_buffer, "_FREE_CHECK_BYTES", 2000)
    limits = IntakeLimits(max_bytes=10**6, spill_dir=_limits(tmp_path).spill_dir, free_mb=lambda: free[0],
                          min_free_mb=10, memory_bytes=1000)
    buffer = _fed(DataSetBuffer(limits, lambda: b"HEAD"), os.urandom(3000), 1000)
    assert buffer.refused is None and len(list(limits.spill_dir.iterdir())) == 1
    free[0] = 5  # the spool fills while the data set arrives
    _fed(buffer, os.urandom(3000), 1000)
    assert buffer.refused is not None and "storage.min_free_mb" in buffer.refused
    assert list(limits.spill_dir.iterdir()) == []

    real_write = os.write

    def failing(fd: int, data: Any) -> int:
        if fd > 2 and len(data) == 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    free[0] = 1e9
    monkeypatch.setattr(dataset_buffer.os, "write", failing)
    full = _fed(DataSetBuffer(limits, lambda: b"HEAD"), os.urandom(3000), 1000)
    assert full.refused is not None and "No space left on device" in full.refused
    assert list(limits.spill_dir.iterdir()) == []


def test_without_a_head_a_large_data_set_is_refused(tmp_path: Path) -> None:
    buffer = _fed(DataSetBuffer(_limits(tmp_path), lambda: None), os.urandom(3000), 1000)
    assert buffer.refused is not None and list((tmp_path / "tmp").iterdir()) == []


def test_discard_removes_a_half_gathered_spill_file(tmp_path: Path) -> None:
    buffer = _fed(DataSetBuffer(_limits(tmp_path), lambda: b"HEAD"), os.urandom(3000), 1000)
    assert len(list((tmp_path / "tmp").iterdir())) == 1
    buffer.discard()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_without_limits_it_is_pynetdicoms_unbounded_bytesio(tmp_path: Path) -> None:
    data = os.urandom(50_000)
    result = _fed(DataSetBuffer(), data, 4096).result()
    assert type(result) is io.BytesIO and result.getvalue() == data
