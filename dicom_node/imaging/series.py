"""Files of one series -> :class:`SeriesVolume` (see :mod:`dicom_node.imaging` for the decisions)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import pixel_array as decode_pixels
from pydicom.uid import UID

from dicom_node.errors import ImagingError
from dicom_node.imaging.frames import Frame, floats, multiframe_frames, require_same_matrix, single_frame
from dicom_node.imaging.grid import arrange
from dicom_node.imaging.prefetch import Prefetch
from inference.types import Volume

logger = logging.getLogger(__name__)

IMAGE_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

#: Elements longer than this (the pixel data) stay in the file when a series is read: the slice is decoded
#: from them and let go, so a dataset costs its header only; pydicom reads them again if asked for (the
#: overlay series and the PDF draw the stored pixels).
DEFER_SIZE = "64 KB"

#: The header elements :func:`load_series` reads of every instance (geometry, identity, consistency). The
#: read-ahead converts them from their raw bytes while the series arrives (:func:`convert_for_load`), so the
#: job's load does not (0.04 s of a 200-slice CT's load, where all else was read ahead already).
LOAD_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality", "FrameOfReferenceUID",
                 "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "ImagePositionPatient",
                 "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "RescaleSlope", "RescaleIntercept")


def convert_for_load(ds: Dataset) -> None:
    """Convert the elements :func:`load_series` reads from their raw bytes now (pydicom keeps the result)."""
    for keyword in LOAD_KEYWORDS:
        ds.get(keyword)
_PIXEL_DATA = 0x7FE00010

NOT_SOURCE_SOP_CLASSES = {
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
        whose frames are the slices.  Datasets keep their pixel data (read
        from the file again when asked for).
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



def load_series(paths: Sequence[Path], prefetch: Prefetch | None = None) -> SeriesVolume:
    """Read the files of one series and build its volume.

    Parameters
    ----------
    paths:
        DICOM Part 10 files (with file meta) of one series, in any order.
    prefetch:
        Instances already read and decoded while the series arrived (see
        :mod:`dicom_node.imaging.prefetch`): their datasets and slices are
        taken from there, the rest read here; every check below runs alike.

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
    if prefetch is not None:
        prefetch.catch_up(paths)  # the last instances into the read-ahead buffer: handed over, not copied out
    datasets = [(prefetch.dataset(path) if prefetch is not None else None) or _read(path, index, len(paths))
                for index, path in enumerate(paths)]
    path_of = {id(ds): path for ds, path in zip(datasets, paths)}
    for index, ds in enumerate(datasets):
        _require_image(ds, index, len(datasets))
    _require_one_series(datasets)
    datasets, notes = _drop_duplicate_instances(datasets)
    _require_consistent(datasets, "Modality", "modalities")
    _require_consistent(datasets, "FrameOfReferenceUID", "frames of reference")

    multi = [ds for ds in datasets if is_multiframe(ds)]
    if multi and len(datasets) > 1:
        raise ImagingError(
            f"series has {len(multi)} multi-frame object(s) among {len(datasets)} objects; "
            "only one multi-frame object or only single-frame images make one volume"
        )
    if multi:
        frames = multiframe_frames(datasets[0])
        unit = "frames"
    else:
        frames = [single_frame(ds, index) for index, ds in enumerate(datasets)]
        unit = "instances"
        require_same_matrix(datasets)

    grid = arrange(frames, unit)
    notes.extend(grid.notes)
    ordered = grid.frames
    planes: Sequence[np.ndarray | None] = ()
    array: np.ndarray | None = None
    if prefetch is not None and not multi:
        array, planes = prefetch.volume([(path_of[id(datasets[f.source])], datasets[f.source]) for f in ordered])
    if array is None:
        array = _pixels(datasets, ordered, planes)

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
        return pydicom.dcmread(path, force=False, defer_size=DEFER_SIZE)
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
    what = NOT_SOURCE_SOP_CLASSES.get(sop_class) or (
        UID(sop_class).name if sop_class else "object without SOP Class"
    )
    if sop_class in NOT_SOURCE_SOP_CLASSES or modality in _NOT_SOURCE_MODALITIES:
        raise ImagingError(
            f"file {index + 1} of {count} is a {what} (modality {modality or 'none'}), "
            "not an image: SEG/SR and other derived objects are never processed"
        )
    if not any(keyword in ds for keyword in IMAGE_PIXEL_KEYWORDS):
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
        tuple(floats(ds.get("ImagePositionPatient")) or ()),
        tuple(floats(ds.get("ImageOrientationPatient")) or ()),
    )


def is_multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1



# --------------------------------------------------------------------------- pixels


