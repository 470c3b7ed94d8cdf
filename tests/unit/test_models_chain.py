"""Chains (segmentation, then a region expert) and the model-type configuration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_node.errors import ConfigError
from dicom_node.settings import load_settings_text
from inference.registry import ModelRegistry
from inference.types import Volume
from tests.models_factory import write_python_models

AXIAL = np.array([[0, 0, 1.0], [0, 1.0, 0], [1.0, 0, 0]])

LABELS = """
      - {value: 1, name: Right part, snomed: {value: "85756007", meaning: Tissue}}
      - {value: 2, name: Left part, snomed: {value: "85756007", meaning: Tissue}}"""


def _config(path: Path, then: str, extra: str = "") -> str:
    return f"""
models:
  regions:
    type: python
    callable: "node_test_models:two_blobs"
    path: {path}
    labels:{LABELS}
  bright:
    type: python
    callable: "node_test_models:bright"
    path: {path}
    labels: [{{value: 1, name: Bright spot, snomed: {{value: "85756007", meaning: Tissue}}}}]
  dark:
    type: python
    callable: "node_test_models:dark_fraction"
    path: {path}
    task: classification
    classes: [mostly dark, mostly bright]
    threshold: 0.6
  chained:
    type: chain
    first: regions
    then: {then}
    version: "3"
{extra}"""


def _phantom() -> Volume:
    array = np.full((8, 20, 40), -1000.0, dtype=np.float32)
    array[2:6, 5:15, 4:14] = 0.0      # region 1 (x < 20)
    array[3:5, 8:12, 6:9] = 400.0     # a bright spot inside region 1
    array[1:7, 4:16, 24:36] = 100.0   # region 2 (x >= 20), no bright spot
    return Volume(array, (2.0, 1.0, 1.0), (5.0, -3.0, 7.0), AXIAL, "CT")


def test_segmentation_expert_labels_land_in_the_region_with_offset(tmp_path: Path) -> None:
    path = write_python_models(tmp_path / "models")
    model = ModelRegistry(load_settings_text(_config(path, "bright", "    margin_mm: 2")).models).get("chained")
    assert [s.label for s in model.card.segments] == [1, 2, 3]
    assert model.card.segments[2].name == "Bright spot"
    volume = _phantom()
    prediction = model.predict(volume)
    lm = prediction.labelmap
    assert lm is not None
    np.testing.assert_array_equal(lm == 3, volume.array > 299.5)
    assert np.count_nonzero(lm == 1) == np.count_nonzero(volume.array[:, :, :20] > -499.5) - 24
    assert np.count_nonzero(lm == 2) == np.count_nonzero(volume.array[:, :, 20:] > -499.5)
    assert set(prediction.measurements) == {1, 2, 3}


def test_classification_expert_reports_per_region(tmp_path: Path) -> None:
    path = write_python_models(tmp_path / "models")
    model = ModelRegistry(load_settings_text(_config(path, "dark", "    margin_mm: 0")).models).get("chained")
    volume = _phantom()
    result = model.predict(volume).classifications
    names = [c.name for c in result]
    assert names == ["Right part: mostly dark", "Right part: mostly bright",
                     "Left part: mostly dark", "Left part: mostly bright"]
    # With no margin the crop is the region's bounding box: region 2 is all 100 HU.
    assert result[2].probability == pytest.approx(0.0) and result[3].positive


def test_crop_keeps_patient_geometry(tmp_path: Path) -> None:
    from inference.models.chain import crop

    volume = _phantom()
    part = crop(volume, (slice(2, 6), slice(5, 15), slice(4, 14)))
    steps = np.asarray(volume.direction) * np.asarray(volume.spacing)[:, None]
    np.testing.assert_allclose(part.origin, np.asarray(volume.origin) + np.array([2, 5, 4]) @ steps)
    assert part.array.shape == (4, 10, 10)


def test_chain_regions_must_be_labels_of_the_first_model(tmp_path: Path) -> None:
    path = write_python_models(tmp_path / "models")
    settings = load_settings_text(_config(path, "bright", "    regions: [7]"))
    with pytest.raises(ValueError, match=r"regions \[7\] are not labels"):
        ModelRegistry(settings.models).get("chained")


@pytest.mark.parametrize(("extra", "message"), [
    ("  c2: {type: chain, first: nothing, then: bright}", "uses unknown model 'nothing'"),
    ("  c2: {type: chain, first: chained, then: bright}", "is itself a chain"),
    ("  c2: {type: chain, first: dark, then: bright}", "must be a segmentation model"),
    ("  c2: {type: chain, first: bright, then: bright}", "must be different models"),
])
def test_chain_config_errors_name_the_key(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings_text(_config(tmp_path, "bright") + extra)


@pytest.mark.parametrize(("entry", "message"), [
    ("{type: torchscript, path: m.ts}", "needs at least one entry in labels"),
    ("{type: torchscript, path: m.ts, task: classification, classes: [a], preprocessing: {window: [5, 1]}}",
     "low < high"),
    ("{type: torchscript, path: m.ts, task: classification, classes: [a], "
     "preprocessing: {roi_size: [8, 8, 8], spatial_size: [8, 8, 8]}}", "not both"),
    ("{type: torchscript, path: m.ts, task: classification, classes: [a], preprocessing: {orientation: RAR}}",
     "one of L/R, A/P and S/I"),
    ("{type: monai_bundle, path: b, device: gpu}", "device must be auto, cpu, cuda or cuda:N"),
    ("{type: monai_bundle, path: b, timeout_s: 0}", "greater than 0"),
    ("{type: python, callable: 'a:b', labels: [{value: 1, name: X, snomed: {value: '1', meaning: X}}], "
     "modality: 'C T'}", "DICOM Modality"),
    ("{type: onnx, path: m.onnx}", "unknown type 'onnx'"),
])
def test_model_config_errors(entry: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings_text(f"models:\n  m: {entry}\n")


def test_timeouts_are_per_model(tmp_path: Path) -> None:
    settings = load_settings_text("""
models:
  slow: {type: builtin, name: lungs-ct, timeout_s: 3600}
  quick: {type: python, callable: "m:f", task: classification, classes: [a], timeout_s: 5}
""")
    assert settings.models["slow"].timeout_s == 3600
    assert settings.models["quick"].timeout_s == 5
