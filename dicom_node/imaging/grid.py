"""Frames -> one regular grid: orientation, order along the normal, spacing, gaps, tilt."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dicom_node.errors import ImagingError
from dicom_node.imaging.frames import Frame
from dicom_node.imaging.tolerances import (
    MAX_TILT_DEG,
    ORIENTATION_TOLERANCE,
    PIXEL_SPACING_TOLERANCE_MM,
    SAME_POSITION_MM,
    SPACING_ABS_TOLERANCE_MM,
    SPACING_REL_TOLERANCE,
    TILT_NOISE_PIXELS,
)

# --------------------------------------------------------------------------- geometry


def _orientation_groups(frames: Sequence[Frame]) -> list[np.ndarray]:
    groups: list[np.ndarray] = []
    for frame in frames:
        if not any(np.max(np.abs(frame.orientation - g)) <= ORIENTATION_TOLERANCE for g in groups):
            groups.append(frame.orientation)
    return groups


def _cosines(orientation: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row direction, unit column direction and slice normal of an IOP."""
    row, col = orientation[:3], orientation[3:]
    row_norm, col_norm = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if abs(row_norm - 1) > 0.01 or abs(col_norm - 1) > 0.01 or abs(float(row @ col)) > 0.01:
        raise ImagingError("ImageOrientationPatient is not two orthogonal unit vectors")
    row, col = row / row_norm, col / col_norm
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def _mm(value: float) -> str:
    """A length for messages: two decimals, one when the second is 0 (``5.0``, ``6.67``)."""
    text = f"{value:.2f}"
    return text[:-1] if text.endswith("0") else text


def _describe_spacings(gaps: np.ndarray) -> str:
    if len(gaps) <= 12:
        return ", ".join(_mm(g) for g in gaps)
    counts = Counter(_mm(g) for g in gaps)
    return ", ".join(f"{v} (x{n})" for v, n in sorted(counts.items(), key=lambda kv: float(kv[0])))


@dataclass(frozen=True, eq=False)
class Grid:
    """Frames in ``z`` order and the geometry of the volume they form."""

    frames: list[Frame]
    spacing: tuple[float, float, float]
    direction: np.ndarray
    notes: tuple[str, ...] = ()


def arrange(frames: Sequence[Frame], unit: str) -> Grid:
    """Sort frames along the slice normal and check that they form one regular grid.

    ``unit`` names the frames in messages (``"instances"`` or ``"frames"``).
    """
    groups = _orientation_groups(frames)
    if len(groups) > 1:
        raise ImagingError(f"series has {len(groups)} different orientations; split the series")
    dy, dx = _common_pixel_spacing(frames)
    row, col, normal = _cosines(frames[0].orientation)
    along = np.array([float(f.position @ normal) for f in frames])
    order = np.argsort(along, kind="stable")
    ordered = [frames[i] for i in order]

    if len(ordered) == 1:
        thickness = ordered[0].slice_thickness
        dz = thickness if thickness is not None else 1.0
        source = "from SliceThickness" if thickness is not None else "(no SliceThickness; 1.0 mm assumed)"
        note = f"single slice: depth 1, dz {_mm(dz)} mm {source}"
        return Grid(ordered, (dz, dy, dx), np.stack([normal, col, row]), (note,))

    gaps = np.diff(along[order])
    _require_distinct(gaps, unit)
    tolerance = _require_uniform(gaps)
    step = _regular_step(np.stack([f.position for f in ordered]), tolerance)

    along_step = float(step @ normal)
    sideways = float(np.linalg.norm(step - along_step * normal))
    if sideways * (len(ordered) - 1) <= TILT_NOISE_PIXELS * min(dy, dx):
        return Grid(ordered, (along_step, dy, dx), np.stack([normal, col, row]))
    tilt_deg = math.degrees(math.atan2(sideways, along_step))
    if tilt_deg > MAX_TILT_DEG:
        raise ImagingError(
            f"slices are stacked {tilt_deg:.1f} deg off their normal "
            f"(limit {MAX_TILT_DEG:.0f} deg); not a volume"
        )
    dz = float(np.linalg.norm(step))
    note = f"gantry tilt {tilt_deg:.1f} deg: stack sheared, masks stay on source pixels"
    return Grid(ordered, (dz, dy, dx), np.stack([step / dz, col, row]), (note,))


def _common_pixel_spacing(frames: Sequence[Frame]) -> tuple[float, float]:
    """The PixelSpacing ``(row spacing, column spacing)`` shared by every frame."""
    reference = frames[0].pixel_spacing
    spacings = {f.pixel_spacing for f in frames}
    if any(
        max(abs(s[0] - reference[0]), abs(s[1] - reference[1])) > PIXEL_SPACING_TOLERANCE_MM
        for s in spacings
    ):
        raise ImagingError(
            f"slices have different pixel spacings ({len(spacings)} values); not one volume"
        )
    return reference


def _require_distinct(gaps: np.ndarray, unit: str) -> None:
    """Refuse frames in the same plane (repeated acquisitions, 4D, duplicates)."""
    same = gaps < SAME_POSITION_MM
    if np.any(same):
        involved = np.zeros(len(gaps) + 1, dtype=bool)
        involved[:-1] |= same
        involved[1:] |= same
        raise ImagingError(
            f"{int(involved.sum())} {unit} share position(s): not one volume (4D or duplicate)"
        )


def _require_uniform(gaps: np.ndarray) -> float:
    """Refuse uneven spacing along the normal; return the tolerance used (mm)."""
    smallest, largest = float(gaps.min()), float(gaps.max())
    tolerance = max(SPACING_ABS_TOLERANCE_MM, SPACING_REL_TOLERANCE * smallest)
    if largest - smallest <= tolerance:
        return tolerance
    missing = any(
        round(g / smallest) >= 2 and abs(g - round(g / smallest) * smallest) <= tolerance
        for g in gaps
    )
    reason = (
        "a slice is missing"
        if missing
        else f"slices are unevenly spaced ({_mm(smallest)} to {_mm(largest)} mm)"
    )
    raise ImagingError(f"slice gap: spacings {_describe_spacings(gaps)} mm (expected uniform); {reason}")


def _regular_step(positions: np.ndarray, tolerance: float) -> np.ndarray:
    """The 3D step between slices; every position must lie on that regular grid."""
    count = len(positions)
    step: np.ndarray = (positions[-1] - positions[0]) / (count - 1)
    grid = positions[0] + np.arange(count)[:, None] * step
    drift = float(np.max(np.linalg.norm(positions - grid, axis=1)))
    if drift > tolerance:
        raise ImagingError(
            f"slice positions leave a regular grid by up to {_mm(drift)} mm "
            "(slices shifted within their planes); not one volume"
        )
    return step

