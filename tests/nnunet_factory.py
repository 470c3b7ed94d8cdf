"""Tiny, valid nnU-Net v2 trained-model folders, built offline for the tests and the benchmark.

A folder as ``nnUNetv2_train`` leaves it: ``<Trainer>__<Plans>__<configuration>/`` with
``dataset.json``, ``plans.json`` and ``fold_N/checkpoint_final.pth``.  The JSON files are written
here; the checkpoint is written by :data:`BUILD_CHECKPOINT`, run with a Python that has nnunetv2
(the model's managed environment), which builds the network with nnU-Net's own trainer class from
the plans and saves its weights as nnU-Net's trainer saves them.

``computable=True`` gives a network without normalisation or non-linearity whose weights pass each
(normalised) input channel unchanged through the U-Net's top level, so that its logits are
``weights @ channels + bias`` at every voxel: the label map is then computable from the input, the
way the real-world checks elsewhere in the suite compare against a known answer.  Otherwise the
weights are nnU-Net's own random initialisation (instance norm, leaky ReLU), for timing.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TRAINER, PLANS, CONFIGURATION = "nnUNetTrainer", "nnUNetPlans", "3d_fullres"

BUILD_CHECKPOINT = r'''
import json, sys
from pathlib import Path

import torch
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
import nnunetv2

for folder, spec in json.loads(sys.argv[1]):
    folder = Path(folder)
    plans = PlansManager(json.loads((folder / "plans.json").read_text()))
    dataset = json.loads((folder / "dataset.json").read_text())
    configuration = plans.get_configuration(spec["configuration"])
    trainer = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"),
                                          spec["trainer"], "nnunetv2.training.nnUNetTrainer")
    inputs = determine_num_input_channels(plans, configuration, dataset)
    outputs = plans.get_label_manager(dataset).num_segmentation_heads
    torch.manual_seed(spec["seed"])
    network = trainer.build_network_architecture(plans, configuration, inputs, outputs, enable_deep_supervision=False)
    state = network.state_dict()
    weights = spec.get("logits")
    if weights is not None:  # the top level passes channel c through unchanged; logits = W @ x + b
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.zero_()
        state = network.state_dict()  # views of the parameters (aliased modules share them): set in place
        first = "encoder.stages.0.0.convs.0.conv.weight"
        decoder = f"decoder.stages.{len(network.decoder.stages) - 1}.convs.0.conv.weight"
        seg = f"decoder.seg_layers.{len(network.decoder.seg_layers) - 1}"
        width = state[first].shape[0]
        centre = tuple(k // 2 for k in state[first].shape[2:])
        for c in range(inputs):
            state[first][(c, c, *centre)] = 1.0
            state[decoder][(c, width + c, *centre)] = 1.0  # the skip comes after the upsampled features
        for k, (row, bias) in enumerate(zip(weights["matrix"], weights["bias"])):
            for c, w in enumerate(row):
                state[f"{seg}.weight"][(k, c, 0, 0, 0)] = w
            state[f"{seg}.bias"][k] = bias
    for fold in spec["folds"]:
        out = folder / f"fold_{fold}"
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"network_weights": network.state_dict(), "trainer_name": spec["trainer"],
                    "init_args": {"plans": plans.plans, "configuration": spec["configuration"], "fold": fold,
                                  "dataset_json": dataset},
                    "inference_allowed_mirroring_axes": (0, 1, 2)}, out / spec["checkpoint"])
    print(sum(p.numel() for p in network.parameters()))
'''


def _plans(name: str, spacing: Sequence[float], patch: Sequence[int], channels: int,
           intensities: Sequence[Mapping[str, float]], normalization: str, computable: bool,
           features: Sequence[int]) -> dict[str, Any]:
    stages = len(features)
    architecture: dict[str, Any] = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": stages, "features_per_stage": list(features),
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * stages,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (stages - 1),
            "n_conv_per_stage": [1 if computable else 2] * stages,
            "n_conv_per_stage_decoder": [1 if computable else 2] * (stages - 1),
            "conv_bias": True,
            "norm_op": None if computable else "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": None if computable else "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    resample = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": name, "plans_name": PLANS,
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": [64, 64, 64],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: {
            "data_identifier": f"{PLANS}_{CONFIGURATION}", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": [64, 64, 64],
            "spacing": list(spacing), "normalization_schemes": [normalization] * channels,
            "use_mask_for_norm": [False] * channels,
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resample,
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_seg_kwargs": {**resample, "is_seg": True, "order": 1},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {**resample, "order": 1},
            "architecture": architecture, "batch_dice": False,
        }},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {"max": i["upper"], "min": i["lower"], "mean": i.get("mean", 0.0), "median": i.get("mean", 0.0),
                     "std": i.get("std", 1.0), "percentile_00_5": i["lower"], "percentile_99_5": i["upper"]}
            for c, i in enumerate(intensities)},
    }


def prepare_nnunet_folder(root: Path, *, channels: Sequence[str], labels: Mapping[str, Any],
                        spacing: Sequence[float] = (2.5, 1.5, 1.5), patch: Sequence[int] = (16, 32, 32),
                        intensities: Sequence[Mapping[str, float]] | None = None,
                        logits: Mapping[str, Sequence[Any]] | None = None, folds: Sequence[int | str] = (0,),
                        normalization: str = "CTNormalization", features: Sequence[int] = (4, 8),
                        dataset: str = "Dataset901_Test", checkpoint: str = "checkpoint_final.pth",
                        extra_dataset: Mapping[str, Any] | None = None, seed: int = 0
                        ) -> tuple[Path, dict[str, Any]]:
    """Write a trained-model folder's JSON files under ``root``: ``(root/<Trainer>__<Plans>__<configuration>,
    the checkpoint's spec for build_checkpoints)``.

    ``logits`` (``{"matrix": [[w per channel] per class], "bias": [b per class]}``) makes the
    network computable (see the module docstring); ``intensities`` per channel are CT normalisation's
    ``lower``/``upper`` clip and ``mean``/``std`` (default: clip to [-1000, 3000], no scaling).
    """
    folder = root / dataset / f"{TRAINER}__{PLANS}__{CONFIGURATION}"
    folder.mkdir(parents=True, exist_ok=True)
    intensities = intensities or [{"lower": -1000.0, "upper": 3000.0}] * len(channels)
    description = {"channel_names": {str(i): name for i, name in enumerate(channels)}, "labels": dict(labels),
                   "numTraining": 1, "file_ending": ".nii.gz", **(extra_dataset or {})}
    (folder / "dataset.json").write_text(json.dumps(description, indent=2))
    plans = _plans(dataset, spacing, patch, len(channels), intensities, normalization, logits is not None, features)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    spec = {"configuration": CONFIGURATION, "trainer": TRAINER, "seed": seed, "folds": list(folds),
            "checkpoint": checkpoint, "logits": None if logits is None else dict(logits)}
    return folder, spec


def write_nnunet_folder(root: Path, python: Path | str, **kw: Any) -> Path:
    """:func:`prepare_nnunet_folder` and its checkpoint(s), built with ``python`` (one that has nnunetv2)."""
    folder, spec = prepare_nnunet_folder(root, **kw)
    build_checkpoints(python, [(folder, spec)])
    return folder


def build_checkpoints(python: Path | str, prepared: Sequence[tuple[Path, Mapping[str, Any]]]) -> None:
    """Write the checkpoints of folders from :func:`prepare_nnunet_folder`, all in one process (one import)."""
    built = subprocess.run([str(python), "-c", BUILD_CHECKPOINT, json.dumps([[str(f), s] for f, s in prepared])],
                           capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    if built.returncode != 0:
        raise RuntimeError(f"building the nnU-Net checkpoint failed:\n{built.stderr[-3000:]}")
