"""Small models written by the tests, in the formats operators deploy (no downloaded weights).

* :func:`threshold_conv` - a 1x1x1 convolution whose argmax is "intensity
  above a threshold": its output is known voxel by voxel, so a test can say
  exactly which source pixels must be in the mask.
* :func:`write_torchscript` - a network exported with ``torch.jit.script``.
* :func:`write_bundle` - a MONAI bundle directory in the standard layout
  (``configs/metadata.json``, ``configs/inference.json``, ``models/model.pt``)
  with the transforms a Model Zoo bundle has (``LoadImaged`` ...
  ``SaveImaged``).
* :data:`PYTHON_MODELS` - source of a module of ``type: python`` callables:
  threshold segmentation, classifier, and misbehaving models (raise, hang,
  kill their own process).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: SNOMED CT code used for the test segment ("Tissue"): a real code, whatever the test phantom is.
TISSUE = {"value": "85756007", "meaning": "Tissue"}


def threshold_conv(threshold: float, scale: float = 1.0) -> torch.nn.Conv3d:
    """Conv3d(1 -> 2, kernel 1): channel 1 minus channel 0 is ``2 * scale * (x - threshold)``."""
    conv = torch.nn.Conv3d(1, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([-scale, scale]).view(2, 1, 1, 1, 1))
        conv.bias.copy_(torch.tensor([scale * threshold, -scale * threshold]))
    return conv.eval()


class _GlobalClassifier(torch.nn.Module):
    """Scores ``[mean - c, c - mean]``: class 1 wins when the mean intensity is below ``c``."""

    def __init__(self, centre: float) -> None:
        super().__init__()
        self.centre = centre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3, 4))
        return torch.stack([m - self.centre, self.centre - m], dim=1)


def global_classifier(centre: float) -> torch.nn.Module:
    return _GlobalClassifier(centre).eval()


def write_torchscript(module: torch.nn.Module, path: Path) -> Path:
    """Export ``module`` with ``torch.jit.script`` to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(module).save(str(path))
    return path


def bundle_config(*, pixdim: tuple[float, float, float] | None, window: tuple[float, float],
                  network_def: dict[str, Any], roi_size: tuple[int, int, int] = (32, 32, 32)) -> dict[str, Any]:
    """An inference.json shaped like spleen_ct_segmentation's."""
    pre: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS",
         "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
    ]
    if pixdim is not None:
        pre.append({"_target_": "Spacingd", "keys": "image", "pixdim": list(pixdim), "mode": "bilinear"})
    pre += [
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": window[0], "a_max": window[1],
         "b_min": 0.0, "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"},
    ]
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data/none",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": pre},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(roi_size), "sw_batch_size": 2,
                    "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "meta_key_postfix": "meta_dict", "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "resample": False,
             "squeeze_end_dims": True},
        ]},
        "run": ["$print('the node never runs this')"],
    }


def write_bundle(root: Path, network: torch.nn.Module, network_def: dict[str, Any], *,
                 pixdim: tuple[float, float, float] | None, window: tuple[float, float] = (-1000.0, 1000.0),
                 channel_def: dict[str, str] | None = None, version: str = "0.3.1",
                 modality: str = "CT") -> Path:
    """Write a bundle directory (metadata, inference config, state dict) and return it."""
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "version": version,
        "monai_version": "1.3.0",
        "pytorch_version": "2.0.0",
        "numpy_version": "1.24.0",
        "name": "Test spleen segmentation",
        "task": "Segmentation of a bright structure",
        "description": "Test bundle written by the test suite",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": modality,
                                 "num_channels": 1, "spatial_shape": [32, 32, 32], "dtype": "float32",
                                 "value_range": [0, 1], "is_patch_data": True,
                                 "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                                 "spatial_shape": [32, 32, 32], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True,
                                 "channel_def": channel_def or {"0": "background", "1": "spleen"}}},
        },
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    config = bundle_config(pixdim=pixdim, window=window, network_def=network_def)
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    torch.save(network.state_dict(), str(root / "models" / "model.pt"))
    return root


