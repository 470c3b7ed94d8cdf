"""``type: python`` models: a plain function ``module:function``.

The function receives ``(array, geometry)``: a numpy array shaped
``(z, y, x)`` in modality units (HU for CT) and a dict with ``spacing``
``(dz, dy, dx)``, ``origin`` and ``direction`` (see :class:`inference.types.Volume`),
and ``device``, where it should compute (``"cuda:0"``, ``"cpu"``: its
``device`` setting, ``auto`` resolved; ``"cpu"`` when the node runs it on
the CPU after it ran out of GPU memory).
It returns a label map of the same shape (segmentation) or a mapping
``class name -> probability`` (classification).

Under a study rule (several series of one study, e.g. arterial and venous
phase) the function is called as ``func(arrays, geometries)`` instead: two
dicts keyed by the rule's role names (``study.series``), in the rule's order,
holding each series' array and geometry.  The first role is the *primary*
series: a label map must be on its grid (its shape), and the result objects
reference its instances.  The grids of the other series may differ; resampling
them is the function's business (their geometries say how).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from inference.types import (
    SCT_VOLUME,
    UCUM_ML,
    Classification,
    Detection,
    Measurement,
    Model,
    ModelCard,
    Prediction,
    Task,
    Volume,
    label_counts_by_slice,
)

logger = logging.getLogger(__name__)


def _source_stamp(module: Any) -> tuple[int, int] | None:
    file = getattr(module, "__file__", None)
    try:
        stat = os.stat(file) if file else None
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size) if stat else None


def _remember_source(module: Any) -> None:
    module.__dicom_node_source__ = _source_stamp(module)


def _changed_since_import(module: Any) -> bool:
    known = getattr(module, "__dicom_node_source__", None)
    return known is not None and known != _source_stamp(module)


def _reimport(name: str, module: Any) -> Any:
    """Execute ``module``'s own source file again (not whatever ``sys.path`` finds first by that name)."""
    old = module.__spec__
    spec = importlib.util.spec_from_file_location(name, old.origin,
                                                  submodule_search_locations=old.submodule_search_locations)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {name!r} again from {old.origin}")
    fresh = importlib.util.module_from_spec(spec)
    sys.modules[name] = fresh
    try:
        spec.loader.exec_module(fresh)
    except BaseException:
        sys.modules[name] = module
        raise
    return fresh


