"""What the radiologist sees: the node's results opened in the OHIF viewer, in a real browser.

A chest CT goes into Orthanc (with its DICOMweb plugin), is routed to ``dicom-node serve``, and
the SEG, SR and PDF come back into the study.  OHIF 3.13 (npm's prebuilt ``@ohif/app``) is served
with Orthanc's DICOMweb on one origin and driven in Debian's chromium, headless: each object is put
in the viewport as a user would pick it, and what OHIF loaded is read from ``window.services`` and
cornerstone's state, then compared with the DICOM objects and the phantom's truth.  Screenshots
are kept under ``test-output/ohif``.
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.results.sr import report_findings
from tests.integration.conftest import free_port, node_config, start_orthanc, storescu, wait_until
from tests.ohif import ORTHANC_DICOMWEB, ViewerServer, browser, display_sets, require_viewer, wait_for_services
from tests.phantoms import make_chest_phantom, write_ct_series

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-output" / "ohif"


def _show(page: Any, display_set_uid: str) -> None:
    page.evaluate("""(uid) => { const g = window.services.viewportGridService;
        g.setDisplaySetsForViewport({viewportId: g.getState().activeViewportId, displaySetInstanceUIDs: [uid]}); }""",
                  display_set_uid)


def _dismiss(page: Any) -> None:
    """OHIF's first-visit tour and its investigational-use banner cover the viewport: close them as a user would."""
    for _ in range(10):
        closed = page.evaluate("""() => { let n = 0;
            for (const b of document.querySelectorAll('button, a')) {
              if (['Skip all', 'Confirm and hide'].includes(b.textContent.trim())) { b.click(); n++; } }
            const cancel = document.querySelector('.shepherd-cancel-icon'); if (cancel) { cancel.click(); n++; }
            return n; }""")
        if not closed and not page.query_selector(".shepherd-modal-is-visible"):
            return
        time.sleep(0.5)


def _drawn_ellipses(page: Any) -> list[dict[str, float]]:
    """The SR ellipses cornerstone drew in the viewport's SVG layer (centre and radii in canvas pixels)."""
    return json.loads(page.evaluate("""() => JSON.stringify(Array.from(document.querySelectorAll(
        '[data-cy="viewport-pane"] svg ellipse')).map(e => ({cx: +e.getAttribute('cx'), cy: +e.getAttribute('cy'),
        rx: +e.getAttribute('rx'), ry: +e.getAttribute('ry')})).filter(e => e.rx > 3 && e.ry > 3))"""))


def _no_error_shown(page: Any) -> None:
    text = page.evaluate("() => document.body.innerText")
    if "Something went wrong" in text:
        details = page.get_by_text("Show Details")
        if details.count():
            details.first.click(timeout=5000)
            time.sleep(0.5)
        shown = page.evaluate("() => document.body.innerText")
        raise AssertionError("OHIF shows an error: " + shown[:3000] + "\n".join(page.errors[-10:]))
    fatal = [e for e in page.errors if "TypeError" in e or "Unsupported GraphicType" in e]
    assert not fatal, fatal


def _send_through_node(tmp: Path, node_factory: Any, files: list[Path], models: dict[str, Any] | None = None,
                       outputs: tuple[str, ...] = ("seg", "sr", "pdf"),
                       more_destinations: dict[str, Any] | None = None) -> tuple[Any, str]:
    """Orthanc with DICOMweb routing to a node that sends its results back; the study stored in Orthanc."""
    pacs_port = free_port()
    config = node_config(tmp, destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port},
                                            **(more_destinations or {})})
    if models is not None:
        config["models"] = models
        config["rules"][0]["run"] = list(models)
    config["rules"][0]["outputs"] = list(outputs)
    node = node_factory(config)
    orthanc = start_orthanc(tmp / "pacs", node.port, dicom_port=pacs_port, extra=ORTHANC_DICOMWEB)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    sent = storescu(orthanc.dicom_port, files, aec="ORTHANC")
    assert sent.returncode == 0, sent.stderr
    return orthanc, study


