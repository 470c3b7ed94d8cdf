"""Where a finding is, in patient coordinates: the ellipse a viewer draws and jumps to.

A segment's place is its largest cross-section: on the source slice where
the segment has the most pixels, the ellipse centred on those pixels with
the same spread along the image's row and column directions (semi-axis
``2 * standard deviation``, which is exact for a filled ellipse).  A box's
place is the ellipse inscribed in its section through the box centre.
Both are ``ELLIPSE`` content (major axis end points, then minor axis end
points), axis-aligned with the image: as SCOORD3D in the source's frame of
reference, and as SCOORD on the source image the place lies on (image
coordinates, pixel centres at .5), which TID 1410 both allows.  A viewer
that draws SR annotations on images jumps to the image-plane form (OHIF 3.13
draws SCOORD3D ellipses only when a viewport happens to show their plane,
and does not navigate to them in a stack viewport).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset


@dataclass(frozen=True)
class SlicePlane:
    """One source slice: the centre of its first pixel, row and column directions (LPS), pixel spacing (mm)."""

    origin: np.ndarray
    row_direction: np.ndarray  # along a row: increasing column index
    column_direction: np.ndarray  # down a column: increasing row index
    spacing: tuple[float, float]  # (between rows, between columns), as PixelSpacing


def _plane(position: Sequence[float], orientation: Sequence[float], spacing: Sequence[float]) -> SlicePlane:
    return SlicePlane(np.asarray(position, float), np.asarray(orientation[:3], float),
                      np.asarray(orientation[3:], float), (float(spacing[0]), float(spacing[1])))


def slice_planes(source_images: Sequence[Dataset], slices: int) -> list[SlicePlane] | None:
    """The plane of each of ``slices`` label-map slices (in source order), or ``None`` when unknown."""
    try:
        if len(source_images) == slices and all("ImagePositionPatient" in ds for ds in source_images):
            return [_plane(ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing)
                    for ds in source_images]
        if len(source_images) == 1 and int(getattr(source_images[0], "NumberOfFrames", 1)) == slices:
            ds = source_images[0]
            shared = ds.SharedFunctionalGroupsSequence[0]
            planes = []
            for frame in ds.PerFrameFunctionalGroupsSequence:
                def get(name: str) -> Dataset:
                    return (frame if name in frame else shared).get(name)[0]  # type: ignore[no-any-return]
                planes.append(_plane(get("PlanePositionSequence").ImagePositionPatient,
                                     get("PlaneOrientationSequence").ImageOrientationPatient,
                                     get("PixelMeasuresSequence").PixelSpacing))
            return planes
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    return None


def _ellipse(plane: SlicePlane, centre_rc: tuple[float, float], semi_rc: tuple[float, float]) -> np.ndarray:
    """Four SCOORD3D points: major axis end points, then minor axis end points, aligned with the image axes."""
    (r, c), (half_r, half_c) = centre_rc, semi_rc
    row_mm, col_mm = plane.spacing

    def at(rr: float, cc: float) -> np.ndarray:
        return plane.origin + cc * col_mm * plane.row_direction + rr * row_mm * plane.column_direction

    across = [at(r, c - half_c), at(r, c + half_c)]  # along the row direction
    down = [at(r - half_r, c), at(r + half_r, c)]  # along the column direction
    major, minor = (across, down) if half_c * col_mm >= half_r * row_mm else (down, across)
    return np.array(major + minor, dtype=float)


def segment_place(labelmap: np.ndarray, label: int, planes: Sequence[SlicePlane],
                  slice_counts: np.ndarray | None = None) -> tuple[int, np.ndarray] | None:
    """(slice index, ellipse points) of ``label``'s largest cross-section, or ``None`` when it is absent.

    ``slice_counts``: the label map's voxels per slice and label value
    (:meth:`~inference.types.Prediction.slice_label_counts`), counted here when not given.
    """
    if slice_counts is not None:
        counts = [int(n) for n in slice_counts[:, label]] if label < slice_counts.shape[1] else []
    else:
        counts = [int(np.count_nonzero(plane == label)) for plane in labelmap]
    if not counts or max(counts) == 0:
        return None
    k = int(np.argmax(counts))
    rows, cols = np.nonzero(labelmap[k] == label)
    centre = (float(rows.mean()), float(cols.mean()))
    # Semi-axes 2 sigma (a filled ellipse's), at least half a pixel so a one-pixel segment is still drawn.
    semi = (max(2.0 * float(rows.std()), 0.5), max(2.0 * float(cols.std()), 0.5))
    return k, _ellipse(planes[k], centre, semi)


def box_place(center: Sequence[float], size: Sequence[float]) -> np.ndarray:
    """The ellipse inscribed in an LPS-aligned box's axial section through its centre (major axis first)."""
    (cx, cy, cz), (sx, sy) = center, size[:2]
    across = [np.array([cx - sx / 2, cy, cz]), np.array([cx + sx / 2, cy, cz])]
    down = [np.array([cx, cy - sy / 2, cz]), np.array([cx, cy + sy / 2, cz])]
    major, minor = (across, down) if sx >= sy else (down, across)
    return np.array(major + minor, dtype=float)


def nearest_slice(planes: Sequence[SlicePlane], point: Sequence[float]) -> int | None:
    """The slice whose plane is nearest ``point`` (LPS), if within half a slice gap of it (else ``None``)."""
    if not planes:
        return None
    p = np.asarray(point, float)
    distances = [abs(float(np.cross(pl.row_direction, pl.column_direction) @ (p - pl.origin))) for pl in planes]
    k = int(np.argmin(distances))
    gap = (min(abs(float(np.cross(planes[0].row_direction, planes[0].column_direction) @ (b.origin - a.origin)))
               for a, b in zip(planes, planes[1:])) if len(planes) > 1 else 1.0)
    return k if distances[k] <= max(gap, 1e-3) / 2 + 1e-3 else None


def to_image(plane: SlicePlane, points: np.ndarray) -> np.ndarray:
    """LPS points on ``plane`` as SCOORD image coordinates ``(column, row)``, the first pixel's centre at (0.5, 0.5)."""
    offsets = np.asarray(points, float) - plane.origin
    columns = offsets @ plane.row_direction / plane.spacing[1] + 0.5
    rows = offsets @ plane.column_direction / plane.spacing[0] + 0.5
    return np.stack([columns, rows], axis=1)
