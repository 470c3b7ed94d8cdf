"""MONAI bundles in the standard layout: the node's run equals the bundle run the MONAI way."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import UNet

from dicom_node.settings import load_settings_text
from inference.gpu_memory import out_of_memory_error
from inference.models.monai_bundle import MonaiBundleModel
from inference.registry import ModelRegistry
from inference.runner import affine_ras
from inference.types import Code, Volume
from tests.models_factory import CONV_DEF, UNET_DEF, add_bundle_script, threshold_conv, write_bundle

AXIAL = np.array([[0, 0, 1.0], [0, 1.0, 0], [1.0, 0, 0]])


def _volume(seed: int = 0, shape: tuple[int, int, int] = (10, 24, 28)) -> Volume:
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1000, size=shape).astype(np.float32)
    return Volume(array, (2.5, 0.8, 0.9), (-10.0, 20.0, 30.0), AXIAL, "CT")


def _spec(text: str) -> Any:
    return load_settings_text(text).models


def _bundle_run_the_monai_way(bundle: Path, volume: Volume, tmp: Path) -> np.ndarray:
    """What the bundle computes from a NIfTI file through its own LoadImaged ... Invertd (no SaveImaged)."""
    nifti = tmp / "image.nii.gz"
    nib.save(nib.Nifti1Image(volume.array.transpose(2, 1, 0), affine_ras(volume)), str(nifti))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    post = parser.get("postprocessing#transforms")
    parser["postprocessing#transforms"] = [t for t in post if t["_target_"] != "SaveImaged"]
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(str(bundle / "models" / "model.pt"), weights_only=True))
    network.eval()
    with warnings.catch_warnings():  # MONAI's reader registry warns about optional GPU decoders
        warnings.simplefilter("ignore", UserWarning)
        pre = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    postprocessing = parser.get_parsed_content("postprocessing")
    with torch.no_grad():
        data = pre({"image": str(nifti)})
        data["pred"] = inferer(data["image"][None], network)[0]
        data = postprocessing(data)
    return np.asarray(data["pred"][0]).transpose(2, 1, 0)


def test_unet_bundle_equals_the_bundle_run_from_a_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0)
    bundle = write_bundle(tmp_path / "spleen_ct_segmentation", net, UNET_DEF, pixdim=(1.5, 1.5, 2.0))
    spec = _spec(f"models: {{b: {{type: monai_bundle, path: {bundle}, device: cpu}}}}")["b"]
    model = MonaiBundleModel("b", bundle, spec)
    volume = _volume()
    labelmap = model.predict(volume).labelmap
    expected = _bundle_run_the_monai_way(bundle, volume, tmp_path)
    assert labelmap is not None and labelmap.shape == volume.array.shape
    assert 0 < np.count_nonzero(expected) < expected.size
    np.testing.assert_array_equal(labelmap, expected.astype(np.uint8))


def test_threshold_bundle_masks_exact_source_voxels(tmp_path: Path) -> None:
    volume = _volume(seed=2)
    # Window [-1000, 1000] -> [0, 1]; -499.5 HU is 0.25025 after scaling.
    bundle = write_bundle(tmp_path / "b", threshold_conv(0.25025, scale=10.0), CONV_DEF, pixdim=(0.9, 0.8, 2.5))
    model = ModelRegistry(_spec(f"models: {{b: {{type: monai_bundle, path: {bundle}, device: cpu}}}}")).get("b")
    prediction = model.predict(volume)
    np.testing.assert_array_equal(prediction.labelmap, (volume.array > -499.5).astype(np.uint8))


def test_card_comes_from_metadata_and_config_overrides(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b", threshold_conv(0.5), CONV_DEF, pixdim=None, version="0.4.2")
    model = ModelRegistry(_spec(f"models: {{b: {{type: monai_bundle, path: {bundle}, device: cpu}}}}")).get("b")
    assert model.card.version == "0.4.2" and model.card.modality == "CT"
    assert [(s.label, s.name, s.type) for s in model.card.segments] == [
        (1, "Spleen", Code("78961009", "SCT", "Spleen"))]
    overridden = ModelRegistry(_spec(f"""
models:
  b:
    type: monai_bundle
    path: {bundle}
    device: cpu
    version: "9"
    modality: ""
    labels: [{{value: 1, name: Organ, snomed: {{value: "85756007", meaning: Tissue}}}}]
""")).get("b")
    assert overridden.card.version == "9"
    assert overridden.card.segments[0].name == "Organ"


def test_unknown_channel_names_get_a_private_code(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b", threshold_conv(0.5), CONV_DEF, pixdim=None,
                          channel_def={"0": "background", "1": "mystery organ"})
    model = ModelRegistry(_spec(f"models: {{b: {{type: monai_bundle, path: {bundle}, device: cpu}}}}")).get("b")
    assert model.card.segments[0].type.scheme == "99DCMNODE"


def test_yaml_config_and_torchscript_weights(tmp_path: Path) -> None:
    import yaml

    bundle = write_bundle(tmp_path / "b", threshold_conv(0.25025, scale=10.0), CONV_DEF, pixdim=None)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    (bundle / "configs" / "inference.json").unlink()
    (bundle / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    (bundle / "models" / "model.pt").unlink()
    torch.jit.script(threshold_conv(0.25025, scale=10.0)).save(str(bundle / "models" / "model.ts"))
    model = ModelRegistry(_spec(f"models: {{b: {{type: monai_bundle, path: {bundle}, device: cpu}}}}")).get("b")
    volume = _volume(seed=4)
    np.testing.assert_array_equal(model.predict(volume).labelmap, volume.array > -499.5)


def test_bundle_without_weights_is_a_clear_error(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b", threshold_conv(0.5), CONV_DEF, pixdim=None)
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="models/model.pt"):
        ModelRegistry(_spec(f"models: {{b: {{type: monai_bundle, path: {bundle}, device: cpu}}}}")).get("b")
    with pytest.raises(FileNotFoundError, match="not found"):
        ModelRegistry(_spec(f"models: {{b: {{type: monai_bundle, path: {tmp_path / 'nope'}}}}}")).get("b")


HOST_TRANSFORMS = '''
"""Transforms of a test bundle that need host memory, as some bundles' own scripts do."""
import numpy as np
import torch
from monai.transforms import MapTransform


