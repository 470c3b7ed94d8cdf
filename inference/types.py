"""Array-level types shared by every model family.

Nothing here knows about DICOM, SQLite or the network: a :class:`Volume` is a
numpy array plus its geometry, a :class:`Prediction` is what a model says
about it.  ``dicom_node.imaging`` and ``dicom_node.results`` translate between
these and DICOM.

Arrangement
-----------
Every 3D array is indexed ``[z, y, x]``: ``z`` is the slice index (sorted by
position along the slice normal, ascending), ``y`` the row and ``x`` the
column of the source image.  Spacing is given in the same order, in mm.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Up to this many labels a slice's counts are one comparison per label (faster), above it one bincount
#: (measured on 512x512 slices: 2 labels 33 vs 350 us, 8 labels 146 vs 293 us, 14 labels 376 vs 356 us).
_COMPARE_LABELS = 8


class Task(enum.StrEnum):
    """What a model produces."""

    SEGMENTATION = "segmentation"
    CLASSIFICATION = "classification"
    DETECTION = "detection"


@dataclass(frozen=True)
class Volume:
    """A 3D image in modality units (HU for CT) with its patient geometry.

    Parameters
    ----------
    array:
        ``float32`` array shaped ``(z, y, x)``.
    spacing:
        Voxel size ``(dz, dy, dx)`` in mm.  ``dz`` is the distance between
        consecutive slice positions, never the SliceThickness attribute.
    origin:
        Patient coordinates (LPS, mm) of the centre of voxel ``[0, 0, 0]``.
    direction:
        3x3 matrix whose *rows* are unit vectors (LPS) of the array axes in
        the order ``z, y, x``: row 0 is the direction of increasing ``z``
        (the slice normal, or for a gantry-tilted stack the actual step
        between slices: the grid is then sheared, not orthogonal), row 1
        the column direction (down the rows), row 2 the row direction
        (along a row).
    modality:
        DICOM Modality of the source (``"CT"``, ``"MR"``...), so a model can
        check its intended input.
    channels:
        For a multi-channel input (several series of one study on one grid,
        e.g. the MR sequences of a brain tumour model): the name of each
        channel, and ``array`` is ``(c, z, y, x)``.  Empty for one channel.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    modality: str = ""
    channels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.channels:
            if self.array.ndim != 4 or self.array.shape[0] != len(self.channels):
                raise ValueError(f"a Volume with channels {list(self.channels)} needs an array (c, z, y, x) "
                                 f"with c = {len(self.channels)}, got shape {self.array.shape}")
        elif self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3D (z, y, x), got shape {self.array.shape}")
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            raise ValueError(f"Volume spacing must be three positive numbers, got {self.spacing}")
        if np.asarray(self.direction).shape != (3, 3):
            raise ValueError("Volume direction must be a 3x3 matrix")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The grid ``(z, y, x)`` (without the channel axis)."""
        return tuple(int(n) for n in self.array.shape[-3:])  # type: ignore[return-value]

    def channel_first(self) -> np.ndarray:
        """The image as ``(c, z, y, x)`` (``c = 1`` for a one-channel volume)."""
        return self.array if self.channels else self.array[None]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (1 ml = 1000 mm^3).

        The determinant of the three axis steps, so a sheared (tilted) grid
        gives its true voxel volume, not ``dz * dy * dx``.
        """
        steps = np.asarray(self.direction, dtype=float) * np.asarray(self.spacing, dtype=float)[:, None]
        return abs(float(np.linalg.det(steps))) / 1000.0

    def geometry(self) -> dict[str, Any]:
        """Geometry as plain Python values (what ``python`` models receive)."""
        geometry: dict[str, Any] = {
            "spacing": tuple(float(s) for s in self.spacing),
            "origin": tuple(float(o) for o in self.origin),
            "direction": np.asarray(self.direction, dtype=float).tolist(),
        }
        if self.channels:
            geometry["channels"] = list(self.channels)  # the array is (c, z, y, x) in this order
        return geometry