def _pixels(datasets: Sequence[Dataset], ordered: Sequence[Frame],
            decoded: Sequence[np.ndarray | None] = ()) -> np.ndarray:
    """Decode and rescale every frame into a ``float32`` ``(z, y, x)`` array.

    The volume is allocated once and filled slice by slice: no list of slices
    to stack (which would hold the volume twice at its peak).  ``decoded``:
    slices already in modality units (prefetched), by ``z``; ``None`` where
    a slice is decoded here.
    """
    multiframe: dict[int, np.ndarray] = {}
    out: np.ndarray | None = None
    for z, frame in enumerate(ordered):
        ready = decoded[z] if z < len(decoded) else None
        if ready is not None:
            if out is None:
                out = np.empty((len(ordered), *ready.shape), dtype=np.float32)
            out[z] = ready
            continue
        if frame.frame == 0:
            plane = _decode(datasets[frame.source])[0]
        else:
            if frame.source not in multiframe:
                multiframe[frame.source] = _decode(datasets[frame.source])
            plane = multiframe[frame.source][frame.frame - 1]
        if out is None:
            out = np.empty((len(ordered), *plane.shape), dtype=np.float32)
        _rescale_into(plane, frame.rescale, out[z])
    assert out is not None  # ordered is never empty (arrange refuses no frames)
    return out


def _rescale_into(plane: np.ndarray, rescale: Dataset, out: np.ndarray) -> None:
    """Modality units of one frame into ``out``: what pydicom's ``apply_modality_lut`` gives, value for value.

    A rescale slope and intercept (nearly every CT) is computed here in float64 as pydicom does, without
    its per-call checks (a quarter of a 200-slice load); a Modality LUT goes to pydicom.
    """
    if "ModalityLUTSequence" not in rescale and "RescaleSlope" in rescale and "RescaleIntercept" in rescale:
        scaled = plane.astype(np.float64) * float(rescale.RescaleSlope)
        scaled += float(rescale.RescaleIntercept)
        out[...] = scaled
    else:
        out[...] = apply_modality_lut(plane, rescale)


def decode_plane(ds: Dataset) -> np.ndarray | None:
    """A single-frame grey-scale image's slice in modality units (``float32``), as a series load makes it.

    ``None`` for anything else (multi-frame, colour, not an image, undecodable): the load decides about it.
    """
    if is_multiframe(ds) or int(ds.get("SamplesPerPixel", 1)) != 1 or "PixelData" not in ds:
        return None
    if str(ds.get("SOPClassUID", "")) in NOT_SOURCE_SOP_CLASSES:
        return None
    try:
        plane = _decode(ds)[0]
        out = np.empty(plane.shape, np.float32)
        _rescale_into(plane, ds, out)
    except Exception:  # noqa: BLE001 - the job's own load reports it with its position in the series
        return None
    return out


_NATIVE_LITTLE_ENDIAN = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})


def _native(ds: Dataset) -> np.ndarray | None:
    """Uncompressed little-endian grey-scale pixels read straight from the bytes; None where pydicom must decode.

    Same values as pydicom's decoder: signed data is sign-extended from Bits Stored, unsigned masked to it.
    """
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax not in _NATIVE_LITTLE_ENDIAN or "PixelData" not in ds or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    try:
        allocated, stored = int(ds.get("BitsAllocated", 0)), int(ds.get("BitsStored", 0))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        rows, columns, frames = int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None  # a header pydicom's decoder reports on
    if allocated not in (8, 16, 32) or not 0 < stored <= allocated or min(rows, columns, frames) < 1:
        return None
    data = ds.PixelData
    count = rows * columns * frames
    if len(data) < count * allocated // 8:
        return None  # short: pydicom says what is wrong
    array = np.frombuffer(data, dtype=f"<{'i' if signed else 'u'}{allocated // 8}", count=count)
    unused = allocated - stored
    if unused:
        array = (array << unused) >> unused if signed else array & ((1 << stored) - 1)
    return array.reshape(frames, rows, columns)


def _deferred_pixels(ds: Dataset) -> RawDataElement | None:
    """The pixel data element of ``ds`` while it is still in its file (read with ``DEFER_SIZE``), else None."""
    raw = ds.get_item(_PIXEL_DATA, keep_deferred=True) if _PIXEL_DATA in ds else None
    return raw if isinstance(raw, RawDataElement) and raw.value is None else None


def _decode(ds: Dataset) -> np.ndarray:
    """Stored values of every frame as ``(frames, rows, columns)``.

    Pixel data left in the file stays there once decoded: the dataset gets
    its deferred element back and does not keep the bytes.
    """
    syntax = ds.file_meta.get("TransferSyntaxUID")
    deferred = _deferred_pixels(ds)
    try:
        native = _native(ds)
        array = decode_pixels(ds) if native is None else native
    except Exception as exc:  # re-raised: a decoder failure of any kind
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise ImagingError(
            f"pixel data could not be decoded ({name}): {type(exc).__name__}; "
            "the file may be truncated or the syntax unsupported"
        ) from exc
    finally:
        if deferred is not None:
            ds[_PIXEL_DATA] = deferred  # the decoded array keeps what it needs of the bytes
    rows, columns = int(ds.Rows), int(ds.Columns)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3 or array.shape[1:] != (rows, columns):
        raise ImagingError(
            f"decoded pixel data has shape {array.shape}, expected frames of {rows}x{columns}"
        )
    return array