def _wait_for_modalities(orthanc: Any, study: str, wanted: set[str]) -> dict[str, str]:
    def arrived() -> dict[str, str] | None:
        found = {s["MainDicomTags"].get("Modality"): s["ID"] for s in orthanc.series_of_study(study)}
        return found if wanted <= set(found) else None

    return wait_until(arrived, 300, f"{sorted(wanted)} in Orthanc")


def _open_viewer(page: Any, server: ViewerServer, study: str, count: int) -> dict[str, dict[str, Any]]:
    page.goto(f"{server.origin}/viewer?StudyInstanceUIDs={study}")
    wait_for_services(page)
    page.wait_for_function(f"() => window.services.displaySetService.getActiveDisplaySets().length >= {count}",
                           timeout=120_000)
    _dismiss(page)
    return {d["Modality"]: d for d in display_sets(page)}


@pytest.fixture()
def chest(tmp_path: Path, node_factory: Any) -> Iterator[dict[str, Any]]:
    require_viewer()
    spacing = (2.5, 2.0, 2.0)
    hu, truth = make_chest_phantom(shape=(40, 128, 128), spacing=spacing)
    files = write_ct_series(hu, spacing, tmp_path / "ct")
    orthanc, study = _send_through_node(tmp_path, node_factory, files)
    series = _wait_for_modalities(orthanc, study, {"CT", "SEG", "SR", "DOC"})
    yield {"orthanc": orthanc, "study": study, "series": series, "files": files, "truth": truth, "spacing": spacing}
    orthanc.stop()


def _download(orthanc: Any, series_id: str) -> pydicom.Dataset:
    instance = orthanc.get(f"/series/{series_id}/instances")[0]
    return pydicom.dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{instance['ID']}/file")))


