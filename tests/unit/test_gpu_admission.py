"""GPU admission: a model runs on its GPU only when its measured working memory fits.

The GPU's figures come from a stand-in (:class:`FakeGpu`) so the policy runs
on a machine without CUDA; the models are ``type: python`` models on
``cuda:0`` that compute on the CPU.  What is checked: a first run is
measured (peak above what was allocated before); the next run of a larger
input needs proportionally more; when it does not fit, this worker's other
warm models on that GPU are unloaded (least recently used first) until it
does; when nothing is left to unload, the job is not started and takes the
out-of-memory way of ``workers.gpu_out_of_memory`` (retry later, CPU, fail).
On a real GPU, ``tests/gpu/test_cuda.py`` measures a TorchScript model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicom_node.domain import JobKind, JobState
from dicom_node.scheduler import pipeline
from dicom_node.settings import Settings
from inference.gpu_memory import MARGIN, GpuAdmission, GpuAdmissionRefused
from tests.unit.test_gpu_out_of_memory import inline_node

GIB = 2**30

MODEL_PY = '''
import numpy as np

def seg(array, geometry):
    return (array > 0).astype(np.uint8)
'''

LABELS = [{"value": 1, "name": "Liver", "snomed": {"value": "10200004", "meaning": "Liver"}}]


class FakeGpu:
    """A GPU's memory as admission sees it: the test sets what is free and what the next run peaks at."""

    def __init__(self, free: float) -> None:
        self.free = int(free)
        self.next_working = 0  # bytes the next measured run uses above what was allocated before it
        self.freed_per_release = 0  # bytes an unloaded model gives back
        self.allocated = int(1 * GIB)
        self.releases = 0

    def present(self) -> bool:
        return True

    def available(self, device: Any) -> int:
        return self.free

    def start(self, device: Any) -> int:
        return self.allocated

    def peak(self, device: Any) -> int:
        return self.allocated + self.next_working

    def release(self, device: Any) -> None:
        self.releases += 1
        self.free += self.freed_per_release


@pytest.fixture()
def gpu(monkeypatch: pytest.MonkeyPatch) -> FakeGpu:
    fake = FakeGpu(free=10 * GIB)
    monkeypatch.setattr(pipeline, "_admission", GpuAdmission(fake))
    return fake


def test_need_is_the_measured_working_memory_scaled_up_for_larger_inputs() -> None:
    fake = FakeGpu(free=10 * GIB)
    admission = GpuAdmission(fake)
    assert admission.need("m", 1000) is None  # never measured: it runs, and that run is its measurement
    fake.next_working = 2 * GIB
    with admission.measured("m", "cuda:0", 1000):
        pass
    assert admission.working_bytes("m") == 2 * GIB
    assert admission.need("m", 1000) == int(2 * GIB * (1 + MARGIN))
    assert admission.need("m", 500) == int(2 * GIB * (1 + MARGIN))  # never scaled down
    assert admission.need("m", 3000) == int(6 * GIB * (1 + MARGIN))  # scaled up linearly
    with admission.measured("m", None, 1000):  # not on a GPU: nothing measured
        pass
    assert admission.working_bytes("m") == 2 * GIB


def test_admission_unloads_other_models_least_recently_used_first_then_refuses() -> None:
    fake = FakeGpu(free=1 * GIB)
    fake.freed_per_release = int(1.5 * GIB)
    admission = GpuAdmission(fake)
    fake.next_working = 2 * GIB
    with admission.measured("m", "cuda:0", 10):
        pass
    loaded = ["old", "newer"]
    unloaded: list[str] = []

    def unload_other() -> str | None:
        if not loaded:
            return None
        unloaded.append(loaded.pop(0))
        return unloaded[-1]

    admission.admit("m", "cuda:0", 10, unload_other)  # 1 GiB free, 2.2 needed: one unload gives 2.5
    assert unloaded == ["old"] and loaded == ["newer"]
    fake.free = 0
    fake.freed_per_release = 0
    with pytest.raises(GpuAdmissionRefused, match=r"needs 2\.20 GiB .* 0\.00 GiB is free"):
        admission.admit("m", "cuda:0", 10, unload_other)
    assert unloaded == ["old", "newer"]  # everything else went first


def _settings(tmp: Path, policy: str) -> Settings:
    code = tmp / "code"
    code.mkdir(exist_ok=True)
    (code / "gpu_models.py").write_text(MODEL_PY)
    model = {"type": "python", "path": str(code), "callable": "gpu_models:seg", "labels": LABELS,
             "device": "cuda:0"}
    return Settings.model_validate({
        "storage": {"path": str(tmp / "state")},
        "workers": {"gpu_out_of_memory": policy, "gpu_retry_s": 60},
        "models": {"big": model, "small": model, "other": model},
        "rules": [],
    })


