"""Start-up objects exempt from full garbage collections (:mod:`dicom_node.heap`); later garbage still collected."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dicom_node.heap import freeze_startup_objects


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def thawed() -> Iterator[None]:
    yield
    gc.unfreeze()  # this test process is not a node's: give its objects back to the collector


def test_startup_objects_are_exempt_and_later_garbage_is_collected(thawed: None) -> None:
    left_by_startup = _cycle()  # garbage already: the collection before freezing takes it
    kept = _Node()
    kept.other = kept
    made_at_startup = weakref.ref(kept)
    frozen = freeze_startup_objects("test")
    assert left_by_startup() is None
    assert frozen == gc.get_freeze_count() > 0
    made_later = _cycle()
    gc.collect()
    assert made_later() is None  # a job's or an association's cycles are collected as before
    del kept
    gc.collect()
    assert made_at_startup() is not None  # a start-up object dropped later is not (why models load after)


GC_MODEL_PY = '''
import gc
import weakref
from pathlib import Path

import numpy as np

MARKS = Path({marks!r})


class _Node:
    pass


def _touch(path):
    Path(path).write_text("")


def bright(array, geometry):
    (MARKS / "enabled").write_text(str(gc.isenabled()))
    node = _Node()
    node.itself = node  # cyclic garbage once the job lets go of it: only the collector frees it
    weakref.finalize(node, _touch, str(MARKS / "collected"))
    return (array > 500).astype(np.uint8)
'''


def test_a_worker_runs_a_job_without_automatic_collection_and_collects_after_it(tmp_path: Path) -> None:
    from dicom_node.scheduler.pipeline import InferTask
    from dicom_node.scheduler.worker import WorkerProcess
    from tests.spooled import python_model_case

    marks = tmp_path / "marks"
    marks.mkdir()
    hu = np.full((4, 32, 32), 40, np.int16)
    hu[1:3, 8:20, 8:20] = 900
    case = python_model_case(tmp_path, GC_MODEL_PY.format(marks=str(marks)), hu)
    worker = WorkerProcess(case["settings"])
    worker.start()
    try:
        outcome = worker.run(InferTask(1, case["series"], "bright", case["paths"], ("seg", "sr")), 120)
        assert outcome.ok, outcome.error
        assert (marks / "enabled").read_text() == "False"  # no full collection can fall inside the job
        deadline = time.monotonic() + 30
        while not (marks / "collected").exists():  # collected once the job's result was sent
            assert time.monotonic() < deadline, "the job's cyclic garbage was not collected after it"
            time.sleep(0.05)
    finally:
        worker.close()
