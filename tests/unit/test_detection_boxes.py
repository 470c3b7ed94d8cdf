"""Detection networks' boxes: TorchScript detectors, box outputs, and the SEG of the boxes' extents.

A scripted "detector" whose answer is computable (a box around the brightest
voxel of the image it is given, in that image's voxel coordinates) runs
behind reorienting and resampling preprocessing: the node must report the
box at the bright spot's patient position with its true size in mm, on any
acquisition direction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.errors import ConfigError
from dicom_node.settings import PreprocessingSettings, load_settings_text
from inference.boxes import with_box_segments
from inference.models.torchscript import TorchscriptModel, box_outputs
from inference.registry import ModelRegistry
from inference.types import Detection, ModelCard, Prediction, Task, Volume
from tests.models_factory import write_torchscript

CARD = ModelCard("det", "1.0", task=Task.DETECTION, classes=("Lung nodule", "Calcification"))

AXIAL = np.array([[0, 0, 1.0], [0, 1.0, 0], [1.0, 0, 0]])
SAGITTAL = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])
OBLIQUE = np.array([[0, np.sin(0.3), np.cos(0.3)], [0, np.cos(0.3), -np.sin(0.3)], [1.0, 0, 0]])


class Brightest(torch.nn.Module):
    """One box (cccwhd, 4 x 6 x 2 voxels) centred on the brightest voxel; score 0.9, class 1."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        volume = x[0, 0]
        flat = torch.argmax(volume.reshape(-1))
        size_y, size_z = volume.shape[1], volume.shape[2]
        centre = torch.stack([flat // (size_y * size_z), (flat // size_z) % size_y, flat % size_z]).float()
        box = torch.cat([centre, torch.tensor([4.0, 6.0, 2.0])]).reshape(1, 6)
        return {"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}


class TwoBoxesAsTuple(torch.nn.Module):
    """Fixed corner boxes (xyzxyz) as a tuple (boxes, scores): the first below any sensible threshold."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = torch.tensor([[1.0, 1.0, 1.0, 3.0, 3.0, 3.0], [2.0, 2.0, 2.0, 6.0, 8.0, 4.0]])
        return boxes, torch.tensor([0.1, 0.7])


def _blob(direction: np.ndarray, spot: tuple[int, int, int], shape: tuple[int, int, int] = (20, 30, 28),
          spacing: tuple[float, float, float] = (2.0, 0.8, 0.9)) -> tuple[Volume, np.ndarray]:
    """A smooth bright spot at voxel ``spot``; returns the volume and the spot's LPS position."""
    z, y, x = np.indices(shape, dtype=float)
    steps = direction * np.asarray(spacing)[:, None]
    grid = np.stack([z, y, x], axis=-1) @ steps
    origin = np.array([-40.0, 25.0, 60.0])
    centre = np.asarray(spot, dtype=float) @ steps
    array = 1000.0 * np.exp(-np.sum((grid - centre) ** 2, axis=-1) / (2 * 3.0**2)) - 500.0
    return Volume(array.astype(np.float32), spacing, tuple(origin), direction, "CT"), origin + centre


#: The box's extents in patient axes: 4 x 6 x 2 mm along the resampled image's axes, which are the patient's
#: for axial and sagittal images; an oblique image keeps its tilt (0.3 rad about x), so its box's axis-aligned
#: extent is that of the tilted box.
TILTED_SIZE = (4.0, 6 * np.cos(0.3) + 2 * np.sin(0.3), 6 * np.sin(0.3) + 2 * np.cos(0.3))


@pytest.mark.parametrize(("direction", "size"), [(AXIAL, (4.0, 6.0, 2.0)), (SAGITTAL, (4.0, 6.0, 2.0)),
                                                 (OBLIQUE, TILTED_SIZE)], ids=["axial", "sagittal", "oblique"])
def test_torchscript_detector_boxes_land_on_the_spot_with_their_size_in_mm(tmp_path: Path, direction: np.ndarray,
                                                                           size: tuple[float, float, float]) -> None:
    path = write_torchscript(Brightest(), tmp_path / "det.ts")
    model = TorchscriptModel(CARD, path, PreprocessingSettings(orientation="RAS", spacing=(1.0, 1.0, 1.0)),
                             device="cpu", box_mode="cccwhd", threshold=0.5)
    volume, spot = _blob(direction, (9, 14, 12))
    (found,) = model.predict(volume).detections
    assert found.label == 1 and found.score == pytest.approx(0.9)
    # RAS resampled at 1 mm: the brightest voxel is within half a voxel diagonal of the spot.
    assert np.linalg.norm(np.asarray(found.center) - spot) < 1.0, (found.center, spot)
    # 4 x 6 x 2 voxels of 1 mm (a flip of R/A to L/P changes no size).
    assert found.size == pytest.approx(size, abs=1e-4)


def test_box_modes_thresholds_and_counts(tmp_path: Path) -> None:
    path = write_torchscript(TwoBoxesAsTuple(), tmp_path / "two.ts")
    volume = Volume(np.zeros((10, 12, 12), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), AXIAL, "CT")
    model = TorchscriptModel(CARD, path, PreprocessingSettings(orientation=None), device="cpu", threshold=0.05)
    found = model.predict(volume).detections
    assert [d.score for d in found] == pytest.approx([0.7, 0.1])  # best first
    assert found[0].label == 0  # no labels returned: the first class
    # Without orientation the image is the node's [x, y, z] array (origin 0, 1 mm): corners (2, 2, 2)-(6, 8, 4).
    assert found[0].size == pytest.approx((4.0, 6.0, 2.0))
    assert found[0].center == pytest.approx((4.0, 5.0, 3.0))
    assert len(TorchscriptModel(CARD, path, PreprocessingSettings(orientation=None), device="cpu",
                                threshold=0.5).predict(volume).detections) == 1
    assert len(TorchscriptModel(CARD, path, PreprocessingSettings(orientation=None), device="cpu",
                                threshold=0.0, max_detections=1).predict(volume).detections) == 1


@pytest.mark.parametrize("out", [
    {"boxes": torch.zeros(2, 6), "scores": torch.tensor([0.5, 0.6]), "labels": torch.tensor([0, 1])},
    [{"box": torch.zeros(2, 6), "label_scores": torch.tensor([0.5, 0.6]), "label": torch.tensor([0, 1])}],
    (torch.zeros(2, 6), torch.tensor([0.5, 0.6]), torch.tensor([0, 1])),
], ids=["dict", "monai-list", "tuple"])
def test_box_outputs_read_the_forms_detectors_return(out: object) -> None:
    boxes, labels, scores = box_outputs(out, "det")
    assert boxes.shape == (2, 6) and labels.tolist() == [0, 1] and scores.tolist() == pytest.approx([0.5, 0.6])


@pytest.mark.parametrize(("out", "message"), [
    (torch.zeros(2, 6), "must return a dict"),
    ({"boxes": torch.zeros(2, 6)}, "'boxes' and 'scores' are needed"),
    ({"boxes": torch.zeros(2, 5), "scores": torch.zeros(2)}, r"not \(n, 6\)"),
])
def test_box_outputs_say_what_is_wrong(out: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        box_outputs(out, "det")


def test_a_bad_label_or_score_names_the_box(tmp_path: Path) -> None:
    class BadLabel(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"boxes": torch.tensor([[1.0, 1.0, 1.0, 2.0, 2.0, 2.0]]), "scores": torch.tensor([0.9]),
                    "labels": torch.tensor([5])}

    path = write_torchscript(BadLabel(), tmp_path / "bad.ts")
    volume = Volume(np.zeros((4, 4, 4), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), AXIAL, "CT")
    with pytest.raises(ValueError, match="box 0 label 5 is not the index of one of its classes"):
        TorchscriptModel(CARD, path, PreprocessingSettings(), device="cpu").predict(volume)


def test_settings_of_torchscript_detection(tmp_path: Path) -> None:
    path = write_torchscript(Brightest(), tmp_path / "det.ts")
    base = f"models:\n  det:\n    type: torchscript\n    path: {path}\n    task: detection\n    device: cpu\n"
    settings = load_settings_text(base + "    classes: [Lung nodule]\n    box_mode: cccwhd\n    box_seg: true\n"
                                         "    max_detections: 5\n    threshold: 0.3\n")
    model = ModelRegistry(settings.models).get("det")
    assert isinstance(model, TorchscriptModel) and model.box_mode == "cccwhd" and model.max_detections == 5
    for extra, message in [
        ("", "a detection model needs at least one entry in classes"),
        ("    classes: [a]\n    preprocessing: {roi_size: [8, 8, 8]}\n", "preprocessing.roi_size"),
        ("    classes: [a]\n    box_mode: ccwhd\n", "box_mode"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_settings_text(base + extra)
    with pytest.raises(ConfigError, match="box_seg .* is for task: detection"):
        load_settings_text("models:\n  s:\n    type: python\n    callable: m:f\n    box_seg: true\n"
                           "    labels: [{value: 1, name: Liver, snomed: {value: '10200004', meaning: Liver}}]\n")


def test_box_segments_hold_the_voxels_inside_each_box_best_score_first() -> None:
    volume = Volume(np.zeros((20, 40, 40), np.float32), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), OBLIQUE, "CT")
    steps = OBLIQUE * np.asarray(volume.spacing)[:, None]
    centres = [np.array([10, 20, 20]) @ steps, np.array([10, 24, 20]) @ steps]
    prediction = Prediction(card=CARD, detections=(
        Detection(0, 0.6, tuple(centres[0]), (12.0, 10.0, 10.0)),  # type: ignore[arg-type]
        Detection(1, 0.8, tuple(centres[1]), (6.0, 6.0, 6.0)),  # type: ignore[arg-type]
        Detection(0, 0.7, (5.0, 5.0, 200.0), (0.1, 0.1, 0.1)),  # outside the grid: an empty segment
    ))
    boxed = with_box_segments(prediction, volume)
    assert boxed.labelmap is not None and boxed.labelmap.shape == volume.shape
    assert [s.name for s in boxed.card.segments] == ["Calcification 1", "Lung nodule 2", "Lung nodule 3"]
    assert boxed.card.segments[1].type.value == "27925004" and boxed.card.segments[1].site is not None
    assert boxed.card.segments[0].type.scheme == "99DCMNODE"  # no code in the table: private
    assert [d.score for d in boxed.detections] == [0.8, 0.7, 0.6]
    points = np.indices(volume.shape).reshape(3, -1).T @ steps
    for value, item in ((1, boxed.detections[0]), (3, boxed.detections[2])):
        inside = np.all(np.abs(points - np.asarray(item.center)) <= np.asarray(item.size) / 2 + 1e-6, axis=1)
        got = (boxed.labelmap.reshape(-1) == value)
        if value == 1:
            np.testing.assert_array_equal(got, inside)  # the best box is whole
        else:
            best = boxed.labelmap.reshape(-1) == 1
            np.testing.assert_array_equal(got, inside & ~best)  # the other keeps what the best leaves
    assert not np.any(boxed.labelmap == 2)


def test_a_box_smaller_than_a_voxel_keeps_its_centre_voxel() -> None:
    volume = Volume(np.zeros((5, 8, 8), np.float32), (3.0, 2.0, 2.0), (0.0, 0.0, 0.0), AXIAL, "CT")
    prediction = Prediction(card=CARD, detections=(Detection(0, 0.9, (4.4, 6.1, 5.9), (0.5, 0.5, 0.5)),))
    boxed = with_box_segments(prediction, volume)
    assert boxed.labelmap is not None
    assert list(zip(*np.nonzero(boxed.labelmap))) == [(2, 3, 2)]  # nearest: z = 5.9 / 3, y = 6.1 / 2, x = 4.4 / 2