def test_lungs_seg_sr_and_pdf_open_in_ohif(chest: dict[str, Any]) -> None:
    _, chromium = require_viewer()
    SHOTS.mkdir(parents=True, exist_ok=True)
    orthanc = chest["orthanc"]
    seg_ds, sr_ds = _download(orthanc, chest["series"]["SEG"]), _download(orthanc, chest["series"]["SR"])
    server = ViewerServer(require_viewer()[0], orthanc.http_port)
    try:
        with browser(chromium) as page:
            sets = _open_viewer(page, server, chest["study"], 4)
            assert {"CT", "SEG", "SR", "DOC"} <= set(sets), sets

            # The SR opens on its first finding: every finding loaded (drawn on an image), with its values.
            _show(page, sets["SR"]["uid"])
            page.wait_for_function("""(uid) => { const d = window.services.displaySetService.getDisplaySetByUID(uid);
                return d && d.isLoaded && d.measurements && d.measurements.every(m => m.loaded); }""",
                                   arg=sets["SR"]["uid"], timeout=60_000)
            time.sleep(2)
            measurements = json.loads(page.evaluate("""(uid) => JSON.stringify(window.services.displaySetService
                .getDisplaySetByUID(uid).measurements.map(m => ({id: m.TrackingIdentifier, labels: m.labels,
                sop: m.ReferencedSOPInstanceUID})))""", sets["SR"]["uid"]))
            report = hd.sr.Comprehensive3DSR.from_dataset(sr_ds)
            volumes = {g.tracking_identifier: next(m.value for m in g.get_measurements() if m.name.meaning == "Volume")
                       for g in report.content.get_volumetric_roi_measurement_groups()}
            assert sorted(m["id"] for m in measurements) == sorted(volumes) == ["Left lung", "Right lung"]
            for m in measurements:
                shown = next(label["value"] for label in m["labels"] if label["label"] == "Volume")
                assert shown == f"{float(volumes[m['id']]):.2f} ml", m
                assert m["sop"] in {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                                    for f in chest["files"]}
            ellipses = _drawn_ellipses(page)
            assert len(ellipses) == 2, ellipses  # both lungs' largest cross-sections lie on the slice shown
            _no_error_shown(page)
            page.screenshot(path=str(SHOTS / "lungs-sr.png"))

            # The SEG: OHIF's label map on every slice is the SEG's, voxel for voxel.
            _show(page, sets["SEG"]["uid"])
            page.wait_for_function("() => window.services.segmentationService.getSegmentations().length > 0",
                                   timeout=60_000)
            time.sleep(2)
            loaded = json.loads(page.evaluate("""() => { const s = window.services.segmentationService
                .getSegmentations()[0]; const C = window.cornerstone;
                return JSON.stringify({segments: Object.entries(s.segments).map(([k, v]) => [+k, v.label]),
                  slices: s.representationData.Labelmap.imageIds.map(id => { const im = C.cache.getImage(id);
                    const p = C.metaData.get('imagePlaneModule', im.referencedImageId || id);
                    return {z: p.imagePositionPatient[2], rows: im.rows, columns: im.columns,
                            pixels: Array.from(im.voxelManager ? im.voxelManager.getScalarData() : im.getPixelData())};
                  })}); }"""))
            seg = hd.seg.Segmentation.from_dataset(seg_ds)
            numbers = {seg.get_segment_description(n).segment_label: n for n in seg.segment_numbers}
            assert sorted(label for _, label in loaded["segments"]) == sorted(numbers)
            by_label = dict((label, number) for number, label in loaded["segments"])
            headers = {round(float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]), 3):
                       str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in chest["files"]}
            voxel_ml = float(np.prod(chest["spacing"])) / 1000
            totals = dict.fromkeys(numbers, 0)
            for plane in loaded["slices"]:
                shown = np.asarray(plane["pixels"]).reshape(plane["rows"], plane["columns"])
                uid = headers[round(float(plane["z"]), 3)]
                for label, number in numbers.items():
                    mask = seg.get_pixels_by_source_instance([uid], segment_numbers=[number],
                                                             assert_missing_frames_are_empty=True)[0, ..., 0]
                    np.testing.assert_array_equal(shown == by_label[label], mask > 0, err_msg=f"{label} at {plane['z']}")
                    totals[label] += int(np.count_nonzero(shown == by_label[label]))
            assert totals["Right lung"] * voxel_ml == pytest.approx(chest["truth"]["right_ml"], rel=0.03)
            assert totals["Left lung"] * voxel_ml == pytest.approx(chest["truth"]["left_ml"], rel=0.03)
            _no_error_shown(page)
            page.screenshot(path=str(SHOTS / "lungs-seg.png"))

            # The encapsulated PDF opens in OHIF's PDF viewport, and what it loads is the node's PDF.
            _show(page, sets["DOC"]["uid"])
            page.wait_for_selector("object[type='application/pdf'], embed[type='application/pdf'], iframe",
                                   timeout=60_000)
            source = page.evaluate("""() => { const e = document.querySelector(
                "object[type='application/pdf'], embed[type='application/pdf'], iframe");
                return e.getAttribute('data') || e.getAttribute('src'); }""")
            head = page.evaluate("""async (url) => { const r = await fetch(url); const b = new Uint8Array(
                await r.arrayBuffer()); return String.fromCharCode(...b.slice(0, 5)); }""", source)
            assert head == "%PDF-", (source, page.evaluate("async (url) => (await fetch(url)).text()", source)[:500])
            time.sleep(2)
            _no_error_shown(page)
            page.screenshot(path=str(SHOTS / "lungs-pdf.png"))
    finally:
        server.close()