@dataclass(frozen=True)
class Code:
    """A coded concept: (value, scheme, meaning), e.g. ``("39607008", "SCT", "Lung")``."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class SegmentSpec:
    """One label of a segmentation model.

    Parameters
    ----------
    label:
        Integer value of this segment in the label map (1..n).
    name:
        Human-readable segment label, e.g. ``"Right lung"``.
    category:
        SNOMED CT segmented property category, e.g. ``Code("123037004", "SCT", "Anatomical Structure")``.
    type:
        SNOMED CT segmented property type, e.g. ``Code("3341006", "SCT", "Right lung")``.
    color:
        Recommended display colour as RGB 0-255.
    modifier:
        Laterality or other modifier of ``type`` (SNOMED CT ``7771000`` Left,
        ``24028007`` Right), where the type concept itself has no side.
    site:
        Where a segment that is not itself anatomy lies (a cyst: its organ);
        ``modifier`` then qualifies the site.
    """

    label: int
    name: str
    category: Code
    type: Code
    color: tuple[int, int, int] = (255, 0, 0)
    modifier: Code | None = None
    site: Code | None = None


@dataclass(frozen=True)
class ModelCard:
    """What a model is: identity for provenance, and what its outputs mean."""

    name: str
    version: str
    family: str = "Artificial Intelligence"
    task: Task = Task.SEGMENTATION
    intended_use: str = ""
    modality: str = ""
    segments: tuple[SegmentSpec, ...] = ()
    classes: tuple[str, ...] = ()
    model_hash: str = ""
    """Digest of the weights or configuration that made the prediction, e.g.
    ``"sha256:9f86d0..."``; recorded in every result object (provenance).
    Empty when the model family cannot tell."""
    runtime: str = ""
    """Where it ran, for the record: e.g. ``"monai 1.4.0, torch 2.13.0 (managed environment 3f2a...)"``."""


@dataclass(frozen=True)
class Measurement:
    """A numeric result about one segment.

    ``concept`` names the quantity (e.g. ``Code("118565006", "SCT", "Volume")``),
    ``unit`` is a UCUM code (e.g. ``Code("ml", "UCUM", "milliliter")``).
    """

    concept: Code
    value: float
    unit: Code


@dataclass(frozen=True)
class Classification:
    """A classifier's answer: class name, its probability, and whether it passed the threshold."""

    name: str
    probability: float
    positive: bool


@dataclass(frozen=True)
class Detection:
    """One object found by a detection model: an axis-aligned box in patient coordinates.

    ``center`` and ``size`` are in mm along the patient axes (LPS), so the
    box is ``center +- size / 2``; ``label`` indexes ``ModelCard.classes``.
    """

    label: int
    score: float
    center: tuple[float, float, float]
    size: tuple[float, float, float]


@dataclass(frozen=True)
class Prediction:
    """What one model run produced for one :class:`Volume`.

    Parameters
    ----------
    card:
        The model card of the model that made it.
    labelmap:
        ``uint8``/``uint16`` array with the same shape and geometry as the input
        volume (``z, y, x``); 0 is background, values are ``SegmentSpec.label``.
        ``None`` for classification-only models.
    measurements:
        Per segment label, the measurements to report (volume, mean density...).
    classifications:
        Classifier outputs; empty for segmentation models.
    detections:
        Boxes of a detection model, best score first.
    findings:
        Free-text notes for the record (e.g. ``"no lungs found"``); never PHI.
    """

    card: ModelCard
    labelmap: np.ndarray | None = None
    measurements: dict[int, tuple[Measurement, ...]] = field(default_factory=dict)
    classifications: tuple[Classification, ...] = ()
    detections: tuple[Detection, ...] = ()
    findings: tuple[str, ...] = ()
    _slice_counts: list[np.ndarray | None] = field(default_factory=list, init=False, repr=False, compare=False)

    def slice_label_counts(self) -> np.ndarray | None:
        """Voxels of each label value on each slice, ``(z, max label + 1)``; one pass, kept for every output.

        ``None`` without a label map, or for one that is not an unsigned integer
        ``(z, y, x)`` array (the encoders check and report those).
        """
        if self.labelmap is None:
            return None
        if not self._slice_counts:
            self._slice_counts.append(label_counts_by_slice(self.labelmap))
        return self._slice_counts[0]

    def present_segments(self) -> tuple[SegmentSpec, ...]:
        """Segments of the card with at least one voxel in the label map."""
        if self.labelmap is None:
            return ()
        per_slice = self.slice_label_counts()
        if per_slice is None:
            labels = set(np.unique(self.labelmap).tolist())
            return tuple(s for s in self.card.segments if s.label in labels)
        counts = per_slice.sum(axis=0)
        return tuple(s for s in self.card.segments if 0 <= s.label < counts.shape[0] and counts[s.label])


