"""``box_seg``: a detection model's boxes also as a SEG, one segment per box, tied to its SR finding.

A python detector finds the bright cubes of a synthetic CT; the job writes a
SEG whose segments hold exactly the voxels inside each reported box (best
score first), coded from the class (SNOMED CT Nodule in the lung), sharing
each segment's tracking UID with the SR's finding of that box; a re-run that
finds no box any more replaces the SEG with an empty one of the same UID.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.scheduler.pipeline import InferOutcome, InferTask, run_infer
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from inference.registry import ModelRegistry
from tests.phantoms import write_ct_series
from tests.unit.test_results import _assert_dciodvfy_clean

#: Boxes around the bright cubes (scores 0.9, 0.6), or none, as the file ``mode`` next to it says.
MODEL_PY = '''
from pathlib import Path
import numpy as np

def find(array, geometry):
    if (Path(__file__).parent / "mode").read_text().strip() == "none":
        return []
    steps = np.asarray(geometry["direction"]) * np.asarray(geometry["spacing"])[:, None]
    origin = np.asarray(geometry["origin"])
    boxes = []
    for (lo, hi), score in ((((2, 4, 4), (5, 11, 11)), 0.6), (((6, 16, 18), (9, 25, 27)), 0.9)):
        a, b = origin + np.asarray(lo) @ steps, origin + np.asarray(hi) @ steps
        boxes.append({"center": ((a + b) / 2).tolist(), "size": (np.abs(b - a) + 0.5).tolist(), "score": score,
                      "class": "Lung nodule"})
    return boxes
'''


@pytest.fixture()
def case(tmp_path: Path) -> dict[str, Any]:
    code = tmp_path / "code"
    code.mkdir()
    (code / "box_model.py").write_text(MODEL_PY)
    hu = np.full((12, 32, 32), -800, np.int16)
    hu[2:6, 4:12, 4:12] = 60
    hu[6:10, 16:26, 18:28] = 60
    spool = Spool(tmp_path / "state")
    files = write_ct_series(hu, (2.0, 1.0, 1.0), spool.incoming / "study" / "series")
    settings = Settings.model_validate({
        "storage": {"path": str(tmp_path / "state")},
        "models": {"boxes": {"type": "python", "callable": "box_model:find", "path": str(code), "task": "detection",
                             "classes": ["Lung nodule"], "box_seg": True}},
        "rules": [{"name": "all", "when": {"Modality": "CT"}, "run": ["boxes"]}],
    })
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    return {"spool": spool, "settings": settings, "code": code, "series": series_uid, "hu": hu,
            "paths": tuple(spool.relative(f) for f in files)}


def _run(case: dict[str, Any], mode: str, outputs: tuple[str, ...] = ("seg", "sr"),
         replaces: tuple[str, ...] = ()) -> InferOutcome:
    (case["code"] / "mode").write_text(mode)
    task = InferTask(1, case["series"], "boxes", case["paths"], outputs, replaces=replaces)
    outcome = run_infer(task, ModelRegistry(case["settings"].models), case["spool"], case["settings"].outputs)
    assert outcome.ok, outcome.error
    return outcome


def _read(case: dict[str, Any], outcome: InferOutcome, kind: str) -> pydicom.Dataset:
    path = next(o.path for o in outcome.objects if o.kind == kind)
    return pydicom.dcmread(io.BytesIO(case["spool"].absolute(path).read_bytes()))


def test_box_seg_segments_are_the_boxes_and_share_the_sr_tracking(case: dict[str, Any], tmp_path: Path) -> None:
    outcome = _run(case, "boxes")
    seg_ds = _read(case, outcome, "seg")
    _assert_dciodvfy_clean(seg_ds, tmp_path / "boxes-seg.dcm", "Segmentation")
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    described = {int(d.SegmentNumber): d for d in seg.SegmentSequence}
    assert [d.SegmentLabel for d in described.values()] == ["Lung nodule 1", "Lung nodule 2"]
    assert {d.SegmentedPropertyTypeCodeSequence[0].CodeValue for d in described.values()} == {"27925004"}
    assert {d.AnatomicRegionSequence[0].CodeMeaning for d in described.values()} == {"Lung"}
    # Segment 1 is the best box (score 0.9): the second cube, exactly (the boxes are the cubes' voxel extents).
    instances = sorted(case["paths"], key=lambda p: int(pydicom.dcmread(case["spool"].absolute(p),
                                                                        stop_before_pixels=True).InstanceNumber))
    uids = [str(pydicom.dcmread(case["spool"].absolute(p), stop_before_pixels=True).SOPInstanceUID)
            for p in instances]
    for number, cube in ((1, case["hu"][6:10] > 0), (2, case["hu"][2:6] > 0)):
        first = 6 if number == 1 else 2
        frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids[first:first + 4],
                                                   segment_numbers=[number], assert_missing_frames_are_empty=True)[..., 0]
        np.testing.assert_array_equal(frames.astype(bool), cube)
    sr_ds = _read(case, outcome, "sr")
    _assert_dciodvfy_clean(sr_ds, tmp_path / "boxes-sr.dcm", "Comprehensive3DSR")
    report = hd.sr.Comprehensive3DSR.from_dataset(sr_ds)
    groups = report.content.get_planar_roi_measurement_groups()
    tracked = {str(g.tracking_uid) for g in groups}
    assert tracked == {str(d.TrackingUID) for d in described.values()}
    assert {str(g.tracking_identifier) for g in groups} == {"Lung nodule 1", "Lung nodule 2"}
    assert report.content.get_volumetric_roi_measurement_groups() == []  # the boxes are not listed twice


def test_no_box_seg_without_seg_in_the_outputs_and_an_empty_one_replaces_it(case: dict[str, Any]) -> None:
    assert [o.kind for o in _run(case, "boxes", outputs=("sr",)).objects] == ["sr"]
    first = _run(case, "boxes")
    earlier = tuple(o.sop_uid for o in first.objects)
    gone = _run(case, "none", replaces=earlier)
    seg = _read(case, gone, "seg")
    assert seg.SOPInstanceUID == _read(case, first, "seg").SOPInstanceUID
    assert "no segment found" in seg.ContentDescription and not hd.seg.Segmentation.from_dataset(seg).pixel_array.any()
    # A first run that finds nothing makes no SEG.
    assert [o.kind for o in _run(case, "none").objects] == ["sr"]
