"""With several workers, the job of a series goes to the worker that read it ahead.

Each receiving series is read ahead by one worker (by its UID); without a
preference, whichever worker's loop woke first took the job and read the
files again while the other dropped the volume it held.  A worker's drain
now leaves such a job to the reader while the reader is idle and alive, for
at most ``READ_AHEAD_CLAIM_S`` after the job became due.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.domain import JobKind, JobState
from dicom_node.scheduler.service import Pipeline
from dicom_node.scheduler.worker import READ_AHEAD_CLAIM_S, WorkerProcess, leave_to_reader
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from dicom_node.store import Database
from dicom_node.store.jobs import JobStore
from tests.spooled import spool_series
from tests.tools import wait_until

MODEL_PY = '''
import numpy as np

def bright(array, geometry):
    return (array > 500).astype(np.uint8)
'''


class FakeWorker:
    def __init__(self, held: set[str], busy: bool = False, alive: bool = True) -> None:
        self.held, self.busy, self.alive = held, busy, alive

    def holds(self, series_uid: str) -> bool:
        return series_uid in self.held


def test_a_claim_leaves_the_jobs_it_is_told_to_and_takes_the_next(tmp_path: Path) -> None:
    db = Database(tmp_path / "state.sqlite3")
    a, b = (spool_series(Spool(tmp_path / "state"), db, name) for name in ("a", "b"))
    jobs = JobStore(db)
    first = jobs.enqueue(JobKind.INFER, a, 100.0, model="m")
    second = jobs.enqueue(JobKind.INFER, b, 100.0, model="m")
    seen: list[tuple[str, float]] = []

    def leave(series_uid: str, due_since: float) -> bool:
        seen.append((series_uid, due_since))
        return series_uid == a

    taken = jobs.claim(JobKind.INFER, 101.0, leave=leave)
    assert taken is not None and taken.id == second
    assert seen == [(a, 100.0), (b, 100.0)]
    assert jobs.claim(JobKind.INFER, 101.0, leave=leave) is None  # only the left one is due
    again = jobs.claim(JobKind.INFER, 101.0)
    assert again is not None and again.id == first


def test_a_job_is_left_only_to_an_idle_live_reader_and_not_for_long() -> None:
    me, reader = FakeWorker(set()), FakeWorker({"s"})
    now = [100.0]
    leave = leave_to_reader([me, reader], me, lambda: now[0])
    assert leave("s", 99.0)  # the reader holds it and is idle
    assert not leave("t", 99.0)  # nobody read it ahead
    reader.busy = True
    assert not leave("s", 99.0)  # the reader runs a job: take it rather than wait
    reader.busy, reader.alive = False, False
    assert not leave("s", 99.0)  # the reader is gone (restarting)
    reader.alive = True
    now[0] = 99.0 + READ_AHEAD_CLAIM_S
    assert not leave("s", 99.0)  # due long enough: whoever is free takes it
    assert not leave_to_reader([me], me, lambda: 100.0)("s", 99.0)  # one worker: nothing to leave to
    mine = leave_to_reader([reader, me], reader, lambda: 100.0)
    assert not mine("s", 99.0)  # the reader itself takes it


def test_the_worker_that_read_a_series_ahead_runs_its_job(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "bright_model.py").write_text(MODEL_PY)
    settings = Settings.model_validate({
        "storage": {"path": str(tmp_path / "state")},
        "models": {"bright": {"type": "python", "callable": "bright_model:bright", "path": str(code),
                              "labels": [{"value": 1, "name": "Bright", "color": [255, 0, 0],
                                          "snomed": {"value": "10200004", "meaning": "Liver"}}]}},
        "workers": {"preload_models": False},
        "rules": [],
    })
    spool, db = Spool(tmp_path / "state"), Database(tmp_path / "state.sqlite3")
    hu = np.full((12, 32, 32), 40, np.int16)
    hu[3:9, 8:20, 8:20] = 900
    series_uid = spool_series(spool, db, "ct", hu)
    workers = [WorkerProcess(settings), WorkerProcess(settings)]
    p = Pipeline(settings, db, spool, workers[0], lambda *a, **k: None)
    paths = p.series.instance_paths(series_uid)
    for w in workers:
        w.start()
    try:
        assert workers[1].prefetch(series_uid, paths)
        wait_until(lambda: workers[1].read_ahead() == {series_uid: len(paths)}, 120,
                   "worker 1 to read the series ahead (after its warm-up)")
        job = p.jobs.enqueue(JobKind.INFER, series_uid, 100.0, model="bright", payload={"outputs": ["seg", "sr"]})
        soon: Any = lambda: 100.5  # noqa: E731
        assert p.drain_infer(soon, runner=workers[0], leave=leave_to_reader(workers, workers[0], soon)) == 0
        assert p.drain_infer(soon, runner=workers[1], leave=leave_to_reader(workers, workers[1], soon)) == 1
        done = p.jobs.get(job)
        assert done.state == JobState.DONE, done.reason
        assert done.payload["prefetched"] == len(paths)  # the reader's volume, not the files again

        # A job whose reader does not come for it: another worker takes it once it has waited long enough.
        late = p.jobs.enqueue(JobKind.INFER, series_uid, 200.0, model="bright", payload={"outputs": ["sr"]})
        waited: Any = lambda: 200.0 + READ_AHEAD_CLAIM_S  # noqa: E731
        assert p.drain_infer(lambda: 200.5, runner=workers[0],
                             leave=leave_to_reader(workers, workers[0], lambda: 200.5)) == 0
        assert p.drain_infer(waited, runner=workers[0], leave=leave_to_reader(workers, workers[0], waited)) == 1
        assert p.jobs.get(late).state == JobState.DONE
    finally:
        for w in workers:
            w.close()