def add_bundle_script(bundle: Path, module: str, source: str, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Give a bundle its own ``scripts/<module>.py`` (importable as ``scripts.<module>``, as a Model Zoo bundle's
    code is) and let ``edit`` change its ``configs/inference.json`` to use it."""
    scripts = bundle / "scripts"
    scripts.mkdir(exist_ok=True)
    if not (scripts / "__init__.py").exists():
        (scripts / "__init__.py").write_text("")
    (scripts / f"{module}.py").write_text(source)
    config_path = bundle / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    edit(config)
    config_path.write_text(json.dumps(config, indent=2))
    return bundle


CONV_DEF: dict[str, Any] = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1}
UNET_DEF: dict[str, Any] = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                            "channels": [4, 8], "strides": [2], "num_res_units": 0}


PYTHON_MODELS = '''
"""Test models for ``type: python`` (written by the test suite)."""
import os
import signal
import time

import numpy as np


def threshold(array, geometry):
    return (array > -499.5).astype(np.uint8)


def bright(array, geometry):
    return (array > 299.5).astype(np.uint8)


def two_blobs(array, geometry):
    out = np.zeros(array.shape, dtype=np.uint8)
    half = array.shape[2] // 2
    out[:, :, :half][array[:, :, :half] > -499.5] = 1
    out[:, :, half:][array[:, :, half:] > -499.5] = 2
    return out


def dark_fraction(array, geometry):
    p = float(np.mean(array < 0))
    return {"mostly dark": p, "mostly bright": 1.0 - p}


def raises(array, geometry):
    raise RuntimeError("deliberate failure in a test model")


def hangs(array, geometry):
    time.sleep(600)


def kills_itself(array, geometry):
    os.kill(os.getpid(), signal.SIGKILL)
'''


def write_python_models(directory: Path, module: str = "node_test_models") -> Path:
    """Write :data:`PYTHON_MODELS` as ``<directory>/<module>.py``; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{module}.py").write_text(PYTHON_MODELS)
    return directory


def write_shaped_bundle(root: Path, network_def: dict[str, Any], state_dict: dict[str, Any] | None, *,
                        outputs: dict[str, Any], config_format: str = "json", num_channels: int = 1,
                        scripts: dict[str, str] | None = None, monai_version: str = "1.3.0",
                        optional_packages: dict[str, str] | None = None, modality: str = "CT",
                        extra_config: dict[str, Any] | None = None,
                        postprocessing: list[dict[str, Any]] | None = None) -> Path:
    """A bundle in one of the shapes the Model Zoo has.

    ``outputs`` is ``network_data_format.outputs.pred`` (``channel_def`` or
    ``label_def``, or ``type: object`` for boxes); ``config_format`` is
    ``json`` or ``yaml``; ``scripts`` maps file names under ``scripts/`` to
    their source (the bundle's own package); ``state_dict`` ``None`` builds
    ``network_def`` and saves its (seeded) initial weights.
    """
    import yaml

    config = bundle_config(pixdim=None, window=(-1000.0, 1000.0), network_def=network_def)
    if postprocessing is not None:
        config["postprocessing"]["transforms"] = postprocessing
    config.update(extra_config or {})
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    for name, source in (scripts or {}).items():
        path = root / "scripts" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    if scripts and not (root / "scripts" / "__init__.py").exists():
        (root / "scripts" / "__init__.py").write_text("")
    metadata = {
        "version": "0.1.0", "monai_version": monai_version, "pytorch_version": "2.0.0",
        "optional_packages_version": optional_packages or {}, "description": "Test bundle of the suite",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "modality": modality, "num_channels": num_channels,
                                 "spatial_shape": [32, 32, 32]}},
            "outputs": {"pred": outputs},
        },
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    if config_format == "yaml":
        (root / "configs" / "inference.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    else:
        (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    if state_dict is None:
        import sys

        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(next((root / "configs").glob("inference.*"))))
        parser["bundle_root"] = str(root)
        sys.path.insert(0, str(root))
        try:
            torch.manual_seed(0)
            state_dict = parser.get_parsed_content("network_def").state_dict()
        finally:
            sys.path.remove(str(root))
            for module in [m for m in sys.modules if m.split(".", 1)[0] == "scripts"]:
                del sys.modules[module]
    torch.save(state_dict, str(root / "models" / "model.pt"))
    return root
