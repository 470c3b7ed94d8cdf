"""Every shape a Model Zoo bundle comes in runs as written.

json and yaml configs; labels named ``channel_def`` or ``label_def``; 100+
labels; a bundle's own ``scripts/`` package, one per bundle even when two
bundles ship a package of the same name; a ``channel_def`` that is not the
label values (overlapping sigmoid regions, as BraTS); several input
channels; and a detection bundle whose own inferer and box transforms run.
The networks are tiny and their outputs known voxel by voxel.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dicom_node.settings import load_settings_text
from inference.models.monai_bundle import MonaiBundleModel
from inference.registry import ModelRegistry
from inference.types import Volume
from tests.models_factory import CONV_DEF, threshold_conv, write_shaped_bundle

AXIAL = np.array([[0, 0, 1.0], [0, 1.0, 0], [1.0, 0, 0]])
INVERT = {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
          "nearest_interp": True, "to_tensor": True}
ARGMAX = {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}


def _volume(seed: int = 0, shape: tuple[int, int, int] = (8, 20, 22)) -> Volume:
    array = np.random.default_rng(seed).integers(-1000, 1000, size=shape).astype(np.float32)
    return Volume(array, (2.5, 0.8, 0.9), (-10.0, 20.0, 30.0), AXIAL, "CT")


def _spec(bundle: Path, extra: str = "") -> Any:
    return load_settings_text(f"models: {{b: {{type: monai_bundle, path: {bundle}, device: cpu{extra}}}}}").models["b"]


def _segmentation(names: dict[str, str], key: str = "channel_def") -> dict[str, Any]:
    return {"type": "image", "format": "segmentation", "num_channels": len(names), key: names}


def test_yaml_config_and_label_def(tmp_path: Path) -> None:
    """pediatric_abdominal_ct_segmentation's shape: inference.yaml, labels under label_def."""
    volume = _volume()
    bundle = write_shaped_bundle(tmp_path / "b", CONV_DEF, threshold_conv(0.25025, scale=10.0).state_dict(),
                                 outputs=_segmentation({"0": "background", "1": "liver"}, "label_def"),
                                 config_format="yaml", postprocessing=[ARGMAX, INVERT])
    assert (bundle / "configs" / "inference.yaml").is_file()
    model = MonaiBundleModel("b", bundle, _spec(bundle))
    assert [(s.label, s.name, s.type.value) for s in model.card.segments] == [(1, "Liver", "10200004")]
    labelmap = model.predict(volume).labelmap
    np.testing.assert_array_equal(labelmap, (volume.array > -499.5).astype(np.uint8))


NET_SOURCE = '''
import torch


class Net(torch.nn.Module):
    """Two channels: channel 1 wins where the scaled intensity is {cmp} 0.5."""

    def forward(self, x):
        score = (x - 0.5) * {sign}
        return torch.cat([-score, score], dim=1)
'''

POST_SOURCE = '''
import torch


class Relabeld:
    """Give the foreground this bundle's label value (read from scripts.table at call time)."""

    def __init__(self, keys):
        self.keys = keys

    def __call__(self, data):
        from scripts.table import LABEL  # imported during predict, not at load

        data = dict(data)
        data[self.keys] = data[self.keys] * LABEL
        return data
'''


def _scripts_bundle(root: Path, sign: float, label: int, names: dict[str, str]) -> Path:
    return write_shaped_bundle(
        root, {"_target_": "scripts.net.Net"}, None, outputs=_segmentation(names),
        scripts={"net.py": NET_SOURCE.format(cmp="above" if sign > 0 else "below", sign=sign),
                 "post.py": POST_SOURCE, "table.py": f"LABEL = {label}\n"},
        postprocessing=[ARGMAX, INVERT, {"_target_": "scripts.post.Relabeld", "keys": "pred"}])


