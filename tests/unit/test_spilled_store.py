"""A C-STORE whose data set was spilled to a file: that file becomes the instance's, after the journal's earlier ones."""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.receive.dataset_buffer import DataSetBuffer, IntakeLimits, SpilledDataSet
from dicom_node.receive.handlers import StoreHandler
from dicom_node.receive.journal import part10_head_for
from dicom_node.spool import Spool
from dicom_node.store import Database, SeriesStore


def _data_set(study: str, series: str, sop: str, fill: int) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, sop, "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.BitsAllocated = 8
    ds.PixelData = bytes([fill]) * 5000
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _event(handler: StoreHandler, sop: str, data: bytes, spill_dir: Path) -> Any:
    """pynetdicom's event for a C-STORE whose data set spilled (1000 bytes kept in memory)."""
    head = part10_head_for(CTImageStorage, sop, ExplicitVRLittleEndian)
    buffer = DataSetBuffer(IntakeLimits(max_bytes=10**6, spill_dir=spill_dir, free_mb=lambda: 1e9, min_free_mb=1,
                                        memory_bytes=1000), lambda: head)
    buffer.write(memoryview(data))
    spilled = buffer.result()
    assert isinstance(spilled, SpilledDataSet)
    request = C_STORE()
    request.MessageID, request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = 1, CTImageStorage, sop
    request.DataSet = spilled
    return SimpleNamespace(
        request=request, context=SimpleNamespace(transfer_syntax=ExplicitVRLittleEndian),
        assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="MOD", address="127.0.0.1"),
                              acceptor=SimpleNamespace(ae_title="NODE")),
        encoded_dataset=lambda include_meta=True: pytest.fail("a spilled data set read whole"),
    )


def test_a_spilled_instance_is_stored_after_an_earlier_copy_in_the_journal(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "state")
    series = SeriesStore(Database(tmp_path / "state" / "state.sqlite3"))
    handler = StoreHandler(spool, series, min_free_mb=1, free_mb=lambda: 1e9)
    handler.attach_journal()
    study, series_uid, sop = generate_uid(), generate_uid(), generate_uid()
    gate = threading.Event()
    real = series.record_instances
    monkeypatch.setattr(series, "record_instances", lambda batch: (gate.wait(10), real(batch))[1])

    # an earlier copy of the instance, in memory, through the journal: its row held back
    older = _data_set(study, series_uid, sop, 1)
    older_event = _event(handler, sop, older, spool.tmp)
    older_event.request.DataSet.close()
    older_event.request.DataSet = io.BytesIO(older)
    older_event.encoded_dataset = lambda include_meta=True: older
    assert handler(older_event) == 0x0000

    newer = _data_set(study, series_uid, sop, 2)
    event = _event(handler, sop, newer, spool.tmp)
    spilled = event.request.DataSet
    statuses: list[int] = []
    thread = threading.Thread(target=lambda: statuses.append(handler(event)))
    thread.start()
    thread.join(0.5)
    assert thread.is_alive(), "stored before the journal's earlier copy was recorded"
    gate.set()
    thread.join(10)
    assert statuses == [0x0000]
    path = spool.instance_path(study, series_uid, sop)
    expected = part10_head_for(CTImageStorage, sop, ExplicitVRLittleEndian) + newer
    assert path.read_bytes() == expected  # the later copy's bytes, in the spilled file's own place
    row = series.db.query("SELECT sha256, size FROM instances WHERE sop_uid = ?", (sop,))[0]
    assert (row["sha256"], row["size"]) == (hashlib.sha256(expected).hexdigest(), len(expected))
    spilled.close()
    assert list(spool.tmp.glob("*.part")) == [] and path.read_bytes() == expected
    handler.close()


def test_a_spilled_instance_with_a_bad_uid_is_refused_and_its_file_goes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "state")
    series = SeriesStore(Database(tmp_path / "state" / "state.sqlite3"))
    handler = StoreHandler(spool, series, min_free_mb=1, free_mb=lambda: 1e9)
    sop = generate_uid()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's on the invalid UID set on purpose
        data = _data_set(generate_uid(), "1.2.abc", sop, 3)
    event = _event(handler, sop, data, spool.tmp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's again, reading it: the node runs with warnings as warnings
        assert handler(event) == 0xC001
    event.request.DataSet.close()
    assert list(spool.tmp.glob("*.part")) == [] and not list(spool.incoming.rglob("*.dcm"))