NODULES_PY = '''
import numpy as np
from scipy import ndimage


def find(array, geometry):
    """Boxes around bright blobs, in patient coordinates (LPS mm), from the geometry the node gives."""
    labels, count = ndimage.label(array > -300)
    spacing, origin = np.asarray(geometry["spacing"]), np.asarray(geometry["origin"])
    axes = np.asarray(geometry["direction"]) * spacing[:, None]  # rows: one step along z, y, x in mm
    boxes = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        idx = np.argwhere(labels[box] == index) + [s.start for s in box]
        centre = origin + idx.mean(axis=0) @ axes
        extent = (idx.max(axis=0) - idx.min(axis=0) + 1) * spacing  # z, y, x
        boxes.append({"center": centre.tolist(), "size": [extent[2], extent[1], extent[0]],
                      "score": round(0.95 - 0.1 * len(boxes), 2), "class": "Lung nodule"})
    return boxes


def triage(array, geometry):
    return {"Nodule present": 0.83}
'''


def _files(folder: Path) -> list[Path]:
    return [f for f in folder.iterdir() if f.is_file()]


def _complete_reports(folder: Path) -> list[pydicom.Dataset]:
    """The SR documents storescp has finished writing: it writes each file while the C-STORE arrives, so a file that
    exists may still be only its meta header."""
    reports = []
    for f in _files(folder):
        try:
            ds = pydicom.dcmread(f)
            for _ in ds.iterall():  # parses every nested item: a truncated sequence raises here
                pass
        except Exception:  # a file still being written
            continue
        if "ContentSequence" in ds:
            reports.append(ds)
    return reports