def label_counts_by_slice(labelmap: np.ndarray) -> np.ndarray | None:
    """Voxels of each label value on each slice of a label map, ``(z, max label + 1)``.

    ``None`` for anything but an unsigned integer ``(z, y, x)`` array.
    Counting per slice (bincount casts its input to intp: slice by slice keeps
    that small) is several times faster than np.unique, which sorts or hashes
    every voxel, and than one bincount of the whole map (a 64-bit copy of it:
    0.2-0.4 s for 300 x 512x512); with a few labels, one comparison per label is
    faster still (10 ms instead of 52 ms for 200 x 512x512 with two labels: it
    is on the path from the model to the results).
    """
    if labelmap.dtype.kind != "u" or labelmap.ndim != 3 or labelmap.size == 0:
        return None
    length = int(labelmap.max()) + 1
    counts = np.zeros((labelmap.shape[0], length), dtype=np.int64)
    for z, plane in enumerate(labelmap.reshape(labelmap.shape[0], -1)):
        if not plane.any():  # an empty slice (most of a volume, often): only background
            counts[z, 0] = plane.size
        elif length - 1 <= _COMPARE_LABELS:
            for label in range(1, length):
                counts[z, label] = np.count_nonzero(plane == label)
            counts[z, 0] = plane.size - counts[z, 1:].sum()
        else:
            counts[z] = np.bincount(plane, minlength=length)
    return counts


# Frequently used codes (facts of SNOMED CT / UCUM / DCM).
SCT_ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
SCT_VOLUME = Code("118565006", "SCT", "Volume")
SCT_MEAN = Code("373098007", "SCT", "Mean")
UCUM_ML = Code("ml", "UCUM", "milliliter")
UCUM_HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
UCUM_PERCENT = Code("%", "UCUM", "percent")


class Model:
    """What every model family provides: a card and ``predict``.

    Subclasses load their weights once in ``__init__`` (kept warm by the
    registry) and must not keep per-call state.
    """

    card: ModelCard

    #: Whether :meth:`predict_study` is implemented (the model takes several series of one study).
    takes_several_inputs: bool = False

    def predict(self, volume: Volume) -> Prediction:  # pragma: no cover - interface
        raise NotImplementedError

    def predict_study(self, volumes: Mapping[str, Volume], primary: str) -> Prediction:
        """Predict from several series of one study (e.g. arterial and venous CT phases).

        Parameters
        ----------
        volumes:
            Role name -> volume, one per required series of a study rule, in
            the rule's order.  The volumes may have different grids.
        primary:
            The role whose grid the result is on: a label map must have the
            shape (and geometry) of ``volumes[primary]``.

        Raises
        ------
        SingleInputError
            For a model that takes one series (the default).
        """
        raise SingleInputError(f"model {self.card.name} takes one series; it was given {len(volumes)} "
                               f"({', '.join(volumes)}): use a model that takes several inputs (type: python)")


class SingleInputError(ValueError):
    """A model that takes one series was given several (a study rule pairs it with several series)."""