def load_callable(spec: str, path: str | None = None) -> Callable[..., Any]:
    """Import ``"package.module:function"``; ``path`` is prepended to ``sys.path`` first.

    Raises
    ------
    ValueError
        If the spec is not ``module:function`` or the attribute is not callable.
    ImportError
        If the module cannot be imported, or a module of that name is
        already loaded from another folder (another model's).

    A module whose source file changed since it was imported is reloaded.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"callable {spec!r} must look like 'package.module:function'")
    path = str(path) if path else None  # settings give a Path; sys.path only honours str entries
    module = sys.modules.get(module_name)
    if module is not None and path:
        loaded = Path(getattr(module, "__file__", None) or "").resolve()
        if not loaded.is_relative_to(Path(path).resolve()):
            # Python keeps one module per name: a second model's function would silently be the first's.
            raise ImportError(f"module {module_name!r} is already loaded from {loaded}, not from {path}: "
                              "python models in different folders need different module names")
    if path and path not in sys.path:
        sys.path.insert(0, path)
    if module is not None and _changed_since_import(module):
        module = _reimport(module_name, module)  # the source changed (new fingerprint): run the new code
    else:
        module = importlib.import_module(module_name)
    _remember_source(module)
    func = module
    for part in attr.split("."):
        func = getattr(func, part)
    if not callable(func):
        raise ValueError(f"{spec!r} is not callable")
    return func  # type: ignore[return-value]


class PythonModel(Model):
    """Adapter from a plain function to the :class:`~inference.types.Model` interface.

    Parameters
    ----------
    card:
        Model card built from the config (labels or classes, version).
    func:
        The user's function.
    threshold:
        For classification: a class is positive when its probability >= threshold.
    """

    def __init__(self, card: ModelCard, func: Callable[..., Any], threshold: float = 0.5,
                 max_detections: int = 100, device: str = "auto") -> None:
        self.card = card
        self.func = func
        self.threshold = threshold
        self.max_detections = max_detections
        self.device = _device_name(device)

    takes_several_inputs = True

    def _geometry(self, volume: Volume) -> dict[str, Any]:
        return {**volume.geometry(), "device": self.device}

    def predict(self, volume: Volume) -> Prediction:
        return self._prediction(self.func(_writable(volume.array), self._geometry(volume)), volume)

    def predict_study(self, volumes: Mapping[str, Volume], primary: str) -> Prediction:
        """Call ``func(arrays, geometries)`` with every role's array and geometry; the primary role first.

        Raises
        ------
        KeyError
            If ``primary`` is not one of the roles.
        """
        if primary not in volumes:
            raise KeyError(f"primary role {primary!r} is not among the inputs ({', '.join(volumes)})")
        roles = [primary, *(r for r in volumes if r != primary)]
        out = self.func({r: _writable(volumes[r].array) for r in roles}, {r: self._geometry(volumes[r]) for r in roles})
        return self._prediction(out, volumes[primary], f" (the grid of the primary series {primary!r})")

    def _prediction(self, out: Any, volume: Volume, grid: str = "") -> Prediction:
        if self.card.task is Task.DETECTION:
            return Prediction(card=self.card, detections=detections_from(out, self.card, self.threshold,
                                                                         self.max_detections))
        if self.card.task is Task.CLASSIFICATION:
            if not isinstance(out, Mapping):
                raise TypeError(f"classification model {self.card.name} must return a dict "
                                f"class -> probability, got {type(out).__name__}")
            return Prediction(card=self.card, classifications=tuple(
                Classification(str(k), float(v), float(v) >= self.threshold) for k, v in out.items()))
        labelmap = np.asarray(out)
        if labelmap.shape != volume.shape:
            raise ValueError(f"model {self.card.name} returned shape {labelmap.shape}, "
                             f"expected {volume.shape} (z, y, x){grid}")
        known = {s.label for s in self.card.segments}
        unknown = set(np.unique(labelmap).tolist()) - known - {0}
        if unknown:
            raise ValueError(f"model {self.card.name} returned labels {sorted(unknown)} "
                             f"not declared in its labels")
        labelmap = labelmap.astype(np.uint16 if max(known, default=0) > 255 else np.uint8)
        return Prediction(card=self.card, labelmap=labelmap,
                          measurements=segment_volumes(labelmap, self.card, volume))


def _device_name(setting: str) -> str:
    """A python model's device: its setting, ``auto`` resolved (the worker's GPU when torch sees one)."""
    if setting != "auto":
        return setting
    try:
        import torch
    except ImportError:  # a model environment without torch
        return "cpu"
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def _writable(array: np.ndarray) -> np.ndarray:
    """The array a function may change in place, as on one host (a Ray actor receives a read-only view)."""
    return array if array.flags.writeable else array.copy()


def segment_volumes(labelmap: np.ndarray, card: ModelCard, volume: Volume) -> dict[int, tuple[Measurement, ...]]:
    """Volume in ml of every present segment (true voxel volume, sheared grids included)."""
    voxel_ml = volume.voxel_volume_ml
    per_slice = label_counts_by_slice(labelmap)
    counts = per_slice.sum(axis=0) if per_slice is not None else np.bincount(labelmap.ravel().astype(np.int64))
    out: dict[int, tuple[Measurement, ...]] = {}
    for seg in card.segments:
        n = int(counts[seg.label]) if seg.label < len(counts) else 0
        if n:
            out[seg.label] = (Measurement(SCT_VOLUME, n * voxel_ml, UCUM_ML),)
    return out


def detections_from(out: Any, card: ModelCard, threshold: float, limit: int) -> tuple[Detection, ...]:
    """A detection model's boxes: ``[{"center": [x, y, z], "size": [x, y, z], "score": p, "class": name}, ...]``.

    Centre and size are in patient coordinates (LPS, mm; the geometry dict's
    ``affine`` maps voxel indices there); ``class`` is one of the card's
    classes (or ``label``, its index).  Boxes below ``threshold`` are
    dropped; the best ``limit`` are kept.

    Raises
    ------
    TypeError, ValueError
        For anything else, naming the box.
    """
    if not isinstance(out, list | tuple):
        raise TypeError(f"detection model {card.name} must return a list of boxes, got {type(out).__name__}")
    found = []
    for i, box in enumerate(out):
        if not isinstance(box, Mapping):
            raise TypeError(f"detection model {card.name}: box {i} is a {type(box).__name__}, not a dict")
        try:
            center = tuple(float(v) for v in box["center"])
            size = tuple(float(v) for v in box["size"])
            score = float(box["score"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"detection model {card.name}: box {i} needs center [x, y, z], size [x, y, z] (mm) "
                             f"and score ({exc})") from None
        if "class" in box:
            if box["class"] not in card.classes:
                raise ValueError(f"detection model {card.name}: box {i} class {box['class']!r} is not one of "
                                 f"{list(card.classes)}")
            label = card.classes.index(box["class"])
        else:
            label = int(box.get("label", 0))
            if not 0 <= label < len(card.classes):
                raise ValueError(f"detection model {card.name}: box {i} label {label} is not a class index")
        if len(center) != 3 or len(size) != 3 or not all(np.isfinite(center + size)) or min(size) <= 0:
            raise ValueError(f"detection model {card.name}: box {i} needs three finite coordinates and a positive "
                             f"size (got center {center}, size {size})")
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"detection model {card.name}: box {i} score {score} is not in [0, 1]")
        if score >= threshold:
            found.append(Detection(label, score, center, size))  # type: ignore[arg-type]
    found.sort(key=lambda d: -d.score)
    return tuple(found[:limit])