@pytest.fixture()
def node(tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    return inline_node(_settings(tmp_path, request.param), tmp_path, ("a", "b", "c"))


def _job(node: dict[str, Any], model: str, series: int = 0) -> int:
    return node["pipeline"].jobs.enqueue(JobKind.INFER, node["series"][series], 100.0, model=model,
                                         payload={"outputs": ["sr"]})


@pytest.mark.parametrize("node", ["retry"], indirect=True)
def test_a_model_that_does_not_fit_unloads_the_others_then_waits(node: dict[str, Any], gpu: FakeGpu) -> None:
    p, registry = node["pipeline"], node["runner"].registry
    gpu.next_working = 6 * GIB
    assert _done(node, _job(node, "big"))  # first run: measured, 6 GiB
    gpu.next_working = 1 * GIB
    assert _done(node, _job(node, "small", 1))
    assert _done(node, _job(node, "other", 2))
    assert set(registry._cache) == {"big", "small", "other"}

    gpu.free, gpu.freed_per_release = 4 * GIB, 2 * GIB  # 6.6 GiB needed: two unloads make 8
    assert _done(node, _job(node, "big", 1))
    assert set(registry._cache) == {"big"}  # small then other (least recently used first) made room
    assert gpu.releases == 2

    gpu.free, gpu.freed_per_release = 3 * GIB, 0  # another process holds the rest: nothing to unload here
    job = _job(node, "big", 2)
    assert p.drain_infer(lambda: 101.0) == 1
    waiting = p.jobs.get(job)
    assert waiting.state == JobState.RETRYING, waiting.reason
    assert "not started on GPU cuda:0: it needs 6.60 GiB" in waiting.reason
    assert waiting.next_attempt_at == pytest.approx(161.0)
    gpu.free = 8 * GIB
    assert p.drain_infer(lambda: 162.0) == 1
    assert p.jobs.get(job).state == JobState.DONE


@pytest.mark.parametrize("node", ["cpu"], indirect=True)
def test_cpu_policy_runs_a_model_that_does_not_fit_on_the_cpu(node: dict[str, Any], gpu: FakeGpu) -> None:
    p, registry = node["pipeline"], node["runner"].registry
    gpu.next_working = 6 * GIB
    assert _done(node, _job(node, "big"))
    gpu.free = 1 * GIB
    job = _job(node, "big", 1)
    assert p.drain_infer(lambda: 101.0) == 1
    done = p.jobs.get(job)
    assert done.state == JobState.DONE, done.reason
    assert any(n.startswith("not started on GPU cuda:0") and n.endswith("ran on the CPU instead")
               for n in done.payload["notes"])
    assert registry.get("big", device="cpu").device == "cpu"


@pytest.mark.parametrize("node", ["fail"], indirect=True)
def test_larger_input_needs_more_and_fail_policy_fails_it(node: dict[str, Any], gpu: FakeGpu,
                                                          tmp_path: Path) -> None:
    p = node["pipeline"]
    gpu.next_working = 2 * GIB
    assert _done(node, _job(node, "big"))  # measured on series a
    voxels = pipeline._admission._measured["big"][0].voxels
    assert voxels == np.prod(_shape(node, 0))
    gpu.free = 3 * GIB  # 2.2 GiB would fit for the same size
    assert _done(node, _job(node, "big"))
    assert pipeline._admission.need("big", voxels * 2) == int(4 * GIB * (1 + MARGIN))
    job = _job(node, "big")
    pipeline._admission._measured["big"][:] = [type(pipeline._admission._measured["big"][0])(voxels // 2, 2 * GIB)]
    assert p.drain_infer(lambda: 101.0) == 1  # now measured on half the size: twice as much expected
    failed = p.jobs.get(job)
    assert failed.state == JobState.FAILED
    assert "it needs 4.40 GiB" in failed.reason and "3.00 GiB is free" in failed.reason


def _done(node: dict[str, Any], job: int) -> bool:
    p = node["pipeline"]
    assert p.drain_infer(lambda: 101.0) == 1
    state = p.jobs.get(job)
    assert state.state == JobState.DONE, state.reason
    return True


def _shape(node: dict[str, Any], index: int) -> tuple[int, ...]:
    from dicom_node.imaging import load_series

    spool = node["runner"].spool
    paths = node["pipeline"].series.instance_paths(node["series"][index])
    return tuple(load_series([spool.absolute(p) for p in paths]).volume.array.shape)
