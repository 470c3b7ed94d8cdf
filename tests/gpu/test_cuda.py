"""The CUDA path: worker-per-GPU binding, device selection, AMP, GPU memory.

These tests need an NVIDIA GPU and are skipped (with that reason) elsewhere;
CI machines have none. Run them on a GPU machine with
``.venv/bin/python -m pytest tests/gpu -v``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dicom_node.imaging import load_series
from dicom_node.scheduler.pipeline import InferTask
from dicom_node.scheduler.worker import WorkerProcess, worker_gpus
from dicom_node.settings import load_settings_text
from dicom_node.spool import Spool
from inference.registry import ModelRegistry
from inference.runner import inference_context, resolve_device
from tests.models_factory import TISSUE, threshold_conv, write_torchscript
from tests.phantoms import make_chest_phantom, write_ct_series

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA")

LABELS = [{"value": 1, "name": "Tissue", "snomed": TISSUE}]


def _settings(tmp_path: Path, model_path: Path) -> object:
    import json

    models = {"ts": {"type": "torchscript", "path": str(model_path), "labels": LABELS, "device": "auto",
                     "amp": True, "preprocessing": {"roi_size": [32, 32, 32], "sw_batch_size": 4}}}
    text = json.dumps({"storage": {"path": str(tmp_path / "state")}, "models": models,
                       "workers": {"infer": "auto"}, "http": {"enabled": False}})
    return load_settings_text(text)


def _series(tmp_path: Path) -> tuple[Spool, list[Path], np.ndarray]:
    spool = Spool(tmp_path / "state")
    hu, _ = make_chest_phantom(shape=(40, 96, 96), spacing=(2.5, 2.0, 2.0))
    files = write_ct_series(hu, (2.5, 2.0, 2.0), spool.incoming / "phantom")
    return spool, files, hu


def test_auto_gives_one_worker_per_gpu() -> None:
    assert worker_gpus("auto") == list(range(torch.cuda.device_count()))
    assert worker_gpus(3) == [i % torch.cuda.device_count() for i in range(3)]


def test_auto_device_is_the_bound_gpu_and_amp_runs_float16() -> None:
    torch.cuda.set_device(0)
    device = resolve_device("auto")
    assert device == torch.device("cuda", 0)
    with inference_context(device, amp=True):
        a = torch.ones(64, 64, device=device)
        assert (a @ a).dtype == torch.float16
    with inference_context(device, amp=False):
        assert (a @ a).dtype == torch.float32


def test_model_runs_on_gpu_and_matches_cpu(tmp_path: Path) -> None:
    ts = write_torchscript(threshold_conv(-499.5), tmp_path / "threshold.ts")
    settings = _settings(tmp_path, ts)
    _, files, hu = _series(tmp_path)
    volume = load_series(files).volume
    torch.cuda.set_device(0)
    torch.cuda.reset_peak_memory_stats()
    model = ModelRegistry(settings.models).get("ts")
    assert model.device.type == "cuda"
    gpu = model.predict(volume).labelmap
    peak_mb = torch.cuda.max_memory_allocated() / 2**20
    assert peak_mb > 0
    expected = (volume.array > -499.5).astype(np.uint8)
    # float16 rounding may flip voxels within a hair of the threshold only.
    near = np.abs(volume.array + 499.5) < 1.0
    assert np.array_equal(gpu[~near], expected[~near])
    print(f"GPU {torch.cuda.get_device_name(0)}: peak {peak_mb:.1f} MiB for a {volume.array.shape} volume")


def test_worker_process_bound_to_gpu_runs_a_job(tmp_path: Path) -> None:
    ts = write_torchscript(threshold_conv(-499.5), tmp_path / "threshold.ts")
    settings = _settings(tmp_path, ts)
    spool, files, _ = _series(tmp_path)
    worker = WorkerProcess(settings, gpu=0)
    worker.start()
    try:
        task = InferTask(1, str(load_series(files).sources[0].SeriesInstanceUID), "ts",
                         tuple(spool.relative(f) for f in files), ("seg", "sr"))
        outcome = worker.run(task, timeout_s=300)
    finally:
        worker.stop()
    assert outcome.ok, outcome.error
    assert {o.kind for o in outcome.objects} == {"seg", "sr"}


def test_admission_measures_a_model_on_the_gpu_and_refuses_what_cannot_fit(tmp_path: Path) -> None:
    from inference.gpu_memory import GpuAdmission, GpuAdmissionRefused, cuda_device

    ts = write_torchscript(threshold_conv(-499.5), tmp_path / "threshold.ts")
    settings = _settings(tmp_path, ts)
    _, files, _ = _series(tmp_path)
    volume = load_series(files).volume
    torch.cuda.set_device(0)
    model = ModelRegistry(settings.models).get("ts")
    device = cuda_device(model)
    assert device == torch.device("cuda", 0)
    admission = GpuAdmission()
    with admission.measured("ts", device, volume.array.size):
        model.predict(volume)
    working = admission.working_bytes("ts")
    assert working >= volume.array.astype(np.float32).nbytes  # the volume itself went to the device
    admission.admit("ts", device, volume.array.size, lambda: None)  # fits on an otherwise idle GPU
    _, total = torch.cuda.mem_get_info(device)
    with pytest.raises(GpuAdmissionRefused, match="not started on GPU cuda:0"):
        admission.admit("ts", device, volume.array.size * (total // working + 2), lambda: None)
    print(f"GPU admission: {working / 2**20:.1f} MiB working memory measured for a {volume.array.shape} volume")


PROBES = '''
"""Probes of a test bundle: where its transforms and its network run, and under autocast or not."""
import json

import torch
from monai.transforms import MapTransform


def _note(path, what, tensor):
    with open(path, "a") as f:
        f.write(json.dumps({"what": what, "device": tensor.device.type, "dtype": str(tensor.dtype),
                            "autocast": torch.is_autocast_enabled("cuda")}) + "\\n")


class Probed(MapTransform):
    def __init__(self, keys, path, what):
        super().__init__(keys)
        self.path, self.what = path, what

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            _note(self.path, self.what, d[key])
        return d


class ProbeConv(torch.nn.Conv3d):
    def __init__(self, path, **kwargs):
        super().__init__(**kwargs)
        self.path = path

    def forward(self, x):
        _note(self.path, "network", x)
        return super().forward(x)
'''


def _probed_bundle(tmp_path: Path, notes: Path) -> Path:
    """The threshold bundle (spacing 1.2 x 1.1 x 3 mm), probed after EnsureChannelFirstd, after Spacingd, in the
    network and after the postprocessing's Invertd."""
    from tests.models_factory import CONV_DEF, add_bundle_script, write_bundle

    def probed(config: dict[str, Any]) -> None:
        probe = {"_target_": "scripts.probes.Probed", "path": str(notes)}
        pre = config["preprocessing"]["transforms"]
        pre.insert(2, {**probe, "keys": "image", "what": "uploaded"})
        pre.insert(5, {**probe, "keys": "image", "what": "resampled"})
        config["postprocessing"]["transforms"].insert(2, {**probe, "keys": "pred", "what": "inverted"})
        config["network_def"] = {**CONV_DEF, "_target_": "scripts.probes.ProbeConv", "path": str(notes)}

    bundle = write_bundle(tmp_path / "probed", threshold_conv(0.25025, scale=10.0), CONV_DEF, pixdim=(1.2, 1.1, 3.0))
    return add_bundle_script(bundle, "probes", PROBES, probed)


