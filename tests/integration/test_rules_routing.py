"""Rules with a real PACS: the whole study is routed, only the right series is processed,
and series are completed by C-FIND confirmation long before their quiet timer.

Orthanc holds one study with a localizer, a thin axial series, a thick series and a
secondary-capture summary (all written by the test) and routes every stable series
to the node.  The node's quiet timer is 600 s; Orthanc is its C-FIND peer, so each
series completes as soon as Orthanc's NumberOfSeriesRelatedInstances equals what
the node received.  One rule selects thin, axial, non-localizer CT.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from tests.integration.conftest import free_port, node_config, storescu, wait_until
from tests.phantoms import make_chest_phantom, write_ct_series

pytestmark = pytest.mark.integration

ROUTE_ALL_LUA = """
function OnStableSeries(seriesId, tags, metadata)
  RestApiPost('/modalities/dicomnode/store', seriesId)
end
"""

QUIET_S = 600  # far longer than the test may take: completion must come from C-FIND


def _secondary_capture(path: Path, study_uid: str) -> Path:
    """A one-image RGB secondary capture "dose summary" in the study, as scanners produce."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesDescription = "Dose report"
    ds.SeriesNumber = 999
    ds.InstanceNumber = 1
    ds.PatientName = "Phantom^Chest"
    ds.PatientID = "PHANTOM001"
    ds.StudyDate = datetime.date(2024, 1, 15).strftime("%Y%m%d")
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = ds.Columns = 32
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.full((32, 32, 3), 200, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _study(tmp: Path) -> tuple[str, dict[str, list[Path]]]:
    study_uid = generate_uid()
    hu, _ = make_chest_phantom(shape=(40, 64, 64), spacing=(1.25, 5.0, 5.0))
    series = {
        "thin": write_ct_series(hu, (1.25, 5.0, 5.0), tmp / "thin", study_uid=study_uid, series_number=2,
                                series_description="Thorax 1.25 mm"),
        "thick": write_ct_series(hu[::4], (5.0, 5.0, 5.0), tmp / "thick", study_uid=study_uid, series_number=3,
                                 series_description="Thorax 5 mm"),
        "localizer": write_ct_series(hu[:1], (1.0, 5.0, 5.0), tmp / "localizer", study_uid=study_uid,
                                     series_number=1, series_description="Topogram",
                                     orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0)),
        "sc": [_secondary_capture(tmp / "sc" / "SC0001.dcm", study_uid)],
    }
    for path in series["localizer"]:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path, enforce_file_format=True)
    return study_uid, series


def test_whole_study_routed_only_thin_axial_processed_and_cfind_completes(
        tmp_path: Path, orthanc_factory: Any, node_factory: Any) -> None:
    study_uid, files = _study(tmp_path / "study")
    uids = {name: str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
            for name, paths in files.items()}

    pacs_port = free_port()
    config = node_config(tmp_path, quiet_seconds=QUIET_S)
    config["completion"]["cfind"] = [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port,
                                      "after_seconds": 1, "interval_seconds": 2, "timeout_s": 10}]
    config["rules"] = [{
        "name": "thin-axial-chest",
        "when": {"Modality": "CT", "orientation": "axial", "slice_spacing": {"max": 1.5},
                 "image_type": {"not": {"contains": "LOCALIZER"}}, "calling_ae": "ORTHANC"},
        "run": ["lungs"], "outputs": ["seg", "sr"], "priority": "stat",
    }]
    node = node_factory(config)
    orthanc = orthanc_factory(node.port, dicom_port=pacs_port, lua=ROUTE_ALL_LUA, stable_age=1)

    sent = storescu(orthanc.dicom_port, [p for paths in files.values() for p in paths], aec="ORTHANC")
    assert sent.returncode == 0, sent.stderr
    assert len(orthanc.series_of_study(study_uid)) == 4

    def settled() -> dict[str, dict[str, Any]] | None:
        rows = {r["series_uid"]: r for r in node.status_json()}
        if set(uids.values()) <= set(rows) and all(
                rows[u]["state"] in ("done", "ignored", "failed") for u in uids.values()):
            return rows
        return None

    rows = wait_until(settled, 180, "all four series to be completed and settled")
    thin = rows[uids["thin"]]
    assert thin["state"] == "done", thin
    assert [(j["kind"], j["rule"], j["state"], j["priority"]) for j in thin["jobs"]] == [
        ("infer", "thin-axial-chest", "done", 10)]
    for name in ("thick", "localizer", "sc"):
        row = rows[uids[name]]
        assert row["state"] == "ignored" and row["jobs"] == [], (name, row)
        assert row["reason"] == "no rule matched", (name, row)
    # Completed by C-FIND (the quiet timer is 600 s), with the count Orthanc confirmed.
    log = node.log()
    for name, paths in files.items():
        assert f"Series {uids[name]}: complete after {len(paths)} instance(s) (ORTHANC confirms " \
               f"{len(paths)} instance(s) by C-FIND)" in log, name
    assert "quiet for 600 s" not in log


@pytest.mark.parametrize("receivers", [1, 2])
def test_a_routed_series_completes_when_the_pacs_releases_its_association(
        tmp_path: Path, orthanc_factory: Any, node_factory: Any, receivers: int) -> None:
    """The PACS is asked as soon as it releases the association that routed the series, not after_seconds later.

    after_seconds and the quiet timer are set far beyond the test's wait, so only the release can
    trigger the query; with one receiver (in the node's process) and with a pool (the hint crosses
    from a receiver process).
    """
    hu, _ = make_chest_phantom(shape=(16, 48, 48), spacing=(1.0, 1.0, 1.0))
    paths = write_ct_series(hu[:6], (1.0, 1.0, 1.0), tmp_path / "ct")
    series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    pacs_port = free_port()
    config = node_config(tmp_path, quiet_seconds=QUIET_S)
    config["node"]["receivers"] = receivers
    config["completion"]["cfind"] = [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port,
                                      "after_seconds": 300, "interval_seconds": 300, "timeout_s": 10}]
    node = node_factory(config)
    orthanc = orthanc_factory(node.port, dicom_port=pacs_port, lua=ROUTE_ALL_LUA, stable_age=1)
    assert storescu(orthanc.dicom_port, paths, aec="ORTHANC").returncode == 0

    def completed() -> bool:
        return any(r["series_uid"] == series_uid and r["state"] not in ("receiving",) for r in node.status_json())

    wait_until(completed, 60, "the routed series to complete (after_seconds is 300 s: only the release asks)")
    assert f"Series {series_uid}: complete after {len(paths)} instance(s) (ORTHANC confirms {len(paths)} " \
           "instance(s) by C-FIND)" in node.log()
