"""The worker's warm-up: the job's load, header check and SEG + SR encoders run once on a synthetic CT."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node.scheduler import pipeline
from dicom_node.settings import Settings


def test_warm_up_encodes_a_seg_and_an_sr_and_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    made: list[Any] = []
    encode = pipeline._encode

    def keep(task: Any, prediction: Any, sources: Any, spool: Any, outputs: Any, changes: Any) -> Any:
        objects = encode(task, prediction, sources, spool, outputs, changes)
        made.extend((obj.kind, pydicom.dcmread(spool.absolute(obj.path))) for obj in objects)
        return objects

    monkeypatch.setattr(pipeline, "_encode", keep)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seconds = pipeline.warm_up(Settings().outputs)

    assert seconds > 0
    kinds = {kind: ds for kind, ds in made}
    assert set(kinds) == {"seg", "sr"}
    seg = kinds["seg"]
    assert seg.Modality == "SEG" and seg.NumberOfFrames == 3  # segment 1 on one slice, segment 2 on two
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Right lung", "Left lung"]
    assert kinds["sr"].Modality == "SR" and seg.PatientID == "WARMUP"
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone with everything in it
