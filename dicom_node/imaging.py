"""DICOM series -> :class:`inference.types.Volume`, with our own geometry checks.

The worker hands :func:`load_series` the spooled files of one completed series.
It returns a :class:`SeriesVolume`: the pixel data in modality units (HU for
CT) on a regular grid, the source datasets in volume order (``results/``
needs them to build a SEG that references every source frame), and notes
about what was accepted on purpose (gantry tilt, single slice, duplicates).

Everything that stops a series from being *one* regular volume raises
:class:`~dicom_node.errors.ImagingError` with a short, PHI-free reason that
an operator can act on.  SimpleITK's series reader is deliberately not used:
it stacks broken series (gaps, repeated positions, mixed orientations)
without complaint.

Geometry conventions
--------------------
Arrays are indexed ``[z, y, x]`` (see :mod:`inference.types`):

* ``x`` runs along a row (increasing column index): direction
  ``ImageOrientationPatient[0:3]``, spacing ``PixelSpacing[1]``;
* ``y`` runs down a column (increasing row index): direction
  ``ImageOrientationPatient[3:6]``, spacing ``PixelSpacing[0]``;
* ``z`` is the slice index, sorted by ascending projection of
  ``ImagePositionPatient`` onto the slice normal (row x column cosines).

The centre of voxel ``(z, y, x)`` lies at
``origin + z*dz*direction[0] + y*dy*direction[1] + x*dx*direction[2]``,
which for ``y = x = 0`` is exactly the ``ImagePositionPatient`` of slice ``z``.

Decisions
---------
Spacing between slices
    Taken from the positions, never from SliceThickness or
    SpacingBetweenSlices.  Consecutive spacings must agree within
    ``max(0.05 mm, 1 %)`` and every slice must lie on the regular grid within
    the same tolerance; otherwise the series is refused (a missing slice is
    reported as such, never averaged away).
Gantry tilt (sheared stack)
    When the step between consecutive slice positions is not parallel to the
    slice normal, the stack is kept as acquired: ``direction[0]`` is the unit
    vector of the actual step and ``dz`` its length.  Voxel indices then map
    exactly to source pixels, so masks land on the source frames without
    resampling; ``|det(direction * spacing)|`` is the true voxel volume
    (``dz * dy * dx`` overestimates it by ``1 / cos(tilt)``).  The direction
    matrix is then not orthogonal; a note gives the angle.  A drift of the
    whole stack below a tenth of a pixel is treated as numerical noise (the
    normal is used).  Tilts above ``MAX_TILT_DEG`` are refused.
Single slice
    Accepted as a volume of depth 1 (2D models exist): ``direction[0]`` is the
    slice normal and ``dz`` the SliceThickness, or 1.0 mm when absent; a note
    says which.
Duplicate SOP Instance UIDs
    Files with the same SOP Instance UID are the same object (possibly in
    different transfer syntaxes); the node's spool also keys instances by
    SOP Instance UID.  The first file is kept, the others are dropped with a
    note.  Copies that disagree on geometry are a UID clash and refused.
Multi-frame (Enhanced CT/MR)
    One multi-frame object whose frames are the slices; geometry and rescale
    come from the Per-frame / Shared Functional Groups.  A series holding
    more than one multi-frame object, or mixing them with single-frame
    images, is refused.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array as decode_pixels
from pydicom.uid import UID

from dicom_node.errors import ImagingError
from inference.types import Volume

logger = logging.getLogger(__name__)

ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between direction cosines still counted as the same orientation."""

SAME_POSITION_MM = 0.01
"""Slices whose positions along the normal differ by less than this are at the same place."""

SPACING_ABS_TOLERANCE_MM = 0.05
SPACING_REL_TOLERANCE = 0.01
"""Slice spacing is uniform when it varies by at most ``max(0.05 mm, 1 %)``."""

