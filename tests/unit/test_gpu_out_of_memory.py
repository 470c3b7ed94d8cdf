"""A model that runs out of GPU memory: the job is retried later, run on the CPU, or failed, by config.

The model raises torch's own ``torch.cuda.OutOfMemoryError`` (what a CUDA
allocation raises) whenever it is asked to compute anywhere but on the CPU,
or for its first calls only, so each policy can be forced on a machine
without a GPU.  The worker (here the job runner in this process) keeps
going: the next job, of another model, runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dicom_node.domain import JobKind, JobState
from dicom_node.scheduler.pipeline import InferOutcome, InferTask, run_infer
from dicom_node.scheduler.service import Pipeline
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from dicom_node.store import Database
from inference.registry import ModelRegistry
from tests.spooled import spool_series

MODEL_PY = '''
from pathlib import Path

import numpy as np
import torch

CALLS = Path(__file__).with_name("calls")


def greedy(array, geometry):
    """Out of GPU memory on any device but the CPU."""
    if geometry["device"] != "cpu":
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 1 GiB free)")
    return (array > 0).astype(np.uint8)


def first_calls(array, geometry):
    """Out of GPU memory on its first two calls (the GPU is busy), then fine."""
    n = int(CALLS.read_text()) if CALLS.exists() else 0
    CALLS.write_text(str(n + 1))
    if n < 2:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return (array > 0).astype(np.uint8)


def in_a_transform(array, geometry):
    """Out of GPU memory inside a MONAI transform: Compose re-raises it as RuntimeError from it."""
    if geometry["device"] != "cpu":
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
        except torch.cuda.OutOfMemoryError as exc:
            raise RuntimeError("applying transform <monai.transforms.spatial.dictionary.Spacingd>") from exc
    return (array > 0).astype(np.uint8)


def fine(array, geometry):
    return (array > 0).astype(np.uint8)
'''

LABELS = [{"value": 1, "name": "Liver", "snomed": {"value": "10200004", "meaning": "Liver"}}]


class InlineRunner:
    """Runs each INFER task in this process, on one registry: one worker that must survive each error."""

    def __init__(self, settings: Settings, spool: Spool) -> None:
        self.settings, self.spool = settings, spool
        self.registry = ModelRegistry(settings.models)

    def run(self, task: InferTask, timeout_s: float, ready: Any = None) -> InferOutcome:
        return run_infer(task, self.registry, self.spool, self.settings.outputs, ready=ready)


def _settings(tmp: Path, policy: str) -> Settings:
    code = tmp / "code"
    code.mkdir(exist_ok=True)
    (code / "oom_models.py").write_text(MODEL_PY)
    model = {"type": "python", "path": str(code), "labels": LABELS, "device": "cuda"}
    return Settings.model_validate({
        "storage": {"path": str(tmp / "state")},
        "workers": {"gpu_out_of_memory": policy, "gpu_retry_s": 60},
        "models": {"greedy": {**model, "callable": "oom_models:greedy"},
                   "first": {**model, "callable": "oom_models:first_calls"},
                   "in_a_transform": {**model, "callable": "oom_models:in_a_transform"},
                   "fine": {**model, "callable": "oom_models:fine", "device": "auto"}},
        "rules": [],
    })


def inline_node(settings: Settings, tmp: Path, series: tuple[str, ...]) -> dict[str, Any]:
    """A pipeline whose jobs run in this process on one registry, with small CT series of these names."""
    spool, db = Spool(tmp / "state"), Database(tmp / "state.sqlite3")
    runner = InlineRunner(settings, spool)
    pipeline = Pipeline(settings, db, spool, runner, lambda *a, **k: None)
    return {"pipeline": pipeline, "runner": runner, "series": [spool_series(spool, db, n) for n in series]}


@pytest.fixture()
def node(tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    return inline_node(_settings(tmp_path, request.param), tmp_path, ("a", "b"))


def _job(node: dict[str, Any], model: str, series: int = 0) -> int:
    return node["pipeline"].jobs.enqueue(JobKind.INFER, node["series"][series], 100.0, model=model,
                                         payload={"outputs": ["sr"]})


@pytest.mark.parametrize("node", ["cpu"], indirect=True)
@pytest.mark.parametrize(("model", "words"), [
    ("greedy", "CUDA out of memory (CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 1 GiB free))"),
    # Raised inside a MONAI transform: Compose re-raises it as RuntimeError("applying transform ...") from it.
    ("in_a_transform", "CUDA out of memory (CUDA out of memory. Tried to allocate 1.50 GiB)"),
])
def test_cpu_policy_runs_the_job_again_on_the_cpu(node: dict[str, Any], model: str, words: str) -> None:
    p = node["pipeline"]
    job = _job(node, model)
    assert p.drain_infer(lambda: 101.0) == 1
    done = p.jobs.get(job)
    assert done.state == JobState.DONE, done.reason
    assert any(words in n and "ran on the CPU instead" in n for n in done.payload["notes"]), done.payload["notes"]
    assert done.payload["files"]  # its SR was made
    registry = node["runner"].registry
    assert registry.get(model, device="cpu").device == "cpu"  # kept warm beside the GPU copy
    assert registry.get(model).device == "cuda"


@pytest.mark.parametrize("node", ["retry"], indirect=True)
def test_retry_policy_tries_again_later_and_the_worker_goes_on(node: dict[str, Any]) -> None:
    p = node["pipeline"]
    job, other = _job(node, "first"), _job(node, "fine", series=1)
    assert p.drain_infer(lambda: 101.0) == 2  # the out-of-memory job, then the other model's, in one worker
    waiting = p.jobs.get(job)
    assert waiting.state == JobState.RETRYING and "CUDA out of memory" in waiting.reason
    assert waiting.next_attempt_at == pytest.approx(161.0)  # gpu_retry_s later
    assert p.jobs.get(other).state == JobState.DONE
    assert p.drain_infer(lambda: 120.0) == 0  # not due yet
    assert p.drain_infer(lambda: 162.0) == 1  # second attempt: out of memory again
    assert p.jobs.get(job).state == JobState.RETRYING
    assert p.drain_infer(lambda: 223.0) == 1  # third: the GPU had room
    assert p.jobs.get(job).state == JobState.DONE


@pytest.mark.parametrize("node", ["retry"], indirect=True)
def test_retry_policy_fails_the_job_after_its_last_attempt(node: dict[str, Any]) -> None:
    p = node["pipeline"]
    job = _job(node, "greedy")
    for now in (101.0, 162.0, 223.0):
        assert p.drain_infer(lambda: now) == 1
    failed = p.jobs.get(job)
    assert failed.state == JobState.FAILED and failed.attempts == 3
    assert "CUDA out of memory" in failed.reason and "gpu_out_of_memory: cpu" in failed.reason


@pytest.mark.parametrize("node", ["fail"], indirect=True)
def test_fail_policy_fails_at_once(node: dict[str, Any]) -> None:
    p = node["pipeline"]
    job = _job(node, "greedy")
    assert p.drain_infer(lambda: 101.0) == 1
    assert p.jobs.get(job).state == JobState.FAILED
