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


def test_a_worker_loads_the_rules_models_at_its_first_start_only(tmp_path: Path) -> None:
    import time

    from dicom_node.scheduler.worker import WorkerProcess

    code = tmp_path / "code"
    code.mkdir()
    loads = tmp_path / "loads"
    (code / "counted_model.py").write_text(  # each import (one per load) leaves a line
        f"import numpy as np\nopen({str(loads)!r}, 'a').write('loaded\\n')\n\n"
        "def seg(array, geometry):\n    return (array > 0).astype(np.uint8)\n")
    settings = Settings.model_validate({
        "storage": {"path": str(tmp_path / "state")},
        "models": {"counted": {"type": "python", "callable": "counted_model:seg", "path": str(code),
                               "labels": [{"value": 1, "name": "Bright",
                                           "snomed": {"value": "10200004", "meaning": "Liver"}}]},
                   "unused": {"type": "python", "callable": "counted_model:seg", "path": str(code),
                              "labels": [{"value": 1, "name": "Bright",
                                          "snomed": {"value": "10200004", "meaning": "Liver"}}]}},
        "rules": [{"name": "ct", "when": {"Modality": "CT"}, "run": ["counted"]}],
    })

    def wait_for_lines(n: int) -> list[str]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            lines = loads.read_text().splitlines() if loads.exists() else []
            if len(lines) >= n:
                return lines
            time.sleep(0.2)
        return loads.read_text().splitlines() if loads.exists() else []

    worker = WorkerProcess(settings)
    worker.start()
    try:
        assert wait_for_lines(1) == ["loaded"]  # the rule's model, before any job; not the unused one
        time.sleep(1)
        assert len(wait_for_lines(1)) == 1
        worker.stop(force=True)
        worker.start()  # as after a crash or a timeout: models load on first use again
        time.sleep(4)
        assert len(wait_for_lines(1)) == 1
    finally:
        worker.close()
    off = WorkerProcess(settings.model_copy(update={"workers": settings.workers.model_copy(
        update={"preload_models": False})}))
    off.start()
    try:
        time.sleep(4)
        assert len(wait_for_lines(1)) == 1
    finally:
        off.close()