class NumpyStatsd(MapTransform):
    """Reads the image through NumPy (fails for an image in accelerator memory) and passes it on."""

    seen = []

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            NumpyStatsd.seen.append(float(np.asarray(d[key]).mean()))
        return d


class Exhaustsd(MapTransform):
    """Runs out of accelerator memory (raised the way torch raises it) for an image that is not on the CPU."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key].device.type != "cpu":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return d
'''


def _bundle_with_script(tmp_path: Path, transform: str) -> Path:
    """The threshold bundle with one of :data:`HOST_TRANSFORMS` after EnsureChannelFirstd."""
    bundle = write_bundle(tmp_path / "b", threshold_conv(0.25025, scale=10.0), CONV_DEF, pixdim=(0.9, 0.8, 2.5))
    return add_bundle_script(bundle, "host_transforms", HOST_TRANSFORMS, lambda config: config["preprocessing"][
        "transforms"].insert(2, {"_target_": f"scripts.host_transforms.{transform}", "keys": "image"}))


def _on_accelerator(model: MonaiBundleModel) -> MonaiBundleModel:
    """The model as on a GPU, for its transforms: torch's ``meta`` device stands in for CUDA on a CPU-only machine
    (a tensor there has no host memory either: NumPy refuses it with the same TypeError)."""
    model.transforms_device = torch.device("meta")
    return model


def test_transforms_that_fail_on_the_device_run_again_on_the_cpu_and_stay_there(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bundle = _bundle_with_script(tmp_path, "NumpyStatsd")
    spec = _spec(f"models: {{b: {{type: monai_bundle, path: {bundle}, device: cpu}}}}")["b"]
    model = MonaiBundleModel("b", bundle, spec)
    assert model.transforms_device == torch.device("cpu")  # transforms_on: device, on the model's device
    _on_accelerator(model)
    volume = _volume(seed=2)
    with caplog.at_level("WARNING", logger="inference.models.monai_bundle"):
        first = model.predict(volume).labelmap
    np.testing.assert_array_equal(first, (volume.array > -499.5).astype(np.uint8))
    assert model.transforms_device == torch.device("cpu")
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "failed on meta (TypeError: can't convert meta device type tensor to numpy" in warning
    assert "run on the CPU from now on" in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="inference.models.monai_bundle"):
        np.testing.assert_array_equal(model.predict(volume).labelmap, first)
    assert not caplog.records  # said once


def test_out_of_memory_on_the_device_is_raised_not_moved_to_the_cpu(tmp_path: Path) -> None:
    bundle = _bundle_with_script(tmp_path, "Exhaustsd")
    spec = _spec(f"models: {{b: {{type: monai_bundle, path: {bundle}, device: cpu}}}}")["b"]
    model = _on_accelerator(MonaiBundleModel("b", bundle, spec))
    with pytest.raises(RuntimeError, match="applying transform") as raised:  # MONAI's Compose wraps it
        model.predict(_volume(seed=2))
    assert isinstance(out_of_memory_error(raised.value), torch.cuda.OutOfMemoryError)
    assert model.transforms_device == torch.device("meta")  # the node retries or moves the job, not the model


def test_a_failure_on_both_device_and_cpu_is_the_jobs_and_leaves_the_model_where_it_was(tmp_path: Path) -> None:
    bundle = _bundle_with_script(tmp_path, "NumpyStatsd")
    spec = _spec(f"models: {{b: {{type: monai_bundle, path: {bundle}, device: cpu}}}}")["b"]
    model = _on_accelerator(MonaiBundleModel("b", bundle, spec))
    model.preprocessing.transforms[-1].keys = ("no such key",)  # EnsureTyped: now fails on either device
    with pytest.raises(RuntimeError, match="applying transform <monai.*EnsureTyped") as raised:
        model.predict(_volume(seed=3))
    assert isinstance(raised.value.__cause__, KeyError)  # the CPU's error: the job fails with it
    assert model.transforms_device == torch.device("meta")


def test_transforms_on_cpu_and_a_wrong_value(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b", threshold_conv(0.5), CONV_DEF, pixdim=None)
    spec = _spec(f"models: {{b: {{type: monai_bundle, path: {bundle}, device: cpu, transforms_on: cpu}}}}")["b"]
    assert spec.transforms_on == "cpu"
    assert MonaiBundleModel("b", bundle, spec).transforms_device == torch.device("cpu")
    from dicom_node.errors import ConfigError

    with pytest.raises(ConfigError, match="transforms_on"):
        _spec(f"models: {{b: {{type: monai_bundle, path: {bundle}, transforms_on: gpu}}}}")
