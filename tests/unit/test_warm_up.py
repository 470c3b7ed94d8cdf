"""The worker's warm-up: the job's load, header check and SEG + SR encoders run once on a synthetic CT."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node.scheduler import pipeline
from dicom_node.settings import Settings
from dicom_node.spool import Spool


def test_warm_up_encodes_a_seg_and_an_sr_and_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    made: list[Any] = []
    encode = pipeline._encode

    def keep(task: Any, prediction: Any, sources: Any, spool: Any, outputs: Any, changes: Any) -> Any:
        objects = encode(task, prediction, sources, spool, outputs, changes)
        made.extend((obj.kind, pydicom.dcmread(spool.absolute(obj.path))) for obj in objects)
        return objects

    monkeypatch.setattr(pipeline, "_encode", keep)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "nowhere"))  # not used when a scratch is given
    spool = Spool(tmp_path / "spool")
    seconds = pipeline.warm_up(Settings().outputs, spool.tmp)

    assert seconds > 0
    kinds = {kind: ds for kind, ds in made}
    assert set(kinds) == {"seg", "sr"}
    seg = kinds["seg"]
    assert seg.Modality == "SEG" and seg.NumberOfFrames == 3  # segment 1 on one slice, segment 2 on two
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Right lung", "Left lung"]
    assert kinds["sr"].Modality == "SR" and seg.PatientID == "WARMUP"
    assert list(spool.tmp.iterdir()) == []  # the warm-up folder is gone with everything in it
    assert not (tmp_path / "nowhere").exists()


def test_a_worker_stopped_during_its_warm_up_leaves_a_folder_the_next_start_removes(tmp_path: Path) -> None:
    """The worker's warm-up works under the spool's ``tmp/``: the node's start cleans what a kill left there."""
    from dicom_node.scheduler.worker import WorkerProcess

    settings = Settings.model_validate({"storage": {"path": str(tmp_path / "state")},
                                        "workers": {"preload_models": False}})
    spool = Spool(settings.storage.resolved_path())
    left: list[Path] = []
    for _attempt in range(3):  # a warm-up that ends before the kill (a stalled machine) leaves nothing: again
        worker = WorkerProcess(settings)
        worker.start()
        try:
            deadline = time.monotonic() + 60
            while not list(spool.tmp.glob("warm-up-*")) and time.monotonic() < deadline:
                time.sleep(0.005)
            worker.stop(force=True)  # SIGKILL, as the OOM killer or a timed-out stop does
        finally:
            worker.close()
        left = [p for p in spool.tmp.glob("warm-up-*") if p.is_dir()]
        if left:
            break
    assert left, f"no warm-up folder was left under {spool.tmp} by a worker killed during its warm-up"
    assert spool.clean_tmp() >= 1  # what the node's start does before its workers start
    assert list(spool.tmp.glob("warm-up-*")) == []


def test_a_worker_loads_the_rules_models_at_its_first_start_only(tmp_path: Path) -> None:
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


def test_a_worker_goes_on_loading_its_models_while_a_series_is_read_ahead(tmp_path: Path) -> None:
    """Read-ahead hints that come during the preload are taken between loads; only a job stops it."""
    import numpy as np

    from dicom_node.scheduler.worker import WorkerProcess
    from tests.spooled import python_model_case

    loads = tmp_path / "loads"
    model_py = (f"import numpy as np\nopen({str(loads)!r}, 'a').write('loaded\\n')\n\n"
                "def bright(array, geometry):\n    return (array > 500).astype(np.uint8)\n")
    hu = np.full((4, 32, 32), 40, np.int16)
    hu[1:3, 8:20, 8:20] = 900
    case = python_model_case(tmp_path, model_py, hu)
    assert case["settings"].workers.preload_models
    worker = WorkerProcess(case["settings"])
    worker.start()
    try:
        for count in range(1, len(case["paths"]) + 1):  # the series arriving: hints wait in the pipe
            assert worker.prefetch(case["series"], list(case["paths"][:count]))
        deadline = time.monotonic() + 60
        while not loads.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loads.exists(), "the rule's model was not loaded: the read-ahead hints ended the preload"
        held = None
        while held != {case["series"]: len(case["paths"])} and time.monotonic() < deadline:
            held = worker.read_ahead(timeout_s=30)  # the hints were taken: the series is read ahead
            time.sleep(0.05)
        assert held == {case["series"]: len(case["paths"])}
    finally:
        worker.close()
    assert loads.read_text().splitlines() == ["loaded"]
