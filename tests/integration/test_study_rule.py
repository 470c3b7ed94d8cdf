"""A study rule through the node: two CT phases of one study in, one SEG computed from both out.

``storescu`` sends an arterial and a venous series of one study to a ``dicom-node
serve`` subprocess; a study rule runs a ``python`` model that gets both arrays;
the SEG in the spool is on the arterial (primary) series and its mask is
"venous - arterial > 50 HU" on every source image.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.integration.conftest import NodeProcess, dciodvfy_errors, node_config, storescu, wait_until
from tests.phantoms import write_ct_series

pytestmark = pytest.mark.integration

MODEL_PY = '''
import numpy as np

def enhancing(arrays, geometries):
    """Voxels that enhance by more than 50 HU from the arterial to the venous phase."""
    if list(arrays) != ["arterial", "venous"] or list(geometries) != ["arterial", "venous"]:
        raise ValueError(f"unexpected roles {list(arrays)}")
    return ((arrays["venous"] - arrays["arterial"]) > 50).astype(np.uint8)
'''

SHAPE, SPACING = (8, 24, 24), (2.0, 1.5, 1.5)


def test_study_rule_runs_its_model_on_both_phases(tmp_path: Path,
                                                  node_factory: Callable[..., NodeProcess]) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "node_study_model.py").write_text(MODEL_PY)
    rng = np.random.default_rng(11)
    arterial = rng.integers(-100, 200, SHAPE).astype(np.int16)
    venous = arterial.copy()
    venous[2:6, 4:12, 5:15] += 90
    venous[5:7, 15:20, 15:20] += 20
    expected = ((venous.astype(int) - arterial.astype(int)) > 50).astype(np.uint8)
    study, frame = generate_uid(), generate_uid()
    series: dict[str, tuple[str, list[Path]]] = {}
    for number, (role, hu) in enumerate((("arterial", arterial), ("venous", venous)), start=1):
        uid = generate_uid()
        series[role] = (uid, write_ct_series(hu, SPACING, tmp_path / role, study_uid=study, series_uid=uid,
                                             frame_of_reference_uid=frame, series_number=number,
                                             series_description=f"Abdomen {role} phase"))
    rule: dict[str, Any] = {
        "name": "phases", "when": {"Modality": "CT"}, "run": ["enhancing"], "outputs": ["seg", "sr"],
        "study": {"series": {"arterial": {"SeriesDescription": {"regex": "(?i)arterial"}},
                             "venous": {"SeriesDescription": {"regex": "(?i)venous"}}},
                  "quiet_seconds": 1, "max_wait_seconds": 120}}
    models = {"enhancing": {"type": "python", "callable": "node_study_model:enhancing", "path": str(code),
                            "modality": "CT",
                            "labels": [{"value": 1, "name": "Enhancing", "snomed": {"value": "10200004",
                                                                                    "meaning": "Liver"}}]}}
    node = node_factory(node_config(tmp_path, quiet_seconds=1.0, models=models, rules=[rule]))
    for role in ("arterial", "venous"):
        sent = storescu(node.port, series[role][1], aec="DICOMNODE")
        assert sent.returncode == 0, sent.stderr

    art_uid = series["arterial"][0]
    seg_path = node.state / "spool" / "results" / art_uid / "enhancing" / "seg.dcm"

    def done() -> bool:
        jobs = [j for s in node.status_json() for j in s.get("jobs", [])]
        failed = [j for j in jobs if j.get("state") == "failed"]
        if failed:
            raise AssertionError(f"job failed: {failed}\n{node.log()[-3000:]}")
        return seg_path.exists() and any(j.get("state") == "done" and j.get("kind") == "infer" for j in jobs)

    wait_until(done, 120, "the study rule's SEG")
    seg = hd.seg.segread(io.BytesIO(seg_path.read_bytes()))
    assert seg.StudyInstanceUID == study
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [art_uid]
    sources = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in series["arterial"][1]),
                     key=lambda ds: float(ds.ImagePositionPatient[2]))
    pixels = seg.get_pixels_by_source_instance([str(ds.SOPInstanceUID) for ds in sources], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[..., 0], expected)
    assert dciodvfy_errors(seg_path) == []
    infer = [j for s in node.status_json() for j in s.get("jobs", []) if j.get("kind") == "infer"]
    assert len(infer) == 1, "one job for the study, on the primary series"
    assert not (node.state / "spool" / "results" / series["venous"][0]).exists()
