"""``type: nnunet`` and ``type: merge`` without nnunetv2: the folder, its labels, folds, axes, the config.

What the node reads itself (dataset.json, plans.json, the fold folders) is checked here with files
written by the test; the predictor itself runs in tests/integration/test_nnunet.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dicom_node.errors import ConfigError
from dicom_node.settings import load_settings
from inference.environments import plan_for
from inference.models.merge import MergeModel
from inference.models.nnunet import NnunetFolderError, _orientation, available_folds, read_folder, segments_from_dataset
from inference.types import SCT_ANATOMICAL_STRUCTURE, Code, Model, ModelCard, Prediction, SegmentSpec, Task, Volume


def _folder(tmp: Path, labels: dict, **dataset: object) -> Path:
    folder = tmp / "Dataset001_X" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels, **dataset}))
    (folder / "plans.json").write_text(json.dumps({"dataset_name": "Dataset001_X", "configurations": {}}))
    return folder


def test_a_dataset_folder_instead_of_the_model_folder_is_named(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"background": 0, "liver": 1})
    with pytest.raises(NnunetFolderError, match="give one of them as path") as caught:
        read_folder(folder.parent)
    assert "nnUNetTrainer__nnUNetPlans__3d_fullres" in str(caught.value)
    with pytest.raises(NnunetFolderError, match="does not exist"):
        read_folder(tmp_path / "nowhere")


def test_folds_are_the_ones_holding_the_checkpoint(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"background": 0, "liver": 1})
    for fold, name in ((0, "checkpoint_final.pth"), (1, "checkpoint_best.pth"), (2, "checkpoint_final.pth"),
                       ("all", "checkpoint_final.pth")):
        (folder / f"fold_{fold}").mkdir()
        (folder / f"fold_{fold}" / name).write_bytes(b"x")
    assert available_folds(folder, "checkpoint_final.pth") == (0, 2, "all")
    assert available_folds(folder, "checkpoint_best.pth") == (1,)


def test_labels_come_coded_from_dataset_json_and_the_config_wins_by_value() -> None:
    dataset = {"labels": {"background": 0, "kidney_right": 2, "liver": 1, "lesion": 3}}
    custom = SegmentSpec(3, "Renal mass", Code("49755003", "SCT", "Morphologically Altered Structure"),
                         Code("300889004", "SCT", "Mass of kidney"))
    segments = segments_from_dataset(dataset, [custom], "m")
    assert [(s.label, s.name, s.type.value) for s in segments] == [
        (1, "Liver", "10200004"), (2, "Right kidney", "64033007"), (3, "Renal mass", "300889004")]
    assert segments[1].modifier is not None and segments[1].modifier.meaning == "Right"
    with pytest.raises(NnunetFolderError, match=r"labels \[7\] of the config are not labels"):
        segments_from_dataset(dataset, [SegmentSpec(7, "X", SCT_ANATOMICAL_STRUCTURE, Code("1", "SCT", "X"))], "m")


def test_region_based_labels_need_the_config_to_say_what_is_written() -> None:
    dataset = {"labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
               "regions_class_order": [1, 2, 3]}
    with pytest.raises(NnunetFolderError, match=r"region-based .* values \[1, 2, 3\]"):
        segments_from_dataset(dataset, [], "brats")
    given = [SegmentSpec(v, n, SCT_ANATOMICAL_STRUCTURE, Code(c, "SCT", n)) for v, n, c in
             ((1, "Edema", "79654002"), (2, "Necrosis", "6574001"), (3, "Enhancing", "86049000"))]
    assert [s.label for s in segments_from_dataset(dataset, given, "brats")] == [1, 2, 3]


@pytest.mark.parametrize(("direction", "axcodes", "order", "flips"), [
    ([[0, 0, 1], [0, 1, 0], [1, 0, 0]], "LPS", (0, 1, 2), (False, False, False)),
    ([[0, 0, 1], [0, 1, 0], [1, 0, 0]], "RAS", (0, 1, 2), (False, True, True)),
    ([[0, 1, 0], [0, 0, 1], [1, 0, 0]], "LPS", (1, 0, 2), (False, False, False)),  # sagittal-like stack
    ([[0, 0, -1], [0, 1, 0], [-1, 0, 0]], "RAS", (0, 1, 2), (True, True, False)),
])
def test_orientation_permutation_and_flips(direction: list, axcodes: str, order: tuple, flips: tuple) -> None:
    assert _orientation(np.array(direction, float), axcodes) == (order, flips)


def test_nnunet_and_merge_settings(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(f"""
models:
  organs: {{type: nnunet, path: {tmp_path}, folds: [0, 1, all], mirroring: false, tile_step: 0.75,
           orientation: ras, environment: managed}}
  more: {{type: nnunet, path: {tmp_path}}}
  total: {{type: merge, models: [organs, more], overlap: last}}
