"""TorchScript models with declared preprocessing, against what the network computes directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from dicom_node.settings import PreprocessingSettings, load_settings_text
from inference.models.torchscript import TorchscriptModel
from inference.registry import ModelRegistry
from inference.runner import affine_ras, resolve_device
from inference.types import SCT_ANATOMICAL_STRUCTURE, Code, ModelCard, SegmentSpec, Task, Volume
from tests.models_factory import global_classifier, threshold_conv, write_torchscript

SEGMENT = SegmentSpec(1, "Tissue", SCT_ANATOMICAL_STRUCTURE, Code("85756007", "SCT", "Tissue"))
CARD = ModelCard("ts", "1.0", segments=(SEGMENT,), modality="CT")


def _volume(direction: np.ndarray, seed: int = 0, shape: tuple[int, int, int] = (12, 20, 24)) -> Volume:
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1000, size=shape).astype(np.float32)
    return Volume(array, (2.5, 0.8, 0.9), (-10.0, 20.0, 30.0), direction, "CT")


AXIAL = np.array([[0, 0, 1.0], [0, 1.0, 0], [1.0, 0, 0]])
SAGITTAL = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])  # rows: z=+x, y=-z (down), x=+y
TILTED = np.array([[0, np.sin(0.2), np.cos(0.2)], [0, 1.0, 0], [1.0, 0, 0]])  # gantry tilt: sheared z step


@pytest.mark.parametrize("direction", [AXIAL, SAGITTAL, TILTED], ids=["axial", "sagittal", "tilted"])
def test_threshold_network_masks_exactly_the_voxels_above_threshold(tmp_path: Path, direction: np.ndarray) -> None:
    path = write_torchscript(threshold_conv(-499.5), tmp_path / "threshold.ts")
    model = TorchscriptModel(CARD, path, PreprocessingSettings(orientation="RAS"), device="cpu")
    volume = _volume(direction)
    prediction = model.predict(volume)
    assert prediction.labelmap is not None
    np.testing.assert_array_equal(prediction.labelmap, (volume.array > -499.5).astype(np.uint8))
    voxels = int(np.count_nonzero(volume.array > -499.5))
    (volume_ml,) = prediction.measurements[1]
    assert volume_ml.value == pytest.approx(voxels * volume.voxel_volume_ml)


def test_unet_with_resampling_and_sliding_window_matches_the_network_run_directly(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    path = write_torchscript(net, tmp_path / "unet.ts")
    pre = PreprocessingSettings(orientation="RAS", spacing=(0.9, 0.8, 2.5), window=(-1000, 1000),
                                roi_size=(16, 16, 8), overlap=0.5, sw_batch_size=3)
    model = TorchscriptModel(CARD, path, pre, device="cpu")
    volume = _volume(AXIAL, seed=1)
    labelmap = model.predict(volume).labelmap
    assert labelmap is not None

    # Expected: the same network on the same voxels. Spacing equals the volume's, so the RAS grid is the
    # volume flipped in x and y (LPS -> RAS) and transposed to MONAI's [x, y, z].
    image = np.clip((volume.array + 1000) / 2000, 0, 1).transpose(2, 1, 0)[::-1, ::-1, :].copy()
    with torch.no_grad():
        out = sliding_window_inference(torch.from_numpy(image)[None, None], (16, 16, 8), 3, net, overlap=0.5)
    expected = torch.argmax(out[0], dim=0).numpy()[::-1, ::-1, :].transpose(2, 1, 0)
    assert 0 < np.count_nonzero(expected) < expected.size
    np.testing.assert_array_equal(labelmap, expected.astype(np.uint8))


def test_resampled_threshold_mask_comes_back_on_the_input_grid(tmp_path: Path) -> None:
    path = write_torchscript(threshold_conv(0.0), tmp_path / "threshold.ts")
    model = TorchscriptModel(CARD, path, PreprocessingSettings(spacing=(1.8, 1.6, 5.0)), device="cpu")
    z, y, x = np.mgrid[0:12, 0:40, 0:48]
    array = np.where((x - 24) ** 2 + (y - 20) ** 2 < 12**2, 100.0, -100.0).astype(np.float32)
    volume = Volume(array, (2.5, 0.8, 0.9), (0.0, 0.0, 0.0), AXIAL, "CT")
    labelmap = model.predict(volume).labelmap
    assert labelmap is not None and labelmap.shape == array.shape
    truth = array > 0
    dice = 2 * np.count_nonzero(truth & (labelmap == 1)) / (np.count_nonzero(truth) + np.count_nonzero(labelmap))
    assert dice > 0.95


def test_classifier_gives_softmax_probabilities_with_threshold(tmp_path: Path) -> None:
    path = write_torchscript(global_classifier(0.5), tmp_path / "cls.ts")
    card = ModelCard("cls", "1.0", task=Task.CLASSIFICATION, classes=("bright", "dark"))
    pre = PreprocessingSettings(window=(-1000, 1000), spatial_size=(8, 8, 8))
    model = TorchscriptModel(card, path, pre, device="cpu", threshold=0.5)
    volume = Volume(np.full((6, 10, 10), -600.0, dtype=np.float32), (1.0, 1.0, 1.0), (0, 0, 0), AXIAL, "CT")
    result = model.predict(volume).classifications
    mean = 0.2  # (-600 + 1000) / 2000
    p = torch.softmax(torch.tensor([mean - 0.5, 0.5 - mean]), 0).tolist()
    assert [c.name for c in result] == ["bright", "dark"]
    assert [c.probability for c in result] == pytest.approx(p, abs=1e-5)
    assert [c.positive for c in result] == [False, True]


def test_class_count_must_match_the_network_output(tmp_path: Path) -> None:
    path = write_torchscript(global_classifier(0.5), tmp_path / "cls.ts")
    card = ModelCard("cls", "1.0", task=Task.CLASSIFICATION, classes=("only",))
    model = TorchscriptModel(card, path, PreprocessingSettings(), device="cpu")
    volume = Volume(np.zeros((4, 6, 6), dtype=np.float32), (1.0, 1.0, 1.0), (0, 0, 0), AXIAL, "CT")
    with pytest.raises(ValueError, match="2 output score"):
        model.predict(volume)


def test_registry_builds_a_torchscript_model_from_the_config(tmp_path: Path) -> None:
    path = write_torchscript(threshold_conv(-499.5), tmp_path / "threshold.ts")
    settings = load_settings_text(f"""
