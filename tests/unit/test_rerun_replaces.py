"""A re-run that finds less than the run before replaces the earlier results instead of leaving them.

Results have deterministic UIDs, so a re-run (late arrivals, ``jobs retry``)
overwrites them in the PACS.  What the re-run no longer produces would stay
there, still showing the earlier findings: the SEG when no segment is found
any more, the overlay image of a slice that has no finding any more.  With
the earlier UIDs given (``InferTask.replaces``), those are replaced by empty
ones of the same UID.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.results.sr import NO_SEGMENT_FINDING
from dicom_node.scheduler.pipeline import InferOutcome, InferTask, run_infer
from inference.registry import ModelRegistry
from tests.spooled import python_model_case
from tests.unit.test_results import _assert_dciodvfy_clean

#: Finds the bright box on every slice ("all"), on its first slice only ("first") or nowhere ("none"),
#: as told by the file ``mode`` next to it.
MODEL_PY = '''
from pathlib import Path
import numpy as np

def bright(array, geometry):
    mode = (Path(__file__).parent / "mode").read_text().strip()
    mask = (array > 500).astype(np.uint8)
    if mode == "first":
        mask[np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[1:]] = 0
    elif mode == "none":
        mask[:] = 0
    return mask
'''


@pytest.fixture()
def case(tmp_path: Path) -> dict[str, Any]:
    hu = np.full((6, 32, 32), 40, np.int16)
    hu[1:4, 8:20, 8:20] = 900  # the finding: slices 1, 2 and 3
    return python_model_case(tmp_path, MODEL_PY, hu)


def _run(case: dict[str, Any], mode: str, replaces: tuple[str, ...] = ()) -> InferOutcome:
    (case["code"] / "mode").write_text(mode)
    task = InferTask(1, case["series"], "bright", case["paths"], ("seg", "sr", "sc"), replaces=replaces)
    outcome = run_infer(task, ModelRegistry(case["settings"].models), case["spool"], case["settings"].outputs)
    assert outcome.ok, outcome.error
    return outcome


def _read(case: dict[str, Any], path: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(case["spool"].absolute(path).read_bytes()))


def _uids(outcome: InferOutcome, kind: str) -> list[str]:
    return [o.sop_uid for o in outcome.objects if o.kind == kind]


def test_overlays_of_slices_without_findings_any_more_are_replaced(case: dict[str, Any]) -> None:
    first = _run(case, "all")
    earlier = tuple(o.sop_uid for o in first.objects)
    assert len(_uids(first, "sc")) == 3
    again = _run(case, "first", replaces=earlier)
    assert _uids(again, "sc") == _uids(first, "sc")  # every earlier overlay is sent again, same UIDs
    images = [_read(case, o.path) for o in again.objects if o.kind == "sc"]
    rows = 32
    kept, *cleared = images
    assert (kept.pixel_array[:rows, :, 0] != kept.pixel_array[:rows, :, 1]).any()  # red contour still there
    for image in cleared:
        picture = image.pixel_array[:rows]
        assert (picture[..., 0] == picture[..., 1]).all() and (picture[..., 1] == picture[..., 2]).all()
    # Without the earlier UIDs only the slice with a finding gets an image.
    assert len(_uids(_run(case, "first"), "sc")) == 1


def test_a_seg_without_segments_any_more_is_replaced_by_an_empty_one(case: dict[str, Any], tmp_path: Path) -> None:
    first = _run(case, "all")
    earlier = tuple(o.sop_uid for o in first.objects)
    gone = _run(case, "none", replaces=earlier)
    assert _uids(gone, "seg") == _uids(first, "seg")
    path = next(o.path for o in gone.objects if o.kind == "seg")
    seg = hd.seg.segread(io.BytesIO(case["spool"].absolute(path).read_bytes()))
    assert [int(d.SegmentNumber) for d in seg.SegmentSequence] == [1]
    assert not seg.pixel_array.any() and "no segment found" in seg.ContentDescription
    _assert_dciodvfy_clean(seg, tmp_path / "empty-seg.dcm", "Segmentation")
    assert len(_uids(gone, "sc")) == 3  # the three overlays are cleared too
    sr = _read(case, next(o.path for o in gone.objects if o.kind == "sr"))
    texts, referenced = [], []

    def walk(items: Any) -> None:
        for item in items:
            texts.append(str(item.get("TextValue", "")))
            referenced.extend(str(r.ReferencedSOPInstanceUID) for r in item.get("ReferencedSOPSequence", []))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert NO_SEGMENT_FINDING in texts and _uids(first, "seg")[0] not in referenced  # the SR says why
    # A first run that finds nothing makes no SEG and no overlay, as before.
    nothing = _run(case, "none")
    assert not _uids(nothing, "seg") and not _uids(nothing, "sc")


def test_a_python_model_module_is_never_taken_from_another_models_folder(tmp_path: Path) -> None:
    from inference.models.python_callable import load_callable

    for folder, answer in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "same_name_model.py").write_text(f"def predict(array, geometry):\n    return {answer}\n")
    assert load_callable("same_name_model:predict", str(tmp_path / "a"))(None, None) == 1
    with pytest.raises(ImportError, match="already loaded from .*need different module names"):
        load_callable("same_name_model:predict", str(tmp_path / "b"))
    # A changed source (a new model fingerprint) is imported again, not served from the old module.
    source = tmp_path / "a" / "same_name_model.py"
    source.write_text("def predict(array, geometry):\n    return 3  # retrained\n")
    assert load_callable("same_name_model:predict", str(tmp_path / "a"))(None, None) == 3