rules:
  - {{name: ct, when: {{Modality: CT}}, run: [total]}}
""")
    settings = load_settings(config)
    organs = settings.models["organs"]
    assert organs.folds == (0, 1, "all") and organs.orientation == "RAS" and not organs.mirroring
    assert settings.models["total"].models == ("organs", "more")
    assert "nnunetv2==2.8.1" in plan_for("organs", organs).packages
    for bad, key in (("folds: [x]", "folds"), ("tile_step: 0", "tile_step"), ("checkpoint: ../x.pth", "checkpoint"),
                     ("labels: [{value: 1, name: A, snomed: {value: '1', meaning: A}}, "
                      "{value: 1, name: B, snomed: {value: '2', meaning: B}}]", "duplicate label value")):
        config.write_text(f"models:\n  organs: {{type: nnunet, path: {tmp_path}, {bad}}}\n")
        with pytest.raises(ConfigError, match=key):
            load_settings(config)
    config.write_text(f"models:\n  a: {{type: nnunet, path: {tmp_path}}}\n  m: {{type: merge, models: [a, b]}}\n")
    with pytest.raises(ConfigError, match="merge 'm' uses unknown model 'b'"):
        load_settings(config)


class _Fixed(Model):
    def __init__(self, name: str, labels: dict[int, str], labelmap: np.ndarray) -> None:
        self.card = ModelCard(name=name, version="1", task=Task.SEGMENTATION, segments=tuple(
            SegmentSpec(v, n, SCT_ANATOMICAL_STRUCTURE, Code(str(v), "SCT", n)) for v, n in labels.items()))
        self.labelmap = labelmap

    def predict(self, volume: Volume) -> Prediction:
        return Prediction(self.card, self.labelmap)


def test_merge_renumbers_and_resolves_overlap() -> None:
    a = np.array([[[1, 2, 0, 0]]], np.uint8)
    b = np.array([[[0, 1, 1, 0]]], np.uint8)
    volume = Volume(np.zeros((1, 1, 4), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "CT")
    parts = [_Fixed("a", {1: "Spleen", 2: "Liver"}, a), _Fixed("b", {1: "Aorta"}, b)]
    first = MergeModel("m", "1", parts)
    assert [(s.label, s.name) for s in first.card.segments] == [(1, "Spleen"), (2, "Liver"), (3, "Aorta")]
    result = first.predict(volume)
    np.testing.assert_array_equal(result.labelmap, [[[1, 2, 3, 0]]])
    assert any("1 voxel(s) labelled by more than one model" in f for f in result.findings)
    np.testing.assert_array_equal(MergeModel("m", "1", parts, overlap="last").predict(volume).labelmap,
                                  [[[1, 3, 3, 0]]])
    with pytest.raises(ValueError, match="segment 'Spleen' is in both a and c"):
        MergeModel("m", "1", [parts[0], _Fixed("c", {4: "Spleen"}, a)])


def test_check_config_says_when_nnunetv2_is_missing_from_the_nodes_environment(tmp_path: Path) -> None:
    import importlib.util

    from inference.environments import state_of

    config = tmp_path / "node.yaml"
    config.write_text(f"models:\n  organs: {{type: nnunet, path: {tmp_path}}}\n")
    state = state_of("organs", load_settings(config).models["organs"], tmp_path)
    if importlib.util.find_spec("nnunetv2") is None:  # the node's own environment does not ship it
        assert state.state == "missing" and "dicom-node models install organs" in state.detail
    else:
        assert state.state == "ready"