models:
  ts:
    type: torchscript
    path: {path}
    version: "2.0"
    modality: ct
    device: cpu
    timeout_s: 30
    labels:
      - {{value: 1, name: Tissue, snomed: {{value: "85756007", meaning: Tissue}}, color: [1, 2, 3]}}
    preprocessing: {{orientation: LPS}}
""")
    model = ModelRegistry(settings.models).get("ts")
    assert model.card.version == "2.0" and model.card.modality == "CT"
    assert model.card.segments[0].type == Code("85756007", "SCT", "Tissue")
    assert model.card.segments[0].color == (1, 2, 3)
    volume = _volume(AXIAL)
    np.testing.assert_array_equal(model.predict(volume).labelmap, volume.array > -499.5)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="TorchScript file .* not found"):
        TorchscriptModel(CARD, tmp_path / "absent.ts", PreprocessingSettings(), device="cpu")


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_affine_maps_voxel_indices_to_ras_positions() -> None:
    volume = _volume(SAGITTAL)
    affine = affine_ras(volume)
    z, y, x = 3, 5, 7
    steps = np.asarray(volume.direction) * np.asarray(volume.spacing)[:, None]
    lps = np.asarray(volume.origin) + z * steps[0] + y * steps[1] + x * steps[2]
    ras = affine @ np.array([x, y, z, 1.0])
    np.testing.assert_allclose(ras[:3], lps * np.array([-1, -1, 1]))


def test_registry_records_a_fingerprint_of_the_model_file(tmp_path: Path) -> None:
    """The weights' hash goes into every result (SoftwareVersions, algorithm parameters)."""
    from inference.registry import ModelRegistry

    first = write_torchscript(threshold_conv(0.0), tmp_path / "a.ts")
    second = write_torchscript(threshold_conv(1.0), tmp_path / "b.ts")
    settings = load_settings_text(
        "models:\n"
        f"  a: {{type: torchscript, path: '{first}', labels: [{{value: 1, name: T, snomed: {{value: '85756007', meaning: Tissue}}}}]}}\n"
        f"  b: {{type: torchscript, path: '{second}', labels: [{{value: 1, name: T, snomed: {{value: '85756007', meaning: Tissue}}}}]}}\n")
    registry = ModelRegistry(settings.models)
    a, b = registry.get("a").card.model_hash, registry.get("b").card.model_hash
    assert a.startswith("sha256:") and len(a) == 39
    assert a != b
    assert ModelRegistry(settings.models).get("a").card.model_hash == a  # deterministic