def test_bundle_scripts_are_imported_per_bundle(tmp_path: Path) -> None:
    """renalStructures_UNEST's shape: network and transforms from the bundle's own scripts/; two such bundles."""
    bright = _scripts_bundle(tmp_path / "bright", 1.0, 1, {"0": "background", "1": "liver"})
    dark = _scripts_bundle(tmp_path / "dark", -1.0, 2, {"0": "background", "1": "spleen", "2": "kidney"})
    specs = load_settings_text(f"""
models:
  bright: {{type: monai_bundle, path: {bright}, device: cpu}}
  dark: {{type: monai_bundle, path: {dark}, device: cpu}}
""").models
    registry = ModelRegistry(specs)
    before = {m for m in sys.modules if m.split(".", 1)[0] == "scripts"}
    volume = _volume(3)
    above = volume.array > 0.0  # window [-1000, 1000] -> [0, 1]: 0.5 is 0 HU
    for name in ("bright", "dark", "bright", "dark"):  # both loaded, used in turn
        labelmap = registry.get(name).predict(volume).labelmap
        assert labelmap is not None
        if name == "bright":
            np.testing.assert_array_equal(labelmap, above.astype(np.uint8))
        else:
            np.testing.assert_array_equal(labelmap, np.where(volume.array < 0.0, 2, 0).astype(np.uint8))
    assert {m for m in sys.modules if m.split(".", 1)[0] == "scripts"} == before, "bundle modules leaked"




@pytest.mark.parametrize("labels", [104, 132, 299])
def test_a_hundred_labels_and_more(tmp_path: Path, labels: int) -> None:
    """wholeBody_ct_segmentation (105 channels) and wholeBrainSeg (133); 300 needs 16-bit label maps."""
    conv = torch.nn.Conv3d(1, labels + 1, kernel_size=1)
    with torch.no_grad():  # argmax_c (c * x * N - c^2 / 2) = round(x * N): intensity bins
        c = torch.arange(labels + 1, dtype=torch.float32)
        conv.weight.copy_((c * labels).view(-1, 1, 1, 1, 1))
        conv.bias.copy_(-(c ** 2) / 2)
    names = {"0": "background", **{str(i): f"structure {i}" for i in range(1, labels + 1)}}
    network_def = {**CONV_DEF, "out_channels": labels + 1}
    bundle = write_shaped_bundle(tmp_path / "b", network_def, conv.state_dict(), outputs=_segmentation(names),
                                 postprocessing=[ARGMAX, INVERT])
    model = MonaiBundleModel("b", bundle, _spec(bundle))
    assert len(model.card.segments) == labels
    volume = _volume(5)
    labelmap = model.predict(volume).labelmap
    assert labelmap is not None
    expected = np.clip(np.rint((np.clip(volume.array, -1000, 1000) + 1000) / 2000 * labels), 0, labels)
    # float32 scores round a voxel near a half-bin either way: off by one there, exact elsewhere
    assert np.abs(labelmap.astype(int) - expected).max() <= 1 and np.mean(labelmap == expected) > 0.99
    assert labelmap.dtype == (np.uint16 if labels > 255 else np.uint8)
    assert int(labelmap.max()) >= labels - 1


def test_overlapping_region_channels_need_labels(tmp_path: Path) -> None:
    """brats_mri_segmentation's channel_def (Tumor core, Whole tumor, Enhancing tumor) is not the label values."""
    names = {"0": "Tumor core", "1": "Whole tumor", "2": "Enhancing tumor"}
    bundle = write_shaped_bundle(tmp_path / "b", CONV_DEF, threshold_conv(0.5).state_dict(),
                                 outputs=_segmentation(names), postprocessing=[ARGMAX, INVERT])
    with pytest.raises(ValueError, match="no background channel 0.*list those under labels"):
        MonaiBundleModel("b", bundle, _spec(bundle))
    labels = ", labels: [{value: 1, name: Enhancing, snomed: {value: '4147007', meaning: Mass}}]"
    model = ModelRegistry({"b": _spec(bundle, labels)}).get("b")
    assert [s.name for s in model.card.segments] == ["Enhancing"]
    assert model.predict(_volume()).labelmap is not None


PER_KEY_PRE = {"_target_": "Compose", "transforms": [
    {"_target_": "LoadImaged", "keys": ["a", "b", "label"]},
    {"_target_": "EnsureChannelFirstd", "keys": ["a", "b"]},
    {"_target_": "Orientationd", "keys": ["a", "b"], "axcodes": "RAS"},
    {"_target_": "ConcatItemsd", "keys": ["a", "b"], "name": "image"},
    {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1000.0, "a_max": 1000.0, "b_min": 0.0,
     "b_max": 1.0, "clip": True}]}