def test_bundle_transforms_run_on_the_gpu_in_full_precision_and_match_the_cpu(tmp_path: Path) -> None:
    import json

    notes = tmp_path / "notes.jsonl"
    bundle = _probed_bundle(tmp_path, notes)
    _, files, _ = _series(tmp_path)
    volume = load_series(files).volume
    torch.cuda.set_device(0)
    text = json.dumps({"models": {
        "gpu": {"type": "monai_bundle", "path": str(bundle), "device": "cuda", "amp": True},
        "cpu": {"type": "monai_bundle", "path": str(bundle), "device": "cpu", "transforms_on": "cpu"}}})
    registry = ModelRegistry(load_settings_text(text).models)
    gpu = registry.get("gpu").predict(volume).labelmap
    seen = [json.loads(line) for line in notes.read_text().splitlines()]
    assert registry.get("gpu").transforms_device.type == "cuda"  # nothing fell back to the CPU
    assert list(dict.fromkeys((n["what"], n["device"], n["autocast"]) for n in seen)) == [
        ("uploaded", "cuda", False), ("resampled", "cuda", False), ("network", "cuda", True),
        ("inverted", "cuda", False)]
    notes.unlink()
    cpu = registry.get("cpu").predict(volume).labelmap
    assert {json.loads(line)["device"] for line in notes.read_text().splitlines()} == {"cpu"}
    assert gpu is not None and cpu is not None and gpu.shape == cpu.shape == volume.array.shape
    # The same resampling on both; float16 convolution may flip voxels within a hair of the threshold only.
    differ = np.count_nonzero(gpu != cpu)
    assert 0 < np.count_nonzero(cpu) < cpu.size
    assert differ <= cpu.size * 1e-3, f"{differ} of {cpu.size} voxels differ between GPU and CPU"
    print(f"bundle on {torch.cuda.get_device_name(0)}: transforms on the GPU, {differ} voxels differ from the CPU")
