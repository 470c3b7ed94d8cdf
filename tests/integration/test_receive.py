"""The receiver over real associations: statuses for good, bad and hostile input; it keeps serving."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts, build_context
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification

from dicom_node.receive.journal import part10_head_for
from tests.integration.conftest import node_config, storescu
from tests.phantoms import make_chest_phantom, write_ct_series

pytestmark = pytest.mark.integration


def _assoc(port: int, contexts: Any = None, ae_title: str = "TESTSCU") -> Any:
    ae = AE(ae_title=ae_title)
    ae.requested_contexts = contexts or StoragePresentationContexts[:127]
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established, "association with the node failed"
    return assoc


def _store_then_echo(port: int, ds: pydicom.Dataset, name: str) -> int | None:
    """C-STORE ``ds`` on a new association, then check the node still answers a C-ECHO on it.

    Returns the C-STORE status, ``None`` when this SCU could not encode the
    file (nothing reached the node), ``-1`` when no response came.  Under
    load pynetdicom's requestor can hand a response to its own reactor thread
    ("Received unexpected ... service message", then its DIMSE timeout): an
    echo lost that way is asked again on a fresh association, which must work.
    """
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established, name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rsp = assoc.send_c_store(ds)
    except Exception:
        assoc.abort()  # the SCU could not encode it: nothing reached the node
        return None
    status = int(rsp.Status) if "Status" in rsp else -1
    echo = assoc.send_c_echo() if assoc.is_established else Dataset()
    if "Status" not in echo:
        again = _assoc(port)
        echo = again.send_c_echo()
        again.release()
    assert echo.Status == 0x0000, f"node stopped answering after {name}"
    if assoc.is_established:
        assoc.release()
    return status


@pytest.fixture()
def node(tmp_path: Path, node_factory: Any) -> Any:
    return node_factory(node_config(tmp_path, rules=[]))


@pytest.fixture()
def slices(tmp_path: Path) -> list[Path]:
    hu, _ = make_chest_phantom(shape=(16, 48, 48), spacing=(2.0, 2.0, 2.0))
    return write_ct_series(hu[:4], (2.0, 2.0, 2.0), tmp_path / "ct")


def test_echo_and_store_are_recorded_before_success(node: Any, slices: list[Path]) -> None:
    assoc = _assoc(node.port)
    assert assoc.send_c_echo().Status == 0x0000
    for f in slices:
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000
    assoc.release()
    rows = node.status_json()
    assert len(rows) == 1 and rows[0]["instance_count"] == len(slices)
    spooled = sorted((node.state / "spool" / "incoming").rglob("*.dcm"))
    assert len(spooled) == len(slices)
    # Stored bit for bit as received (same pixel bytes, same UIDs).
    original = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f).PixelData for f in slices}
    for p in spooled:
        ds = pydicom.dcmread(p)
        assert original[ds.SOPInstanceUID] == ds.PixelData


def test_dcmtk_storescu_can_send(node: Any, slices: list[Path]) -> None:
    out = storescu(node.port, slices, aec="DICOMNODE")
    assert out.returncode == 0, out.stderr
    assert node.status_json()[0]["instance_count"] == len(slices)


@pytest.mark.parametrize("field,value,status", [
    ("SeriesInstanceUID", "../../etc", 0xC001),
    ("StudyInstanceUID", "", 0xC001),
    ("SOPInstanceUID", "1.2.3.abc", 0xC001),
])
def test_hostile_or_missing_uids_are_refused(node: Any, slices: list[Path], field: str, value: str,
                                             status: int) -> None:
    ds = pydicom.dcmread(slices[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI value we set on purpose
        setattr(ds, field, value)
    assoc = _assoc(node.port)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rsp = assoc.send_c_store(ds)
    # pynetdicom sends the dataset's SOP Instance UID as the affected one; either way it is refused.
    assert rsp.Status in (status, 0xA900)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert not list((node.state / "spool" / "incoming").rglob("*etc*"))
    assert node.status_json() == []


def test_low_disk_answers_out_of_resources(tmp_path: Path, node_factory: Any, slices: list[Path]) -> None:
    config = node_config(tmp_path, rules=[])
    config["storage"]["min_free_mb"] = 10**9  # more than any disk has
    node = node_factory(config)
    assoc = _assoc(node.port)
    assert assoc.send_c_store(pydicom.dcmread(slices[0])).Status == 0xA700
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert "Intake paused" in node.log()


def test_pydicom_odd_files_get_a_status_and_the_node_keeps_serving(node: Any) -> None:
    folder = Path(pydicom.data.__file__).parent / "test_files"
    files = sorted(folder.glob("*.dcm"))
    assert len(files) > 50, f"pydicom's test files not found under {folder}"
    statuses: dict[str, int] = {}
    for path in files:
        name = path.name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, force=True)
                sop_class = str(ds.get("SOPClassUID", ""))
                sop_uid = str(ds.get("SOPInstanceUID", ""))
        except Exception:
            continue  # not even readable on the sending side: no SCU could send it
        if not sop_class or not sop_uid or "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            continue
        status = _store_then_echo(node.port, ds, name)
        if status == -1:  # the response was lost on our side (see _store_then_echo): send it once more
            status = _store_then_echo(node.port, ds, name)
        if status is not None:
            statuses[name] = status
    assert len(statuses) > 40, statuses
    for good in ("CT_small.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm",
                 "image_dfl.dcm"):
        assert statuses[good] == 0x0000, (good, statuses[good])
    assert all(s == 0x0000 or s >= 0xA000 for s in statuses.values()), statuses


def test_unknown_called_ae_title_is_rejected(node: Any) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SOMEONEELSE")
    assert assoc.is_rejected


def test_allowed_peers_refuse_unknown_calling_ae(tmp_path: Path, node_factory: Any) -> None:
    config = node_config(tmp_path, rules=[])
    config["node"]["allowed_peers"] = [{"ae_title": "PACS", "host": "127.0.0.1"}]
    node = node_factory(config)
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_rejected
    ae2 = AE(ae_title="PACS")
    ae2.add_requested_context(Verification)
    assoc2 = ae2.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc2.is_established
    assoc2.release()
    assert "INTRUDER" in node.log()



def test_sigkill_during_a_series_loses_nothing_acknowledged(tmp_path: Path, node_factory: Any) -> None:
    """SIGKILL mid-series, restart, re-send only what was not acknowledged: results cover every slice."""
    import signal

    from tests.integration.conftest import wait_until

    spacing = (3.0, 4.0, 4.0)  # big enough for the lungs model to find both lungs
    hu, _ = make_chest_phantom(shape=(16, 48, 48), spacing=spacing)
    files = write_ct_series(hu, spacing, tmp_path / "ct")
    config = node_config(tmp_path, quiet_seconds=3.0)
    # A late instance must not be needed to complete the series: the restart keeps the series open.
    config["completion"]["reprocess_late_arrivals"] = False
    node = node_factory(config, name="node")

    acknowledged: list[Path] = []
    assoc = _assoc(node.port)
    for f in files[:9]:
        if assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000:
            acknowledged.append(f)
    assert len(acknowledged) == 9
    node.stop(signal.SIGKILL)  # while the association is still open, mid-series
    assert node.proc.returncode == -signal.SIGKILL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rsp = assoc.send_c_store(pydicom.dcmread(files[9]))
            assert "Status" not in rsp  # no answer from a dead node: not acknowledged
        except Exception:
            pass
    assoc.abort()

    # What a kill can leave behind: a half-written temp file, and a file renamed into
    # place whose row was never committed (so never acknowledged: the sender will resend it).
    spool = node.state / "spool"
    (spool / "tmp" / "crash.part").write_bytes(b"half a dataset")
    orphan_ds = pydicom.dcmread(files[9])
    orphan = (spool / "incoming" / orphan_ds.StudyInstanceUID / orphan_ds.SeriesInstanceUID
              / f"{orphan_ds.SOPInstanceUID}.dcm")
    orphan.write_bytes(files[9].read_bytes()[:100])
    rows = node.status_json()
    # Acknowledged = in the intake journal; its rows follow in batches, so a kill can leave the last ones there.
    recorded = rows[0]["instance_count"]
    assert recorded <= 9 and rows[0]["state"] == "receiving"
    journaled = list((spool / "intake").glob("*.journal"))
    assert recorded == 9 or journaled, (recorded, journaled)

    restarted = node_factory(config, name="node")  # same state directory, same port
    assert not (spool / "tmp" / "crash.part").exists()
    assert not orphan.exists() or orphan.stat().st_size > 100
    assert restarted.status_json()[0]["instance_count"] == 9  # every acknowledged one, the journal's recorded
    assert not any(p.exists() for p in journaled)
    if recorded < 9:
        assert "recorded from the journal" in restarted.log()
    unacknowledged = [f for f in files if f not in acknowledged]
    out = storescu(restarted.port, unacknowledged, aec="DICOMNODE")
    assert out.returncode == 0, out.stderr

    def done() -> Any:
        rows = restarted.status_json()
        return rows and rows[0]["state"] in ("done", "failed") and rows[0]

    row = wait_until(done, 180, "the series to be processed after the restart")
    assert row["state"] == "done", row
    assert row["instance_count"] == len(files)
    produced = list((restarted.state / "spool" / "results").rglob("*.dcm"))
    segs = [p for p in produced if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"]
    assert len(segs) == 1, (produced, restarted.log()[-3000:])
    seg = pydicom.dcmread(segs[0])
    referenced = {item.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                  for item in s.ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert "removed" in restarted.log() and "never recorded" in restarted.log()


def _multiframe(megabytes: int) -> Dataset:
    """A Multi-frame Grayscale Word Secondary Capture of ``megabytes`` MiB of pixel data (one MiB a frame)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "OT", "LARGE"
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 512, 1024, megabytes, 1
    ds.PhotometricInterpretation, ds.PixelRepresentation = "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = bytes(range(256)) * (4096 * megabytes)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_a_large_instance_is_stored_from_its_spill_file_and_one_past_the_limit_is_refused(
        tmp_path: Path, node_factory: Any, slices: list[Path]) -> None:
    """36 MiB (past the 32 MiB kept in memory) is written once, to the spool, and is the same file the journal
    would have made; 44 MiB is past node.max_instance_mb: 0xA700, nothing kept; the association goes on."""
    config = node_config(tmp_path, rules=[])
    config["node"]["max_instance_mb"] = 40
    node = node_factory(config)
    large, too_large, slice_ = _multiframe(36), _multiframe(44), pydicom.dcmread(slices[0])
    contexts = [build_context(large.SOPClassUID, ExplicitVRLittleEndian),
                build_context(slice_.SOPClassUID, slice_.file_meta.TransferSyntaxUID)]
    assoc = _assoc(node.port, contexts)
    statuses = [int(assoc.send_c_store(ds).Status) for ds in (large, too_large, slice_)]
    assert statuses == [0x0000, 0xA700, 0x0000]
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()

    expected = part10_head_for(large.SOPClassUID, large.SOPInstanceUID, ExplicitVRLittleEndian) \
        + encode(large, False, True)
    deadline = time.monotonic() + 10
    while True:  # the slice's row follows its journal record within moments
        with contextlib.closing(sqlite3.connect(node.state / "dicom-node.sqlite3")) as db:
            rows = dict(db.execute("SELECT sop_uid, path || '|' || size || '|' || sha256 FROM instances").fetchall())
        if len(rows) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert set(rows) == {large.SOPInstanceUID, slice_.SOPInstanceUID}
    path, size, sha = rows[large.SOPInstanceUID].split("|")
    stored = (node.state / "spool" / path).read_bytes()
    assert stored == expected and int(size) == len(expected) and sha == hashlib.sha256(expected).hexdigest()
    assert list((node.state / "spool" / "tmp").glob("*.part")) == []  # no spill file left
    journals = list((node.state / "spool" / "intake").glob("*.journal"))
    assert journals and all(p.stat().st_size < 2**20 for p in journals)  # the large one never went through them
    assert "node.max_instance_mb" in node.log()