PIXEL_SPACING_TOLERANCE_MM = 1e-3
"""Largest difference in PixelSpacing between slices of one volume."""

TILT_NOISE_PIXELS = 0.1
"""A sideways drift of the whole stack below this fraction of a pixel is not a tilt."""

MAX_TILT_DEG = 45.0
"""Stacks further than this from the slice normal are refused as nonsense."""

_IMAGE_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

_NOT_SOURCE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
}
_NOT_SOURCE_MODALITIES = frozenset({"SEG", "SR", "RTSTRUCT", "RTPLAN", "KO", "PR", "REG", "RWV"})


@dataclass(frozen=True)
class SeriesVolume:
    """One series as a volume, with the DICOM objects it came from.

    Parameters
    ----------
    volume:
        Pixel data in modality units (``float32``, ``(z, y, x)``) and geometry.
    sources:
        For a single-frame series, the datasets in ``z`` order (one per
        slice).  For a multi-frame series (Enhanced CT/MR), the one dataset
        whose frames are the slices.  Datasets keep their pixel data.
    frame_of_source:
        For each ``z``, ``(index into sources, frame number)``; the frame
        number is 1-based for multi-frame objects and 0 for single-frame ones.
    notes:
        What was accepted on purpose (tilt, single slice, dropped duplicates);
        PHI-free, suitable for logs and reports.
    """

    volume: Volume
    sources: tuple[Dataset, ...]
    frame_of_source: tuple[tuple[int, int], ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class _Frame:
    """Geometry and rescale of one 2D frame, before sorting."""

    source: int
    frame: int
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None
    rescale: Dataset


def load_series(paths: Sequence[Path]) -> SeriesVolume:
    """Read the files of one series and build its volume.

    Parameters
    ----------
    paths:
        DICOM Part 10 files (with file meta) of one series, in any order.

    Returns
    -------
    SeriesVolume
        The volume in modality units with its geometry, and the source
        datasets in volume order.

    Raises
    ------
    ImagingError
        When the files are not one regular image volume: unreadable file,
        non-image object (SEG, SR...), several series, several orientations,
        different matrix sizes or pixel spacings, missing geometry,
        repeated positions, gaps or uneven spacing, tilt above
        ``MAX_TILT_DEG``, undecodable pixel data.
    """
    if not paths:
        raise ImagingError("no files given: a volume needs at least one image")
    datasets = [_read(path, index, len(paths)) for index, path in enumerate(paths)]
    for index, ds in enumerate(datasets):
        _require_image(ds, index, len(datasets))
    _require_one_series(datasets)
    datasets, notes = _drop_duplicate_instances(datasets)
    _require_consistent(datasets, "Modality", "modalities")
    _require_consistent(datasets, "FrameOfReferenceUID", "frames of reference")

    multi = [ds for ds in datasets if _is_multiframe(ds)]
    if multi and len(datasets) > 1:
        raise ImagingError(
            f"series has {len(multi)} multi-frame object(s) among {len(datasets)} objects; "
            "only one multi-frame object or only single-frame images make one volume"
        )
    if multi:
        frames = _multiframe_frames(datasets[0])
        unit = "frames"
    else:
        frames = [_single_frame(ds, index) for index, ds in enumerate(datasets)]
        unit = "instances"
        _require_same_matrix(datasets)

    grid = _arrange(frames, unit)
    notes.extend(grid.notes)
    ordered = grid.frames
    array = _pixels(datasets, ordered)

    if multi:
        sources: tuple[Dataset, ...] = (datasets[0],)
        frame_of_source = tuple((0, f.frame) for f in ordered)
    else:
        sources = tuple(datasets[f.source] for f in ordered)
        frame_of_source = tuple((z, 0) for z in range(len(ordered)))

    origin = ordered[0].position
    volume = Volume(
        array=array,
        spacing=grid.spacing,
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=grid.direction,
        modality=str(datasets[0].get("Modality", "")),
    )
    logger.info(
        "Volume built: %d slices of %dx%d, spacing %s mm, modality %s",
        array.shape[0], array.shape[1], array.shape[2],
        ", ".join(f"{s:.3f}" for s in grid.spacing), volume.modality,
    )
    for note in notes:
        logger.info("Volume note: %s", note)
    return SeriesVolume(
        volume=volume, sources=sources, frame_of_source=frame_of_source, notes=tuple(notes)
    )


# --------------------------------------------------------------------------- reading


def _read(path: Path, index: int, count: int) -> Dataset:
    """Read one Part 10 file; failures name the file's position, not its path."""
    try:
        return pydicom.dcmread(path, force=False)
    except Exception as exc:  # re-raised: any reader failure means "not readable"
        logger.debug("Cannot read %s: %s", path, exc)
        raise ImagingError(
            f"file {index + 1} of {count} is not a readable DICOM file "
            f"({type(exc).__name__}); check the sender or the spool"
        ) from exc


def _require_image(ds: Dataset, index: int, count: int) -> None:
    """Refuse objects that are not source images (no pixel data, SEG, SR...)."""
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "")).upper()
    what = _NOT_SOURCE_SOP_CLASSES.get(sop_class) or (
        UID(sop_class).name if sop_class else "object without SOP Class"
    )
    if sop_class in _NOT_SOURCE_SOP_CLASSES or modality in _NOT_SOURCE_MODALITIES:
        raise ImagingError(
            f"file {index + 1} of {count} is a {what} (modality {modality or 'none'}), "
            "not an image: SEG/SR and other derived objects are never processed"
        )
    if not any(keyword in ds for keyword in _IMAGE_PIXEL_KEYWORDS):
        raise ImagingError(
            f"file {index + 1} of {count} ({what}) has no pixel data: not an image"
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ImagingError(
            f"file {index + 1} of {count} is a colour image "
            f"({ds.get('SamplesPerPixel')} samples per pixel); only grey-scale volumes are supported"
        )


def _require_one_series(datasets: Sequence[Dataset]) -> None:
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if "" in uids:
        raise ImagingError("an object has no SeriesInstanceUID; cannot tell which series it belongs to")
    if len(uids) > 1:
        raise ImagingError(
            f"files belong to {len(uids)} different series; a volume is built from one series only"
        )


def _require_consistent(datasets: Sequence[Dataset], keyword: str, what: str) -> None:
    values = {str(ds.get(keyword, "")) for ds in datasets} - {""}
    if len(values) > 1:
        raise ImagingError(f"series mixes {len(values)} different {what}; not one volume")


def _drop_duplicate_instances(datasets: Sequence[Dataset]) -> tuple[list[Dataset], list[str]]:
    """Keep the first file of each SOP Instance UID (same object, maybe another syntax)."""
    kept: dict[str, Dataset] = {}
    dropped = 0
    for ds in datasets:
        uid = str(ds.get("SOPInstanceUID", ""))
        if not uid:
            raise ImagingError("an object has no SOPInstanceUID; it cannot be referenced by results")
        first = kept.get(uid)
        if first is None:
            kept[uid] = ds
            continue
        if _geometry_key(first) != _geometry_key(ds):
            raise ImagingError(
                "two different objects share one SOP Instance UID (geometry differs); "
                "the sender reuses UIDs, fix it before processing"
            )
        dropped += 1
    notes: list[str] = []
    if dropped:
        notes.append(f"{dropped} duplicate file(s) of the same SOP instance ignored (same SOP Instance UID)")
    return list(kept.values()), notes


def _geometry_key(ds: Dataset) -> tuple[Any, ...]:
    return (
        ds.get("Rows"),
        ds.get("Columns"),
        ds.get("NumberOfFrames"),
        tuple(_floats(ds.get("ImagePositionPatient")) or ()),
        tuple(_floats(ds.get("ImageOrientationPatient")) or ()),
    )


def _is_multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1


# --------------------------------------------------------------------------- frames


def _floats(value: Any) -> list[float] | None:
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
    numbers = _floats(value)
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
    numbers = _floats(value)
    if not numbers or numbers[0] <= 0:
        return None
    return numbers[0]


def _single_frame(ds: Dataset, index: int) -> _Frame:
    where = "an instance"
    return _Frame(
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


def _multiframe_frames(ds: Dataset) -> list[_Frame]:
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
            _Frame(
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


def _require_same_matrix(datasets: Sequence[Dataset]) -> None:
    sizes = Counter((int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for ds in datasets)
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise ImagingError(f"slices have {len(sizes)} different matrix sizes ({listed}); not one volume")


# --------------------------------------------------------------------------- geometry


def _orientation_groups(frames: Sequence[_Frame]) -> list[np.ndarray]:
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
class _Grid:
    """Frames in ``z`` order and the geometry of the volume they form."""

    frames: list[_Frame]
    spacing: tuple[float, float, float]
    direction: np.ndarray
    notes: tuple[str, ...] = ()


def _arrange(frames: Sequence[_Frame], unit: str) -> _Grid:
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
        return _Grid(ordered, (dz, dy, dx), np.stack([normal, col, row]), (note,))

    gaps = np.diff(along[order])
    _require_distinct(gaps, unit)
    tolerance = _require_uniform(gaps)
    step = _regular_step(np.stack([f.position for f in ordered]), tolerance)

    along_step = float(step @ normal)
    sideways = float(np.linalg.norm(step - along_step * normal))
    if sideways * (len(ordered) - 1) <= TILT_NOISE_PIXELS * min(dy, dx):
        return _Grid(ordered, (along_step, dy, dx), np.stack([normal, col, row]))
    tilt_deg = math.degrees(math.atan2(sideways, along_step))
    if tilt_deg > MAX_TILT_DEG:
        raise ImagingError(
            f"slices are stacked {tilt_deg:.1f} deg off their normal "
            f"(limit {MAX_TILT_DEG:.0f} deg); not a volume"
        )
    dz = float(np.linalg.norm(step))
    note = f"gantry tilt {tilt_deg:.1f} deg: stack sheared, masks stay on source pixels"
    return _Grid(ordered, (dz, dy, dx), np.stack([step / dz, col, row]), (note,))


def _common_pixel_spacing(frames: Sequence[_Frame]) -> tuple[float, float]:
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


# --------------------------------------------------------------------------- pixels


def _pixels(datasets: Sequence[Dataset], ordered: Sequence[_Frame]) -> np.ndarray:
    """Decode and rescale every frame into a ``float32`` ``(z, y, x)`` array."""
    multiframe: dict[int, np.ndarray] = {}
    slices = []
    for frame in ordered:
        if frame.frame == 0:
            plane = _decode(datasets[frame.source])[0]
        else:
            if frame.source not in multiframe:
                multiframe[frame.source] = _decode(datasets[frame.source])
            plane = multiframe[frame.source][frame.frame - 1]
        values = apply_modality_lut(plane, frame.rescale)
        slices.append(np.asarray(values, dtype=np.float32))
    return np.stack(slices)


def _decode(ds: Dataset) -> np.ndarray:
    """Stored values of every frame as ``(frames, rows, columns)``."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        array = decode_pixels(ds)
    except Exception as exc:  # re-raised: a decoder failure of any kind
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise ImagingError(
            f"pixel data could not be decoded ({name}): {type(exc).__name__}; "
            "the file may be truncated or the syntax unsupported"
        ) from exc
    rows, columns = int(ds.Rows), int(ds.Columns)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3 or array.shape[1:] != (rows, columns):
        raise ImagingError(
            f"decoded pixel data has shape {array.shape}, expected frames of {rows}x{columns}"
        )
    return array
