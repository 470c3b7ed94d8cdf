"""Overlay thumbnails for the status page: one source slice, windowed, with the SEG mask in colour.

The slice is the middle one of the segmented extent (the middle slice of the
series when the result has no SEG), found from the SEG's own per-frame
references and positions, so only one source file's pixels are decoded.
The PNG is cached in the spool next to the results
(``spool/results/<series>/<model>/thumbnail.png``) and removed with them.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pydicom
from highdicom.color import CIELabColor
from PIL import Image
from pydicom.pixels import apply_modality_lut

from dicom_node.spool import Spool
from dicom_node.spool.layout import validate_name
from dicom_node.store import Database

logger = logging.getLogger(__name__)

THUMBNAIL_PX = 256
_FALLBACK_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


class ThumbnailError(Exception):
    """No thumbnail can be made (unknown result, missing files)."""


def thumbnail_path(spool: Spool, series_uid: str, model: str) -> Path:
    """Where the cached PNG of (source series, model) lives; both validated."""
    return spool.result_path(series_uid, model, "thumbnail").with_suffix(".png")


def get_thumbnail(db: Database, spool: Spool, series_uid: str, model: str) -> bytes:
    """The PNG for the results of ``model`` on ``series_uid``, rendered once and cached.

    Raises
    ------
    ThumbnailError
        When the node has no result of this model for this series, or its files are gone.
    InvalidUIDError
        When ``series_uid`` or ``model`` is not usable in a path.
    """
    validate_name(model, "model name")
    path = thumbnail_path(spool, series_uid, model)
    results = db.query("SELECT kind, path FROM results WHERE source_series=? AND model=?", (series_uid, model))
    if not results:
        raise ThumbnailError(f"no result of model {model} for series {series_uid}")
    if path.is_file():
        return path.read_bytes()
    seg_rel = next((r["path"] for r in results if r["kind"] == "seg"), None)
    instances = {r["sop_uid"]: r["path"] for r in db.query(
        "SELECT sop_uid, path FROM instances WHERE series_uid=?", (series_uid,))}
    if not instances:
        raise ThumbnailError(f"series {series_uid} has no instances left in the spool")
    try:
        png = render(spool, instances, spool.absolute(seg_rel) if seg_rel else None)
    except (OSError, ValueError, AttributeError, KeyError, IndexError) as exc:
        raise ThumbnailError(f"cannot render the thumbnail of {model} on {series_uid}: {exc}") from exc
    spool.write_atomic(path, png)
    return png


def render(spool: Spool, instances: dict[str, str], seg_path: Path | None) -> bytes:
    """PNG bytes: the chosen source slice, windowed, with each segment blended in its colour."""
    masks: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}
    colours: dict[int, tuple[int, int, int]] = {}
    positions: dict[tuple[str, int], float] = {}
    if seg_path is not None:
        seg = pydicom.dcmread(seg_path)
        colours = _segment_colours(seg)
        frames = seg.pixel_array
        if frames.ndim == 2:
            frames = frames[np.newaxis]
        normal = _normal(seg)
        labelmap = str(seg.get("SegmentationType", "")) == "LABELMAP"
        numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
        for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
            src = fg.DerivationImageSequence[0].SourceImageSequence[0]
            key = (str(src.ReferencedSOPInstanceUID), int(getattr(src, "ReferencedFrameNumber", 1) or 1))
            if labelmap:  # one frame per slice holding segment numbers
                masks.setdefault(key, []).extend((n, frames[i] == n) for n in numbers)
            else:  # one bit frame per segment and slice
                number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                masks.setdefault(key, []).append((number, frames[i] > 0))
            position = fg.PlanePositionSequence[0].ImagePositionPatient
            positions[key] = float(np.dot(np.asarray(position, dtype=float), normal))
    if positions:
        ordered = sorted(positions, key=lambda k: positions[k])
        key = ordered[len(ordered) // 2]
    else:
        key = _middle_instance(spool, instances)
    sop_uid, frame = key
    if sop_uid not in instances:
        raise ValueError(f"source instance {sop_uid} is not in the spool")
    ds = pydicom.dcmread(spool.absolute(instances[sop_uid]))
    pixels = ds.pixel_array
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[frame - 1]
    grey = _window(ds, pixels)
    rgb = np.repeat(grey[..., np.newaxis], 3, axis=2).astype(np.float32)
    for number, mask in masks.get(key, []):
        if mask.shape != grey.shape:
            continue
        colour = np.asarray(colours.get(number, _FALLBACK_COLOURS[(number - 1) % len(_FALLBACK_COLOURS)]),
                            dtype=np.float32)
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * colour
        edge = mask & ~_eroded(mask)
        rgb[edge] = colour
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _normal(seg: pydicom.Dataset) -> np.ndarray:
    try:
        iop = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
        return np.cross(np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float))
    except (AttributeError, IndexError):
        return np.array([0.0, 0.0, 1.0])


def _segment_colours(seg: pydicom.Dataset) -> dict[int, tuple[int, int, int]]:
    colours: dict[int, tuple[int, int, int]] = {}
    for item in seg.SegmentSequence:
        lab = getattr(item, "RecommendedDisplayCIELabValue", None)
        if lab is not None:
            colours[int(item.SegmentNumber)] = CIELabColor.from_dicom_value([int(v) for v in lab]).to_rgb(clip=True)
    return colours


def _middle_instance(spool: Spool, instances: dict[str, str]) -> tuple[str, int]:
    """The middle instance along the slice normal (headers only), for results without a SEG."""
    placed: list[tuple[float, str]] = []
    for sop_uid, rel in instances.items():
        ds = pydicom.dcmread(spool.absolute(rel), stop_before_pixels=True)
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if ipp is not None and iop is not None:
            normal = np.cross(np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float))
            placed.append((float(np.dot(np.asarray(ipp, dtype=float), normal)), sop_uid))
        else:
            placed.append((float(ds.get("InstanceNumber", 0) or 0), sop_uid))
    placed.sort()
    return placed[len(placed) // 2][1], 1


def _window(ds: pydicom.Dataset, pixels: np.ndarray) -> np.ndarray:
    """Modality LUT, then the object's first VOI window (or the 1st-99th percentile), to 0..255."""
    values = apply_modality_lut(pixels, ds).astype(np.float32)
    if values.ndim == 3:  # colour source: luminance
        values = values.mean(axis=2)
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is not None and width is not None:
        c = float(centre[0] if isinstance(centre, pydicom.multival.MultiValue) else centre)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        low, high = c - w / 2, c + w / 2
    else:
        low, high = (float(v) for v in np.percentile(values, [1, 99]))
    if high <= low:
        high = low + 1
    return np.clip((values - low) / (high - low) * 255.0, 0, 255)


def _eroded(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def thumbnail_url(series_uid: str, model: str) -> str:
    return f"/thumbnails/{series_uid}/{model}.png"


__all__ = ["ThumbnailError", "get_thumbnail", "render", "thumbnail_path", "thumbnail_url"]
