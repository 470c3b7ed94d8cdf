"""Results in real archives: re-processing replaces, and a SEG-refusing destination gets overlays.

- Orthanc (Debian package) routes the chest phantom to the node twice: the
  same bytes (a no-op in the node), then with one instance changed (the
  series re-opens and is processed again).  Orthanc must still hold exactly
  one SEG and one SR, with the UIDs of the first run.
- A pynetdicom storage SCP that does not support the Segmentation Storage
  SOP class receives the overlay series (and the SR) instead of the SEG; the
  send job records it; the overlays are saved as PNG under
  ``test-output/`` and their pixels are checked where the lungs are.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    SecondaryCaptureImageStorage,
)

from inference.models.builtin import LUNGS_CT_CARD
from tests.integration.conftest import free_port, node_config, storescu, wait_until
from tests.phantoms import make_chest_phantom, write_ct_series

pytestmark = pytest.mark.integration

OUTPUT_DIR = Path(__file__).resolve().parents[2] / "test-output"


def _phantom(tmp_path: Path) -> tuple[list[Path], np.ndarray]:
    spacing = (2.5, 2.0, 2.0)
    hu, _ = make_chest_phantom(shape=(40, 128, 128), spacing=spacing)
    return write_ct_series(hu, spacing, tmp_path / "phantom"), hu


def _results(orthanc: Any, study_uid: str) -> dict[str, list[str]]:
    """SOP Instance UIDs per result modality in the study on Orthanc."""
    found: dict[str, list[str]] = {}
    for series in orthanc.series_of_study(study_uid):
        modality = series["MainDicomTags"].get("Modality")
        if modality in ("SEG", "SR"):
            for instance in orthanc.get(f"/series/{series['ID']}/instances"):
                found.setdefault(modality, []).append(instance["MainDicomTags"]["SOPInstanceUID"])
    return found


def _sends_done(node: Any, count: int) -> bool:
    rows = node.status_json()
    jobs = [j for row in rows for j in row["jobs"] if j["kind"] == "send" and j["state"] == "done"]
    return len(jobs) >= count


def _all_settled(node: Any, sends: int, infers: int) -> bool:
    """At least ``sends`` SEND and ``infers`` inference jobs, and every job of the node done."""
    jobs = [j for row in node.status_json() for j in row["jobs"]]
    kinds = [j["kind"] for j in jobs]
    return (kinds.count("send") >= sends and kinds.count("infer") >= infers
            and all(j["state"] == "done" for j in jobs))


def test_series_sent_twice_leaves_one_seg_and_one_sr(tmp_path: Path, orthanc_factory: Any,
                                                      node_factory: Any) -> None:
    pacs_port = free_port()
    node = node_factory(node_config(tmp_path, destinations={
        "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}}))
    orthanc = orthanc_factory(node.port, dicom_port=pacs_port)
    files, _ = _phantom(tmp_path)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    assert storescu(orthanc.dicom_port, files, aec="ORTHANC").returncode == 0
    def both() -> dict[str, list[str]] | None:
        found = _results(orthanc, study_uid)
        return found if len(found) == 2 else None

    first = wait_until(both, 240, "SEG and SR on Orthanc")
    wait_until(lambda: _sends_done(node, 1), 60, "the first send to finish")

    # The PACS routes the same series again: identical bytes change nothing in the node.
    assert storescu(orthanc.dicom_port, files, aec="ORTHANC").returncode == 0
    # Then one instance is corrected (a late change): the series re-opens and is processed again.
    changed = pydicom.dcmread(files[5])
    changed.ImageComments = "corrected after the first run"
    changed.save_as(files[5], enforce_file_format=True)
    assert storescu(orthanc.dicom_port, [files[5]], aec="ORTHANC").returncode == 0
    wait_until(lambda: _sends_done(node, 2), 240, "the re-processed results to be sent")

    second = _results(orthanc, study_uid)
    assert second == first, (first, second)
    assert len(second["SEG"]) == 1 and len(second["SR"]) == 1
    infer_jobs = [j for row in node.status_json() for j in row["jobs"] if j["kind"] == "infer"]
    assert len([j for j in infer_jobs if j["state"] == "done"]) >= 2, infer_jobs


class _NoSegStore:
    """A storage SCP that supports CT, SR and Secondary Capture, but not Segmentation Storage."""

    def __init__(self) -> None:
        self.received: list[Dataset] = []
        self.lock = threading.Lock()
        self.ae = AE(ae_title="NOSEG")
        for sop_class in (CTImageStorage, Comprehensive3DSRStorage, ComprehensiveSRStorage,
                          SecondaryCaptureImageStorage):
            self.ae.add_supported_context(sop_class)
        self.port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.received.append(ds)
        return 0x0000

    def by_modality(self) -> dict[str, list[Dataset]]:
        with self.lock:
            out: dict[str, list[Dataset]] = {}
            for ds in self.received:
                out.setdefault(str(ds.Modality), []).append(ds)
            return out

    def stop(self) -> None:
        self.server.shutdown()


def test_destination_refusing_seg_receives_the_overlay_series(tmp_path: Path, node_factory: Any) -> None:
    scp = _NoSegStore()
    try:
        node = node_factory(node_config(tmp_path, destinations={
            "noseg": {"ae_title": "NOSEG", "host": "127.0.0.1", "port": scp.port}}))
        files, hu = _phantom(tmp_path)
        assert storescu(node.port, files, aec="DICOMNODE").returncode == 0
        # First send: SR delivered, SEG refused -> a job renders the overlay series -> it is sent (in
        # batches while it is drawn: one SEND job per batch).
        wait_until(lambda: _all_settled(node, sends=2, infers=2), 240,
                   "the SR and then the whole overlay series to be sent")
        got = scp.by_modality()
        jobs = [j for row in node.status_json() for j in row["jobs"]]
    finally:
        scp.stop()

    assert "SEG" not in got and len(got.get("SR", [])) == 1
    overlays = sorted(got["OT"], key=lambda ds: int(ds.InstanceNumber))
    assert overlays, got.keys()
    assert len({ds.SeriesInstanceUID for ds in overlays}) == 1
    first_send = min((j for j in jobs if j["kind"] == "send"), key=lambda j: j["id"])
    record = first_send["payload"]["seg_fallback"]
    assert record["sent_instead"] == "sc" and record["refused"] == ["1.2.840.10008.5.1.4.1.1.66.4"]
    render = [j for j in jobs if j["id"] == record["rendering_job"]][0]
    assert render["kind"] == "infer" and render["state"] == "done" and render["payload"]["outputs"] == ["sc"]
    overlay_files = [f for j in jobs if j["kind"] == "send" and j["id"] != first_send["id"]
                     for f in j["payload"]["files"]]
    assert len(overlay_files) == len(set(overlay_files)) == len(overlays), (len(overlay_files), len(overlays))

    # Look at the overlays: the middle one is saved for people, and checked by its pixels.
    sources = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: z for z, f in enumerate(files)}
    image = overlays[len(overlays) // 2]
    rgb = image.pixel_array
    OUTPUT_DIR.mkdir(exist_ok=True)
    Image.fromarray(rgb).save(OUTPUT_DIR / "overlay_refused_seg.png")
    z = sources[image.SourceImageSequence[0].ReferencedSOPInstanceUID]
    rows = hu.shape[1]
    picture, source_hu = rgb[:rows].astype(int), hu[z]
    colours = {spec.name: spec.color for spec in LUNGS_CT_CARD.segments}
    for name, colour in colours.items():
        assert np.all(picture == colour, axis=2).sum() > 20, f"{name} contour missing"
    tinted = (picture[:, :, 0] != picture[:, :, 1]) | (picture[:, :, 1] != picture[:, :, 2])
    assert tinted.sum() > 100
    # Tinted pixels lie on air-filled lung (the fill) or on its edge (the contour): mostly below -400 HU.
    assert np.mean(source_hu[tinted] < -400) > 0.9
    # Away from the lungs (the body wall and outside the body) the picture is plain grey.
    assert not tinted[:, :3].any() and not tinted[:3, :].any()
