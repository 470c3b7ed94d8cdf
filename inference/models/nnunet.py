"""``type: nnunet``: a trained nnU-Net v2 model folder, run by nnunetv2's own predictor, kept warm.

The folder is the one nnU-Net's training writes, ``<Trainer>__<Plans>__<configuration>/``
with ``dataset.json``, ``plans.json`` and ``fold_N/<checkpoint>``.  The predictor is
``nnUNetPredictor.initialize_from_trained_model_folder`` (loaded once, every fold's
weights in memory), then ``predict_single_npy_array`` on the volume: nnU-Net's own
preprocessing (cropping, its normalisation from the plans, resampling to the plans'
spacing), sliding window with its Gaussian weighting and optional mirroring, and its
resampling back to the input grid.  The array goes in as ``(c, z, y, x)`` with the
spacing in the same order, as nnU-Net's SimpleITK reader gives it; nnU-Net does not
reorient, so the axes are the series' own unless ``orientation`` says which axis codes
the model was trained in.

Labels come from ``dataset.json`` (``{"background": 0, "liver": 1, ...}``), coded from
the node's anatomy table; a region-based model (labels that are lists of values, with
``regions_class_order``) writes nested regions, not one structure per value: it needs
``labels`` in the config saying what each written value is.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inference import anatomy
from inference.models.python_callable import segment_volumes
from inference.types import Model, ModelCard, Prediction, SegmentSpec, Task, Volume

logger = logging.getLogger(__name__)

#: Normalisation schemes whose input is CT numbers (HU): the model takes CT.
CT_SCHEMES = frozenset({"CTNormalization"})

_LPS = {"L": (1.0, 0.0, 0.0), "R": (-1.0, 0.0, 0.0), "P": (0.0, 1.0, 0.0), "A": (0.0, -1.0, 0.0),
        "S": (0.0, 0.0, 1.0), "I": (0.0, 0.0, -1.0)}


class NnunetFolderError(ValueError):
    """The folder is not a usable nnU-Net trained-model folder (the message says what is missing)."""


def read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``dataset.json`` and ``plans.json`` of a trained-model folder."""
    if not folder.is_dir():
        raise NnunetFolderError(f"nnU-Net model folder {folder} does not exist")
    missing = [name for name in ("dataset.json", "plans.json") if not (folder / name).is_file()]
    if missing:
        inner = sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "plans.json").is_file())
        hint = f"; it holds the trained-model folder(s) {', '.join(inner)}: give one of them as path" if inner else ""
        raise NnunetFolderError(f"nnU-Net model folder {folder} has no {' or '.join(missing)} (path is the "
                                f"<Trainer>__<Plans>__<configuration> folder nnU-Net's training writes){hint}")
    loaded = []
    for name in ("dataset.json", "plans.json"):
        with open(folder / name, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise NnunetFolderError(f"{folder / name} is not a JSON object")
        loaded.append(data)
    return loaded[0], loaded[1]


def available_folds(folder: Path, checkpoint: str) -> tuple[int | str, ...]:
    """Every ``fold_N`` (and ``fold_all``) of ``folder`` that holds ``checkpoint``."""
    found: list[int | str] = []
    for sub in sorted(folder.glob("fold_*")):
        tail = sub.name[len("fold_"):]
        if (sub / checkpoint).is_file() and (tail.isdigit() or tail == "all"):
            found.append(int(tail) if tail.isdigit() else tail)
    return tuple(sorted(found, key=lambda f: (isinstance(f, str), str(f).zfill(4))))


def segments_from_dataset(dataset: Mapping[str, Any], overrides: Sequence[SegmentSpec], model: str
                          ) -> tuple[SegmentSpec, ...]:
    """The segments of ``dataset.json``'s labels; ``overrides`` (from the config) win by value.

    Raises
    ------
    NnunetFolderError
        For region-based labels without overrides for every value written.
    """
    labels = dataset.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise NnunetFolderError(f"model {model}: dataset.json has no labels")
    by_value = {s.label: s for s in overrides}
    regions = {name: value for name, value in labels.items() if isinstance(value, list | tuple)}
    if regions:
        order = [int(v) for v in dataset.get("regions_class_order") or ()]
        missing = [v for v in order if v not in by_value]
        if missing or not order:
            raise NnunetFolderError(
                f"model {model}: dataset.json is region-based ({', '.join(f'{k}: {list(v)}' for k, v in regions.items())}"
                f"; regions_class_order {order}): each written value is the innermost region that holds the "
                f"voxel, not one structure. List what values {order} are under labels in the config")
        return tuple(by_value[v] for v in order)
    names: dict[int, str] = {}
    for name, value in labels.items():
        names[int(value)] = str(name)
    unknown = sorted(set(by_value) - set(names))
    if unknown:
        raise NnunetFolderError(f"model {model}: labels {unknown} of the config are not labels of "
                                f"dataset.json ({', '.join(f'{k}={v}' for k, v in labels.items())})")
    coded = anatomy.segments_for({v: n for v, n in names.items() if v not in by_value}, model)
    return tuple(sorted(coded + tuple(by_value[v] for v in by_value if v != 0), key=lambda s: s.label))


def _orientation(direction: np.ndarray, axcodes: str) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Permutation and flips taking a ``(z, y, x)`` array with ``direction`` rows to ``axcodes``.

    ``axcodes`` name where the image's x, y and z axes point (nibabel's
    convention: ``RAS`` means x towards the right, y anterior, z superior);
    in the ``(z, y, x)`` array the last axis is x.
    """
    targets = [np.array(_LPS[axcodes[2]]), np.array(_LPS[axcodes[1]]), np.array(_LPS[axcodes[0]])]
    rows = np.asarray(direction, dtype=float)
    order: list[int] = []
    flips: list[bool] = []
    for target in targets:
        scores = [abs(float(rows[a] @ target)) if a not in order else -1.0 for a in range(3)]
        axis = int(np.argmax(scores))
        order.append(axis)
        flips.append(float(rows[axis] @ target) < 0)
    return (order[0], order[1], order[2]), (flips[0], flips[1], flips[2])


def _runtime() -> str:
    parts = []
    for module in ("nnunetv2", "torch"):
        try:
            from importlib.metadata import version

            parts.append(f"{module} {version(module)}")
        except Exception:  # noqa: BLE001 - provenance only
            continue
    return ", ".join(parts)


class NnunetModel(Model):
    """A warm ``nnUNetPredictor`` for one trained-model folder.

    Parameters
    ----------
    name:
        The model's name in the config.
    spec:
        The ``models.<name>`` entry (duck-typed: path, folds, checkpoint,
        mirroring, tile_step, device, orientation, version, intended_use, modality).
    segments:
        Segments from the config's ``labels`` (override ``dataset.json`` by value).

    Raises
    ------
    NnunetFolderError
        The folder, its folds or its labels are unusable.
    ImportError
        nnunetv2 is not installed where this runs (the message says how to install it).
    """

    def __init__(self, name: str, spec: Any, segments: Sequence[SegmentSpec] = ()) -> None:
        folder = Path(spec.path).expanduser()
        dataset, plans = read_folder(folder)
        self.folder, self.dataset, self.plans = folder, dataset, plans
        checkpoint = str(getattr(spec, "checkpoint", "checkpoint_final.pth"))
        folds = tuple(spec.folds) if getattr(spec, "folds", None) else available_folds(folder, checkpoint)
        if not folds:
            raise NnunetFolderError(f"model {name}: no fold_N/{checkpoint} in {folder}")
        missing = [f for f in folds if not (folder / f"fold_{f}" / checkpoint).is_file()]
        if missing:
            raise NnunetFolderError(f"model {name}: {', '.join(f'fold_{f}/{checkpoint}' for f in missing)} not in "
                                    f"{folder} (trained folds: {', '.join(map(str, available_folds(folder, checkpoint))) or 'none'})")
        self.folds, self.checkpoint = folds, checkpoint
        channel_names = dataset.get("channel_names") or dataset.get("modality") or {}
        self.channel_names = tuple(str(channel_names[k]) for k in sorted(channel_names, key=int))
        if not self.channel_names:
            raise NnunetFolderError(f"model {name}: dataset.json has no channel_names")
        declared = tuple(getattr(spec, "channels", ()) or ())
        if len(self.channel_names) > 1 and len(declared) != len(self.channel_names):
            raise NnunetFolderError(
                f"model {name}: dataset.json has {len(self.channel_names)} input channels "
                f"({', '.join(self.channel_names)}); give channels: with the study rule's series for each, in "
                f"that order" + (f" (got {len(declared)})" if declared else ""))
        self.orientation = getattr(spec, "orientation", None)
        configuration, self.trainer, self.plans_name = self._identity(folder)
        self.configuration = configuration
        schemes = (plans.get("configurations", {}).get(configuration, {}) or {}).get("normalization_schemes") or []
        modality = str(getattr(spec, "modality", "") or "")
        if not modality and schemes and all(s in CT_SCHEMES for s in schemes):
            modality = "CT"  # CT normalisation clips CT numbers: anything else would be wrong input
        digest = hashlib.sha256()  # what defines the model's behaviour: its plans, labels and weights
        for path in [folder / "dataset.json", folder / "plans.json",
                     *(folder / f"fold_{f}" / checkpoint for f in folds)]:
            digest.update(path.name.encode())
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        self.checkpoint_hash = digest.hexdigest()[:16]
        provenance = (f"{self.trainer}__{self.plans_name}__{configuration}, folds {','.join(map(str, folds))}, "
                      f"{checkpoint} sha256:{self.checkpoint_hash}, mirroring {'on' if spec.mirroring else 'off'}, "
                      f"tile step {float(spec.tile_step):g}")
        self.card = ModelCard(
            name=name, version=str(getattr(spec, "version", None) or f"{plans.get('dataset_name', 'nnU-Net')} "
                                   f"{configuration}")[:64],
            family="Artificial Intelligence", task=Task.SEGMENTATION,
            intended_use=str(getattr(spec, "intended_use", "") or f"nnU-Net {plans.get('dataset_name', '')} "
                             f"({configuration})").strip(),
            modality=modality, segments=segments_from_dataset(dataset, segments, name),
            model_hash="sha256:" + digest.hexdigest()[:32], runtime=f"{_runtime()}; {provenance}")
        self.predictor = self._predictor(spec)
        logger.info("Model %s: nnU-Net %s loaded (%s)", name, folder.name, provenance)

    @staticmethod
    def _identity(folder: Path) -> tuple[str, str, str]:
        """(configuration, trainer, plans) from the folder's name, else from a checkpoint's record."""
        parts = folder.name.split("__")
        if len(parts) == 3:
            return parts[2], parts[0], parts[1]
        return "3d_fullres", "nnUNetTrainer", "nnUNetPlans"

    def _predictor(self, spec: Any) -> Any:
        try:
            import torch
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        except ImportError as exc:
            raise ImportError(
                f"model {self.card.name}: nnunetv2 is not installed in this Python ({exc}); give the model "
                f"environment: managed and run dicom-node models install {self.card.name}, or install the node's "
                "extra: pip install '.[nnunet]'") from exc
        device_name = str(getattr(spec, "device", "auto") or "auto")
        if device_name == "auto":
            device_name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device_name)
        predictor = nnUNetPredictor(tile_step_size=float(spec.tile_step), use_gaussian=True,
                                    use_mirroring=bool(spec.mirroring),
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(self.folder), use_folds=self.folds,
                                                       checkpoint_name=self.checkpoint)
        self.device = device
        return predictor

    def predict(self, volume: Volume) -> Prediction:
        array = volume.channel_first().astype(np.float32, copy=False)
        if array.shape[0] != len(self.channel_names):
            raise ValueError(f"model {self.card.name} takes {len(self.channel_names)} channel(s) "
                             f"({', '.join(self.channel_names)}), got {array.shape[0]}")
        spacing = np.asarray(volume.spacing, dtype=float)
        order, flips = (0, 1, 2), (False, False, False)
        if self.orientation:
            order, flips = _orientation(volume.direction, self.orientation)
            array = np.transpose(array, (0, *[a + 1 for a in order]))
            array = np.flip(array, axis=tuple(i + 1 for i, f in enumerate(flips) if f))
            spacing = spacing[list(order)]
        labels = self.predictor.predict_single_npy_array(np.ascontiguousarray(array),
                                                         {"spacing": [float(s) for s in spacing]}, None, None, False)
        labels = np.asarray(labels)
        if self.orientation:
            labels = np.flip(labels, axis=tuple(i for i, f in enumerate(flips) if f))
            labels = np.transpose(labels, np.argsort(order))
        top = max((s.label for s in self.card.segments), default=0)
        labelmap = np.ascontiguousarray(labels.astype(np.uint16 if top > 255 else np.uint8))
        if labelmap.shape != volume.shape:
            raise ValueError(f"nnU-Net returned a label map of shape {labelmap.shape} for a volume {volume.shape}")
        return Prediction(card=self.card, labelmap=labelmap,
                          measurements=segment_volumes(labelmap, self.card, volume))
