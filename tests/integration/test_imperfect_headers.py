"""A real series whose header breaks the standard, through the running node: results produced, changes reported.

The CQ500 head CT of pydicom-data, with PatientSex ``0000`` and a StudyDate
that is no calendar date (as the issue's Philips MR series had), sent with
DCMTK ``storescu``: the job succeeds, ``dicom-node status`` lists what was
changed (without the values), and the result carries it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pydicom.config
import pytest

from tests.integration.conftest import REPO, dciodvfy_errors, node_config, storescu, wait_until
from tests.realdata import real_ct_slices, write

pytestmark = pytest.mark.integration


def test_a_series_with_invalid_copied_values_gets_its_results_and_says_what_changed(
        tmp_path: Path, node_factory: Any) -> None:
    slices = real_ct_slices(6, spacing_mm=5.0)
    with pydicom.config.disable_value_validation():
        for ds in slices:
            ds.PatientSex = "0000"
            ds.StudyDate = "20230230"
    files = write(slices, tmp_path / "series")
    node = node_factory(node_config(tmp_path))
    sent = storescu(node.port, files, aec="DICOMNODE")
    assert sent.returncode == 0, sent.stderr

    rows = wait_until(lambda: [s for s in node.status_json() if s["state"] in ("done", "failed")], 240,
                      "the series to be processed")
    assert rows[0]["state"] == "done", rows
    (infer,) = [j for j in rows[0]["jobs"] if j["kind"] == "infer"]
    notes = infer["payload"]["notes"]
    assert "results: PatientSex: not one of F, M, O; emptied" in notes
    assert "results: StudyDate: not a calendar date; emptied" in notes
    assert not any("0000" in note or "20230230" in note for note in notes), "no value (PHI) in the notes"

    text = subprocess.run([str(REPO / ".venv/bin/dicom-node"), "status", "--config", str(node.config_path)],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert "note: results: PatientSex: not one of F, M, O; emptied" in text

    (sr_file,) = [f for f in infer["payload"]["files"] if f.endswith("/sr.dcm")]
    sr_path = node.state / "spool" / sr_file
    sr = pydicom.dcmread(sr_path)
    assert sr.PatientSex in ("", None) and sr.StudyDate in ("", None)
    descriptions = [i.ContributionDescription for i in sr.ContributingEquipmentSequence
                    if i.PurposeOfReferenceCodeSequence[0].CodeValue == "109103"]
    assert len(descriptions) == 1 and "PatientSex: not one of F, M, O; emptied" in descriptions[0]
    assert dciodvfy_errors(sr_path) == []
