"""Foundation, end to end with a real PACS.

Orthanc (Debian package) routes stable CT series to the node with a Lua
``OnStableSeries`` rule; a modality (DCMTK ``storescu``) stores a synthetic
chest CT with known lung volumes into Orthanc; the node's SEG and SR must
appear in the same study, pass ``dciodvfy``, and give the phantom's volumes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from tests.integration.conftest import (
    dciodvfy_errors,
    free_port,
    node_config,
    storescu,
    wait_until,
)
from tests.phantoms import make_chest_phantom, write_ct_series
from tests.realdata import real_ct_slices, shared, write

pytestmark = pytest.mark.integration



def _results_in_study(orthanc: Any, study_uid: str) -> dict[str, str] | None:
    """Orthanc series IDs of SEG and SR in the study once both have arrived."""
    found = {s["MainDicomTags"].get("Modality"): s["ID"] for s in orthanc.series_of_study(study_uid)}
    if "SEG" in found and "SR" in found:
        return {"SEG": found["SEG"], "SR": found["SR"]}
    return None


def _download_single(orthanc: Any, series_id: str, dest: Path) -> Path:
    instances = orthanc.get(f"/series/{series_id}/instances")
    assert len(instances) == 1, f"expected exactly one object in series, got {len(instances)}"
    dest.write_bytes(orthanc.get_bytes(f"/instances/{instances[0]['ID']}/file"))
    return dest


def _sr_volumes(sr: pydicom.Dataset) -> dict[str, float]:
    """Volume (ml) per finding (segment) from the TID 1500 report."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    volumes: dict[str, float] = {}
    for group in report.content.get_volumetric_roi_measurement_groups():
        name = group.finding_type.meaning if group.finding_type else group.tracking_identifier
        for m in group.get_measurements():
            if m.name.value == "118565006":  # SNOMED CT Volume
                assert m.unit.value == "ml"
                volumes[name] = float(m.value)
    return volumes


def _seg_volumes(seg_ds: pydicom.Dataset, spacing_mm: tuple[float, float, float]) -> dict[str, float]:
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    voxel_ml = spacing_mm[0] * spacing_mm[1] * spacing_mm[2] / 1000.0
    out: dict[str, float] = {}
    for number in seg.segment_numbers:
        desc = seg.get_segment_description(number)
        mask = seg.get_volume(segment_numbers=[number], combine_segments=False).array
        out[desc.segment_label] = float(np.count_nonzero(mask)) * voxel_ml
    return out


def test_chest_ct_phantom_gets_seg_and_sr_in_the_same_study(tmp_path: Path, orthanc_factory: Any,
                                                           node_factory: Any) -> None:
    # The node first (it needs the PACS's port for sending back), then the PACS routing to it.
    pacs_dicom_port = free_port()
    config = node_config(tmp_path, destinations={
        "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_dicom_port}})
    node = node_factory(config)
    orthanc = orthanc_factory(node.port, dicom_port=pacs_dicom_port)

    spacing = (2.5, 2.0, 2.0)
    hu, truth = make_chest_phantom(shape=(60, 128, 128), spacing=spacing)
    files = write_ct_series(hu, spacing, tmp_path / "phantom")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    sent = storescu(orthanc.dicom_port, files, aec="ORTHANC")
    assert sent.returncode == 0, sent.stderr

    results = wait_until(lambda: _results_in_study(orthanc, study_uid), 240,
                         "SEG and SR in the study on Orthanc")

    seg_path = _download_single(orthanc, results["SEG"], tmp_path / "seg.dcm")
    sr_path = _download_single(orthanc, results["SR"], tmp_path / "sr.dcm")
    for path in (seg_path, sr_path):
        errors = dciodvfy_errors(path)
        assert errors == [], f"dciodvfy errors in {path.name}:\n" + "\n".join(errors)

    seg_ds, sr_ds = pydicom.dcmread(seg_path), pydicom.dcmread(sr_path)
    for ds in (seg_ds, sr_ds):
        assert ds.StudyInstanceUID == study_uid
        assert ds.PatientID == "PHANTOM001"

    seg_vol = _seg_volumes(seg_ds, spacing)
    sr_vol = _sr_volumes(sr_ds)
    for label, key in (("Right lung", "right_ml"), ("Left lung", "left_ml")):
        assert seg_vol[label] == pytest.approx(truth[key], rel=0.03), (label, seg_vol, truth)
        assert sr_vol[label] == pytest.approx(truth[key], rel=0.03), (label, sr_vol, truth)

    # The SR references the SEG it measures.
    report = hd.sr.Comprehensive3DSR.from_dataset(sr_ds)
    group = report.content.get_volumetric_roi_measurement_groups()[0]
    ref = group.referenced_segment
    assert ref is not None and ref.referenced_sop_instance_uid == seg_ds.SOPInstanceUID

    # The node's own outputs were received back by Orthanc, never re-processed, and status shows DONE.
    status = wait_until(lambda: [s for s in node.status_json() if s["state"] == "done"], 30, "series done")
    assert len(status) == 1 and status[0]["study_uid"] == study_uid
    assert all(j["state"] == "done" for j in status[0]["jobs"])


@pytest.mark.parametrize("origin", ["registry", "shared"])
def test_real_head_ct_without_lungs_finishes_cleanly(tmp_path: Path, orthanc_factory: Any,
                                                     node_factory: Any, origin: str) -> None:
    # registry: the CQ500 head CT slice of pydicom-data as a 6-slice, 5 mm series;
    # shared: the Philips head phantom of ../shared/testdata (28 slices).
    if origin == "registry":
        source = tmp_path / "registry-head-ct"
        write(real_ct_slices(6, spacing_mm=5.0), source)
    else:
        source = shared("ct_head_5mm_philips")

    pacs_dicom_port = free_port()
    config = node_config(tmp_path, destinations={
        "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_dicom_port}})
    node = node_factory(config)
    orthanc = orthanc_factory(node.port, dicom_port=pacs_dicom_port)
    files = sorted(source.iterdir())
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    sent = storescu(orthanc.dicom_port, files, aec="ORTHANC")
    assert sent.returncode == 0, sent.stderr

    def finished() -> list[dict[str, Any]]:
        return [s for s in node.status_json() if s["state"] in ("done", "failed")]

    rows = wait_until(finished, 240, "the head CT to be processed")
    assert rows[0]["state"] == "done", rows
    infer = [j for j in rows[0]["jobs"] if j["kind"] == "infer"][0]
    assert "no lungs found" in infer["payload"]["findings"]
    # No SEG (nothing segmented); the SR records the finding in the same study.
    sr = wait_until(lambda: [s for s in orthanc.series_of_study(study_uid)
                             if s["MainDicomTags"].get("Modality") == "SR"], 60, "the SR on Orthanc")
    assert not [s for s in orthanc.series_of_study(study_uid) if s["MainDicomTags"].get("Modality") == "SEG"]
    sr_path = _download_single(orthanc, sr[0]["ID"], tmp_path / "sr.dcm")
    assert dciodvfy_errors(sr_path) == []
    text = str(pydicom.dcmread(sr_path).ContentSequence)
    assert "no lungs found" in text.lower()
    assert "Traceback" not in node.log()
    shutil.rmtree(tmp_path / "phantom", ignore_errors=True)
