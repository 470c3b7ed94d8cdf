"""What a managed environment will contain, planned from a bundle's metadata (nothing is installed here),
and what crosses the pipe to a model in another environment."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from dicom_node.settings import load_settings_text
from inference import wire
from inference.environments import plan_for, state_of
from inference.types import (
    Classification,
    Code,
    Detection,
    Measurement,
    ModelCard,
    Prediction,
    SegmentSpec,
    Task,
    Volume,
)


def _bundle(root: Path, metadata: dict[str, object], config: str = "{}", name: str = "inference.json") -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (root / "configs" / name).write_text(config)
    return root


def _spec(path: Path, extra: str = "") -> object:
    return load_settings_text(f"models: {{m: {{type: monai_bundle, path: {path}, environment: managed{extra}}}}}"
                              ).models["m"]


def test_plan_from_metadata(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "b", {
        "monai_version": "1.4.0", "pytorch_version": "2.4.0",
        "optional_packages_version": {"nibabel": "5.2.1", "torchvision": "0.19.0", "tensorboard": "2.17.0",
                                      "cucim-cu12": "24.6.0", "einops": "0.7.0"}},
        config='{"postprocessing": {"transforms": [{"_target_": "KeepLargestConnectedComponentd"}]}}')
    plan = plan_for("m", _spec(bundle), torch_release="2.13.0")
    assert plan.packages == ("einops==0.7.0", "monai==1.4.0", "nibabel==5.2.1", "scikit-image==0.26.0",
                             "torch==2.13.0", "torchvision==0.28.*")
    assert "built for torch 2.13.0 (the bundle lists 0.19.0)" in plan.reasons["torchvision"]
    assert any(item.startswith("tensorboard") for item in plan.left_out)
    assert any(item.startswith("cucim-cu12") and "CUDA-only" in item for item in plan.left_out)


def test_requirements_win_and_old_monai_gets_numpy_1(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "b", {"monai_version": "1.3.0", "optional_packages_version": {"einops": "0.6.1"}},
                     config="network_def: {}", name="inference.yaml")
    plan = plan_for("m", _spec(bundle, ", requirements: [einops==0.8.0, 'torch==2.14.1']"), torch_release="2.13.0")
    assert "einops==0.8.0" in plan.packages and "torch==2.14.1" in plan.packages
    assert "numpy<2" in plan.packages and "PyYAML==6.0.4" in plan.packages
    same = plan_for("n", _spec(bundle, ", requirements: [einops==0.8.0, 'torch==2.14.1']"), torch_release="2.13.0")
    assert same.key == plan.key  # keyed by contents, not by model name
    assert plan_for("m", _spec(bundle), torch_release="2.13.0").key != plan.key


def test_state_before_any_build(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "b", {"monai_version": "1.4.0"})
    state = state_of("m", _spec(bundle), tmp_path / "state")
    assert state.state == "missing" and "dicom-node models install m" in state.detail


def test_wire_round_trip_keeps_every_field() -> None:
    card = ModelCard("m", "2", task=Task.SEGMENTATION, modality="MR", model_hash="sha256:ab", classes=("x",),
                     segments=(SegmentSpec(300, "Structure", Code("1", "SCT", "A"), Code("2", "SCT", "B"),
                                           (1, 2, 3)),))
    prediction = Prediction(card, labelmap=np.arange(24, dtype=np.uint16).reshape(2, 3, 4),
                            measurements={300: (Measurement(Code("118565006", "SCT", "Volume"), 1.5,
                                                            Code("ml", "UCUM", "milliliter")),)},
                            classifications=(Classification("x", 0.25, False),),
                            detections=(Detection(0, 0.9, (1.0, 2.0, 3.0), (4.0, 5.0, 6.0)),), findings=("f",))
    stream = io.BytesIO()
    wire.send(stream, wire.prediction_out(prediction))
    stream.seek(0)
    back = wire.prediction_in(wire.receive(stream))
    assert back.card == card and back.measurements == prediction.measurements
    assert back.classifications == prediction.classifications and back.detections == prediction.detections
    np.testing.assert_array_equal(back.labelmap, prediction.labelmap)
    assert back.labelmap is not None and back.labelmap.dtype == np.uint16
    volume = Volume(np.ones((2, 3, 4, 5), np.float32), (1.0, 2.0, 3.0), (0.0, 1.0, 2.0), np.eye(3), "MR",
                    channels=("t1", "t2"))
    again = wire.volume_in(wire.volume_out(volume))
    assert again.channels == ("t1", "t2") and again.shape == (3, 4, 5)
    np.testing.assert_array_equal(again.array, volume.array)