def test_detections_and_a_classification_in_ohif(tmp_path: Path, node_factory: Any) -> None:
    """Three synthetic nodules found by a detection model: each drawn on its slice, within 2 mm of the truth, and
    its box a segment of the boxes' SEG; a classification's report opens without error and its probability is
    read; a second destination with ``sr_form: measurements`` gets the other form of both reports."""
    _, chromium = require_viewer()
    SHOTS.mkdir(parents=True, exist_ok=True)
    code = tmp_path / "code"
    code.mkdir()
    (code / "nodule_models.py").write_text(NODULES_PY)
    spacing = (2.0, 1.0, 1.0)
    shape = (30, 96, 96)
    z, y, x = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    hu = np.full(shape, -850, np.int16)
    nodules = [((8, 30, 30), 5.0), ((15, 60, 40), 6.0), ((22, 40, 70), 4.0)]  # (z, y, x) voxel centre, radius mm
    for (cz, cy, cx), radius in nodules:
        inside = ((z - cz) * spacing[0]) ** 2 + ((y - cy) * spacing[1]) ** 2 + ((x - cx) * spacing[2]) ** 2 <= radius ** 2
        hu[inside] = 40
    files = write_ct_series(hu, spacing, tmp_path / "ct")
    headers = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in files), key=lambda d: int(d.InstanceNumber))
    first = headers[0]
    row_dir, col_dir = np.asarray(first.ImageOrientationPatient[:3], float), np.asarray(first.ImageOrientationPatient[3:], float)
    truth = [np.asarray(headers[cz].ImagePositionPatient, float) + cx * spacing[2] * row_dir + cy * spacing[1] * col_dir
             for (cz, cy, cx), _ in nodules]
    models = {
        "nodules": {"type": "python", "callable": "nodule_models:find", "path": str(code), "task": "detection",
                    "classes": ["Lung nodule"], "threshold": 0.5, "max_detections": 10, "box_seg": True},
        "triage": {"type": "python", "callable": "nodule_models:triage", "path": str(code), "task": "classification",
                   "classes": ["Nodule present"]},
    }
    # A second destination reads numbers from measurement groups (sr_form: measurements): DCMTK's storescp.
    registry_port, received = free_port(), tmp_path / "registry"
    received.mkdir()
    registry = subprocess.Popen(["storescp", "-aet", "REGISTRY", "-od", str(received), "-uf", str(registry_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        orthanc, study = _send_through_node(tmp_path, node_factory, files, models=models, outputs=("seg", "sr"),
                                            more_destinations={"registry": {
                                                "ae_title": "REGISTRY", "host": "127.0.0.1", "port": registry_port,
                                                "sr_form": "measurements", "outputs": ["sr"]}})
        try:
            wait_until(lambda: len([s for s in orthanc.series_of_study(study)
                                    if s["MainDicomTags"].get("Modality") in ("SR", "SEG")]) == 3, 300,
                       "both reports and the boxes' SEG in Orthanc")
            wait_until(lambda: len(_complete_reports(received)) == 2, 60, "both reports at the registry, whole")
        except BaseException:
            orthanc.stop()
            raise
    finally:
        registry.terminate()
        registry.wait(10)
    server = ViewerServer(require_viewer()[0], orthanc.http_port)
    try:
        # The registry's reports are the measurements form: the class's probability is a number in its group.
        forms = {str(ds.SOPInstanceUID): ds for ds in _complete_reports(received)}
        measured = [hd.sr.Comprehensive3DSR.from_dataset(ds) for ds in forms.values()]
        groups = [g for r in measured for g in r.content.get_image_measurement_groups()]
        (verdict,) = [g for g in groups if str(g.tracking_identifier) == "Nodule present"]
        assert verdict.get_measurements()[0].value == pytest.approx(0.83)
        assert sum(len(r.content.get_planar_roi_measurement_groups()) for r in measured) == 6  # 3 boxes, 2 forms
        in_pacs = {str(s["MainDicomTags"].get("SeriesInstanceUID")) for s in orthanc.series_of_study(study)}
        assert not {str(ds.SeriesInstanceUID) for ds in forms.values()} & in_pacs  # each destination: one form
        with browser(chromium) as page:
            page.goto(f"{server.origin}/viewer?StudyInstanceUIDs={study}")
            wait_for_services(page)
            page.wait_for_function("() => window.services.displaySetService.getActiveDisplaySets()"
                                   ".filter(d => d.Modality === 'SR').length === 2", timeout=120_000)
            _dismiss(page)
            reports = [d for d in display_sets(page) if d["Modality"] == "SR"]
            parsed: dict[str, list[dict[str, Any]]] = {}
            for report in reports:  # parsed as OHIF parses a report (its SOP class handler), without a viewport
                page.evaluate("""async (uid) => { const d = window.services.displaySetService.getDisplaySetByUID(uid);
                    if (!d.isLoaded) { await d.load(); } }""", report["uid"])
                page.wait_for_function("""(uid) => { const d = window.services.displaySetService.getDisplaySetByUID(uid);
                    return d && d.isLoaded && d.measurements; }""", arg=report["uid"], timeout=60_000)
                time.sleep(2)
                parsed[report["uid"]] = json.loads(page.evaluate("""(uid) => JSON.stringify(window.services
                    .displaySetService.getDisplaySetByUID(uid).measurements.map(m => ({id: m.TrackingIdentifier,
                    uid: m.TrackingUniqueIdentifier, loaded: m.loaded, labels: m.labels,
                    sop: m.ReferencedSOPInstanceUID || null})))""", report["uid"]))
                _no_error_shown(page)
            detection_uid = next(uid for uid, ms in parsed.items() if any(m["id"].startswith("Lung nodule") for m in ms))
            assert all(m["loaded"] for m in parsed[detection_uid])
            classification_uid = next(uid for uid in parsed if uid != detection_uid)

            # The classification's report loads without error (its verdict is a qualitative evaluation of the
            # report, with no place for the viewer to draw) and says the verdict.
            assert parsed[classification_uid] == []
            series = {d["uid"]: d["SeriesInstanceUID"] for d in reports}
            orthanc_id = next(s["ID"] for s in orthanc.series_of_study(study)
                              if s["MainDicomTags"].get("SeriesInstanceUID") == series[classification_uid])
            assert report_findings(_download(orthanc, orthanc_id)) == ["Nodule present: positive, probability 0.830"]
            # And OHIF lists the verdict (and the count of boxes) with the reports, in its series list.
            listed = page.evaluate("() => document.body.innerText")
            assert "Nodule present 0.83 - AI Report" in listed and "3 Lung nodule - AI Report" in listed, listed[:2000]
            page.screenshot(path=str(SHOTS / "classification.png"))

            # Each nodule: loaded on the source image of its centre (within one slice) and drawn there.
            _show(page, detection_uid)
            page.wait_for_function("""(uid) => window.services.displaySetService.getDisplaySetByUID(uid)
                .measurements.every(m => m.loaded)""", arg=detection_uid, timeout=60_000)
            found = parsed[detection_uid]
            assert sorted(m["id"] for m in found) == ["Lung nodule 1", "Lung nodule 2", "Lung nodule 3"]
            by_sop = {str(h.SOPInstanceUID): float(h.ImagePositionPatient[2]) for h in headers}
            placed = json.loads(page.evaluate("""() => JSON.stringify(window.cornerstoneTools.annotation.state
                .getAllAnnotations().filter(a => a.metadata.toolName === 'DICOMSRDisplay')
                .map(a => ({uid: a.annotationUID, points: a.data.handles.points})))"""))
            centres = {a["uid"]: np.mean(np.asarray(a["points"], float), axis=0) for a in placed}
            for m in found:
                centre = centres[m["uid"]]
                nearest = min(truth, key=lambda t: float(np.linalg.norm(t - centre)))
                assert float(np.linalg.norm(nearest - centre)) <= 2.0, (m, centre, nearest)
                assert abs(by_sop[m["sop"]] - nearest[2]) <= spacing[0], (m, nearest)
                assert any(label["label"] == "Probability" for label in m["labels"]), m
            for step, m in enumerate(found):  # the viewport's arrows go from finding to finding, in report order
                if step:
                    page.locator('[data-cy="viewport-action-arrows-right"]').first.click(timeout=10_000)
                # Shown: the image the finding references, with its ellipse drawn around its centre.
                page.wait_for_function("""([sop, centre]) => { const g = window.services.viewportGridService;
                    const v = window.services.cornerstoneViewportService.getCornerstoneViewport(
                        g.getState().activeViewportId);
                    if (!v) { return false; }  // OHIF replaces the viewport while it changes what it shows
                    const id = v.getCurrentImageId(); if (!id || !id.includes(sop)) { return false; }
                    const [x, y] = v.worldToCanvas(centre);
                    return Array.from(document.querySelectorAll('[data-cy="viewport-pane"] svg ellipse')).some(e =>
                        +e.getAttribute('rx') > 3 && Math.hypot(+e.getAttribute('cx') - x, +e.getAttribute('cy') - y) < 6);
                    }""", arg=[m["sop"], centres[m["uid"]].tolist()], timeout=30_000)
                page.screenshot(path=str(SHOTS / f"detection-{step + 1}.png"))
            _no_error_shown(page)

            # The boxes' SEG (box_seg): one segment per box, named as the report's findings.
            _show(page, next(d["uid"] for d in display_sets(page) if d["Modality"] == "SEG"))
            page.wait_for_function("() => window.services.segmentationService.getSegmentations().length > 0",
                                   timeout=60_000)
            segments = json.loads(page.evaluate("""() => JSON.stringify(Object.values(window.services
                .segmentationService.getSegmentations()[0].segments).filter(Boolean).map(s => s.label))"""))
            assert sorted(segments) == ["Lung nodule 1", "Lung nodule 2", "Lung nodule 3"], segments
            time.sleep(2)
            _no_error_shown(page)
            page.screenshot(path=str(SHOTS / "detection-seg.png"))
    finally:
        server.close()
        orthanc.stop()