@pytest.mark.parametrize("loading", ["one key", "a key per channel"])
def test_several_input_channels(tmp_path: Path, loading: str) -> None:
    """A 2-channel bundle gets [c, x, y, z] (brats: one key, four files), or each channel under the bundle's
    own key (renalStructures_CECT: artery, vein, excret, concatenated by its own transform)."""
    conv = torch.nn.Conv3d(2, 2, kernel_size=1)
    with torch.no_grad():  # channel 1 wins where channel a is brighter than channel b
        conv.weight.copy_(torch.tensor([[-1.0, 1.0], [1.0, -1.0]]).view(2, 2, 1, 1, 1))
        conv.bias.zero_()
    invert = {**INVERT, "orig_keys": "a"} if loading != "one key" else INVERT
    bundle = write_shaped_bundle(tmp_path / "b", {**CONV_DEF, "in_channels": 2}, conv.state_dict(), num_channels=2,
                                 outputs=_segmentation({"0": "background", "1": "kidney"}),
                                 postprocessing=[ARGMAX, invert],
                                 extra_config={"preprocessing": PER_KEY_PRE} if loading != "one key" else None)
    one = _volume(1)
    two = _volume(2)
    stacked = Volume(np.stack([one.array, two.array]), one.spacing, one.origin, one.direction, "CT",
                     channels=("a", "b"))
    labelmap = MonaiBundleModel("b", bundle, _spec(bundle)).predict(stacked).labelmap
    np.testing.assert_array_equal(labelmap, (one.array > two.array).astype(np.uint8))


DETECTOR_SOURCE = '''
import torch
from monai.inferers import Inferer


class BrightBox(Inferer):
    """A stand-in detector: one box through the centres of the outermost voxels above 0.9 (xyzxyz indices)."""

    def __call__(self, inputs, network):
        out = []
        for image in inputs:
            idx = torch.nonzero(image[0] > 0.9)
            low, high = idx.min(dim=0).values.float(), idx.max(dim=0).values.float()
            out.append({"box": torch.cat([low, high])[None], "label": torch.tensor([0]),
                        "label_scores": torch.tensor([0.97])})
        return out
'''


def test_detection_bundle_boxes_in_patient_coordinates(tmp_path: Path) -> None:
    """lung_nodule_ct_detection's shape: the bundle's inferer, ClipBoxToImaged, AffineBoxToWorldCoordinated,
    ConvertBoxModed to cccwhd; the node reports the box in LPS mm."""
    volume = _volume(7, shape=(12, 24, 26))
    volume.array[:] = -500
    volume.array[3:6, 5:9, 10:16] = 950  # z 3..5, y 5..8, x 10..15
    post = [{"_target_": "ClipBoxToImaged", "box_keys": "box", "label_keys": "label", "box_ref_image_keys": "image",
             "remove_empty": True},
            {"_target_": "AffineBoxToWorldCoordinated", "box_keys": "box", "box_ref_image_keys": "image",
             "affine_lps_to_ras": True},
            {"_target_": "ConvertBoxModed", "box_keys": "box", "src_mode": "xyzxyz", "dst_mode": "cccwhd"}]
    bundle = write_shaped_bundle(
        tmp_path / "b", CONV_DEF, threshold_conv(0.5).state_dict(), postprocessing=post,
        outputs={"type": "object", "format": "dict", "num_channels": 1},
        scripts={"detector.py": DETECTOR_SOURCE}, extra_config={"inferer": {"_target_": "scripts.detector.BrightBox"}})
    model = MonaiBundleModel("b", bundle, _spec(bundle, ", classes: [Nodule]"))
    assert model.card.task == "detection"
    found = model.predict(volume).detections
    assert len(found) == 1 and found[0].score == pytest.approx(0.97) and model.card.classes == ("Nodule",)
    # The box runs through the centres of voxels (z, y, x) (3, 5, 10) and (5, 8, 15), whatever the
    # bundle's Orientationd flipped on the way (an edge-exclusive box would shift by half a voxel).
    steps = AXIAL * np.array(volume.spacing)[:, None]
    low = np.asarray(volume.origin) + np.array([3, 5, 10]) @ steps
    high = np.asarray(volume.origin) + np.array([5, 8, 15]) @ steps
    np.testing.assert_allclose(found[0].center, (low + high) / 2, atol=1e-3)
    np.testing.assert_allclose(found[0].size, np.abs(high - low), atol=1e-3)
