"""Encoding a job's results in two processes (``workers.parallel_encode``) gives the same objects.

The worker forks a child for the overlay series and the PDF (or, without
them, for building and writing the SR while it writes the SEG).  Checked here: the same
objects in the same order as the serial path, element for element but the
creation times; a failure in the child fails the job with its message; a
failure in the worker's own part kills the child; a child killed by a signal
fails the job with a reason; no child is left behind in any case.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from dicom_node.errors import ResultError
from dicom_node.scheduler import pipeline
from dicom_node.scheduler.forked import Forked
from dicom_node.scheduler.pipeline import InferOutcome, InferTask, run_infer
from dicom_node.spool import Spool
from inference.registry import ModelRegistry
from tests.spooled import BRIGHT_LABEL, python_model_case

MODEL_PY = '''
import numpy as np

def bright(array, geometry):
    mask = (array > 500).astype(np.uint8)
    mask[array > 1500] = 2
    return mask
'''

#: Attributes that differ between two runs by design: the moment an object was made, and the UID
#: highdicom makes up for a SEG's dimension organisation at each build.
_TIMES = {"ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime", "SeriesDate",
          "SeriesTime", "DateTime", "AcquisitionDateTime", "ContributionDateTime", "DimensionOrganizationUID",
          "DateOfSecondaryCapture", "TimeOfSecondaryCapture"}


@pytest.fixture()
def case(tmp_path: Path) -> dict[str, Any]:
    hu = np.full((8, 48, 48), 40, np.int16)
    hu[1:6, 8:30, 8:30] = 900
    hu[2:4, 30:40, 30:40] = 2000
    return python_model_case(tmp_path, MODEL_PY, hu, labels=[
        BRIGHT_LABEL, {"value": 2, "name": "Brighter", "color": [0, 0, 255],
                       "snomed": {"value": "64033007", "meaning": "Kidney"}}])


def _run(case: dict[str, Any], outputs: tuple[str, ...], parallel: bool) -> InferOutcome:
    task = InferTask(1, case["series"], "bright", case["paths"], outputs)
    return run_infer(task, ModelRegistry(case["settings"].models), case["spool"], case["settings"].outputs,
                     parallel_encode=parallel)


def _comparable(ds: pydicom.Dataset) -> dict[str, Any]:
    """Every element but the creation times, nested sequences included, as plain values."""
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.keyword in _TIMES:
            continue
        if elem.VR == "SQ":
            out[elem.keyword or str(elem.tag)] = [_comparable(item) for item in elem.value]
        elif elem.keyword == "EncapsulatedDocument":  # the PDF says when it was made, to the second
            out[elem.keyword] = re.sub(rb"/(CreationDate|ModDate) ?\(D:[^)]*\)", b"", elem.value)
        else:
            out[elem.keyword or str(elem.tag)] = elem.value
    return out


def _objects(case: dict[str, Any], outcome: InferOutcome) -> list[tuple[str, str, dict[str, Any]]]:
    assert outcome.ok, outcome.error
    return [(o.kind, o.sop_uid, _comparable(pydicom.dcmread(case["spool"].absolute(o.path))))
            for o in outcome.objects]


_FORKED: list[int] = []


@pytest.fixture(autouse=True)
def _track_children(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record the pid of every child :class:`Forked` starts."""
    _FORKED.clear()
    original = Forked.__init__

    def init(self: Forked[Any], *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _FORKED.append(self.pid)

    monkeypatch.setattr(Forked, "__init__", init)


def _no_child_left() -> None:
    assert _FORKED, "no child was forked"
    for pid in _FORKED:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped already: no zombie, nothing running


@pytest.mark.parametrize("outputs", [("seg", "sr"), ("seg", "sr_measurements"), ("seg", "sr", "sc", "pdf"),
                                     ("sr", "pdf"), ("seg",)])
def test_two_processes_make_the_same_objects_as_one(case: dict[str, Any], outputs: tuple[str, ...]) -> None:
    serial = _objects(case, _run(case, outputs, parallel=False))
    parallel = _objects(case, _run(case, outputs, parallel=True))
    assert [(kind, uid) for kind, uid, _ in parallel] == [(kind, uid) for kind, uid, _ in serial]
    assert {kind for kind, _, _ in serial} == set(outputs)
    for (kind, _, one), (_, _, two) in zip(serial, parallel):
        assert one == two, f"{kind} differs between the serial and the parallel encode"
    if any(k.startswith("sr") for k in outputs) and ("seg" in outputs or "pdf" in outputs):
        _no_child_left()
    else:
        assert not _FORKED  # nothing to share out: one process


@pytest.mark.parametrize("outputs", [("seg", "sr"), ("seg", "sr", "sr_measurements")])
def test_the_sr_is_built_and_written_by_the_child_while_the_seg_is_built_and_written(
        case: dict[str, Any], monkeypatch: pytest.MonkeyPatch, outputs: tuple[str, ...]) -> None:
    parent = os.getpid()
    writers: list[int] = []
    original = Spool.write_atomic

    def write_atomic(self: Spool, path: Path, data: bytes) -> None:
        original(self, path, data)
        if os.getpid() != parent:  # the child: say so through the file system (its memory is its own)
            Path(str(path) + ".child").write_text("")
        writers.append(os.getpid())

    monkeypatch.setattr(Spool, "write_atomic", write_atomic)
    outcome = _run(case, outputs, parallel=True)
    assert outcome.ok, outcome.error
    seg, *srs = outcome.objects
    assert [o.kind for o in outcome.objects] == list(outputs)
    assert not Path(str(case["spool"].absolute(seg.path)) + ".child").exists()
    assert all(Path(str(case["spool"].absolute(sr.path)) + ".child").exists() for sr in srs)
    assert writers == [parent]  # the parent wrote the SEG only
    _no_child_left()


def test_the_child_builds_the_sr_from_the_segs_outline_before_the_seg_is_built(
        case: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    original = pipeline.build_seg

    def build_seg_once_the_sr_is_written(prediction: Any, sources: Any, identity: Any, **kwargs: Any) -> Any:
        sr = case["spool"].result_path(case["series"], "bright", "sr")
        deadline = time.monotonic() + 60
        while not sr.exists():  # the child has the outline before this process builds the SEG
            assert time.monotonic() < deadline, "the SR was not written while the SEG waited"
            time.sleep(0.01)
        return original(prediction, sources, identity, **kwargs)

    monkeypatch.setattr(pipeline, "build_seg", build_seg_once_the_sr_is_written)
    parallel = _objects(case, _run(case, ("seg", "sr"), parallel=True))
    monkeypatch.setattr(pipeline, "build_seg", original)
    serial = _objects(case, _run(case, ("seg", "sr"), parallel=False))
    assert [(kind, obj) for kind, _, obj in parallel] == [(kind, obj) for kind, _, obj in serial]
    _no_child_left()


def test_an_outline_that_does_not_fit_the_seg_gives_an_sr_built_from_the_seg(
        case: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    original = pipeline.seg_outline

    def wrong_outline(*args: Any, **kwargs: Any) -> Any:
        outline = original(*args, **kwargs)
        outline.dataset.SegmentSequence[0].TrackingID = "not the SEG's"
        return outline

    monkeypatch.setattr(pipeline, "seg_outline", wrong_outline)
    parallel = _objects(case, _run(case, ("seg", "sr"), parallel=True))
    assert "would not match the SEG" in caplog.text and "not the SEG's" in caplog.text
    monkeypatch.setattr(pipeline, "seg_outline", original)
    serial = _objects(case, _run(case, ("seg", "sr"), parallel=False))
    assert [(kind, obj) for kind, _, obj in parallel] == [(kind, obj) for kind, _, obj in serial]
    _no_child_left()


def test_an_error_in_the_child_fails_the_job_with_its_message(case: dict[str, Any],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ResultError("overlay could not be drawn: test")

    monkeypatch.setattr(pipeline, "iter_overlays", broken)
    outcome = _run(case, ("seg", "sr", "sc"), parallel=True)
    assert not outcome.ok
    assert outcome.error == "overlay could not be drawn: test"
    _no_child_left()


def test_a_failure_of_the_workers_part_kills_the_child(case: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    started = tmp_path / "child-started"

    def slow_overlays(*args: object, **kwargs: object) -> list[object]:
        (tmp_path / "pid").write_text(str(os.getpid()))
        (tmp_path / "pid").rename(started)  # whole when seen
        signal.pause()  # until killed
        return []

    def broken_seg(*args: object, **kwargs: object) -> None:
        while not started.exists():
            pass
        raise ResultError("SEG could not be encoded: test")

    monkeypatch.setattr(pipeline, "iter_overlays", slow_overlays)
    monkeypatch.setattr(pipeline, "build_seg", broken_seg)
    outcome = _run(case, ("seg", "sr", "sc"), parallel=True)
    assert not outcome.ok and outcome.error == "SEG could not be encoded: test"
    child = int(started.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # killed and reaped
    _no_child_left()


def test_a_child_killed_by_a_signal_fails_the_job_with_the_reason(case: dict[str, Any],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(pipeline, "build_pdf", killed)
    outcome = _run(case, ("seg", "sr", "pdf"), parallel=True)
    assert not outcome.ok
    assert outcome.error == "the process encoding the overlay series and the PDF was killed by signal 9 without a result"
    _no_child_left()


def test_forked_returns_values_and_wraps_other_errors() -> None:
    with Forked(lambda: {"a": np.arange(3).tolist()}, "a value") as child:
        assert child.result() == {"a": [0, 1, 2]}

    def bug() -> None:
        raise KeyError("missing")

    with Forked(bug, "a bug") as child, pytest.raises(RuntimeError, match="encoding a bug raised KeyError"):
        child.result()
    _no_child_left()
