"""One 2D frame's geometry and rescale, read from a single-frame image or a multi-frame object's functional groups."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_node.errors import ImagingError


@dataclass(frozen=True, eq=False)
class Frame:
    """Geometry and rescale of one 2D frame, before sorting."""

    source: int
    frame: int
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None
    rescale: Dataset


def floats(value: Any) -> list[float] | None:
    """A (multi-valued) DS/FD element value as floats; ``None`` when absent or not numeric."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    try:
        numbers = [float(v) for v in items]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(n) for n in numbers):
        return None
    return numbers


def _vector(value: Any, length: int, name: str, where: str) -> np.ndarray:
    numbers = floats(value)
    if numbers is None:
        raise ImagingError(f"{where} lacks {name}; cannot place it in a volume")
    if len(numbers) != length:
        raise ImagingError(f"{where} has {name} with {len(numbers)} values instead of {length}")
    return np.asarray(numbers, dtype=np.float64)


def _pixel_spacing(value: Any, where: str) -> tuple[float, float]:
    spacing = _vector(value, 2, "PixelSpacing", where)
    if not np.all(spacing > 0):
        raise ImagingError(f"{where} has a non-positive PixelSpacing")
    return float(spacing[0]), float(spacing[1])


def _thickness(value: Any) -> float | None:
    numbers = floats(value)
    if not numbers or numbers[0] <= 0:
        return None
    return numbers[0]


def single_frame(ds: Dataset, index: int) -> Frame:
    where = "an instance"
    return Frame(
        source=index,
        frame=0,
        position=_vector(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", where),
        orientation=_vector(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", where),
        pixel_spacing=_pixel_spacing(ds.get("PixelSpacing"), where),
        slice_thickness=_thickness(ds.get("SliceThickness")),
        rescale=ds,
    )


def _group_item(groups: Sequence[Dataset | None], keyword: str) -> Dataset | None:
    """First item of a functional group macro, per-frame before shared."""
    for group in groups:
        if group is not None and keyword in group and len(group[keyword].value) > 0:
            item: Dataset = group[keyword].value[0]
            return item
    return None


def multiframe_frames(ds: Dataset) -> list[Frame]:
    """Per-frame geometry of an Enhanced (functional groups) multi-frame object."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        raise ImagingError(
            "multi-frame object without Per-frame Functional Groups (e.g. cine, NM); "
            "frame positions are unknown, not supported as a volume"
        )
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if len(per_frame) != count:
        raise ImagingError(
            f"multi-frame object declares {count} frames but describes {len(per_frame)}"
        )
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    frames = []
    for number, item in enumerate(per_frame, start=1):
        where = f"frame {number}"
        groups = (item, shared)
        position = _group_item(groups, "PlanePositionSequence")
        orientation = _group_item(groups, "PlaneOrientationSequence")
        measures = _group_item(groups, "PixelMeasuresSequence")
        rescale = _group_item(groups, "PixelValueTransformationSequence")
        frames.append(
            Frame(
                source=0,
                frame=number,
                position=_vector(
                    None if position is None else position.get("ImagePositionPatient"),
                    3, "a plane position", where,
                ),
                orientation=_vector(
                    None if orientation is None else orientation.get("ImageOrientationPatient"),
                    6, "a plane orientation", where,
                ),
                pixel_spacing=_pixel_spacing(
                    None if measures is None else measures.get("PixelSpacing"), where
                ),
                slice_thickness=None if measures is None else _thickness(measures.get("SliceThickness")),
                rescale=rescale if rescale is not None else ds,
            )
        )
    return frames


def require_same_matrix(datasets: Sequence[Dataset]) -> None:
    sizes = Counter((int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for ds in datasets)
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise ImagingError(f"slices have {len(sizes)} different matrix sizes ({listed}); not one volume")

