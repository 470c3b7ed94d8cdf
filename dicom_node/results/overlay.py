"""Overlay images as pixels: a windowed source slice with translucent segment fills and contours, and a legend.

Pure image work (numpy, Pillow, SciPy), no DICOM objects: :mod:`dicom_node.results.sc`
wraps these images into Secondary Capture instances, :mod:`dicom_node.results.pdf`
draws its key slices with them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from scipy import ndimage

from dicom_node.errors import ResultError
from inference.types import SegmentSpec

DEFAULT_BANNER: Final[str] = "AI result - not for primary diagnosis"
"""Banner written on every overlay image unless configured otherwise."""

CT_DEFAULT_WINDOW: Final[tuple[float, float]] = (40.0, 400.0)
"""(center, width) in HU used for CT sources that carry no window (soft tissue)."""

"""Written on an overlay that replaces an earlier one of a slice where a re-run found nothing."""

_MAX_BANNER_LENGTH: Final[int] = 64
_BANNER_COLOR: Final[tuple[int, int, int]] = (255, 255, 0)
_TEXT_COLOR: Final[tuple[int, int, int]] = (255, 255, 255)


@dataclass(frozen=True)
class OverlayStyle:
    """How overlays are drawn.

    Parameters
    ----------
    banner:
        Text burnt into every image (printable ASCII, at most 64 characters).
    fill_opacity:
        Opacity of the segment fill, 0 (contour only) to 1 (opaque).
    """

    banner: str = DEFAULT_BANNER
    fill_opacity: float = 0.35

    def __post_init__(self) -> None:
        if not self.banner or len(self.banner) > _MAX_BANNER_LENGTH or not self.banner.isascii() \
                or not self.banner.isprintable():
            raise ResultError(
                f"Overlay banner {self.banner!r} must be 1-{_MAX_BANNER_LENGTH} printable ASCII characters"
            )
        if not 0.0 <= self.fill_opacity <= 1.0:
            raise ResultError(f"Overlay fill opacity {self.fill_opacity} must be between 0 and 1")


# --------------------------------------------------------------------------- pixels


def _first(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or (hasattr(value, "__getitem__") and not isinstance(value, str)):
        try:
            return float(value[0])  # type: ignore[index]
        except (IndexError, TypeError, ValueError):
            return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def frame_item(source: Dataset, keyword: str, frame: int) -> Dataset | None:
    """A functional group item of a multi-frame source (per-frame first, then shared)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame - 1), ("SharedFunctionalGroupsSequence", 0)):
        items = source.get(groups)
        if items and 0 <= index < len(items) and keyword in items[index] and items[index][keyword].value:
            return items[index][keyword].value[0]  # type: ignore[no-any-return]
    return None


def modality_values(source: Dataset, pixels: np.ndarray, frame: int = 0) -> np.ndarray:
    """Stored pixel values -> modality units (HU for CT) with the source's rescale.

    Parameters
    ----------
    source:
        The source image.
    pixels:
        Stored values of one frame, ``(rows, columns)``.
    frame:
        1-based frame number for a multi-frame source, 0 for a single-frame one.

    Returns
    -------
    numpy.ndarray
        ``float32`` values, ``(rows, columns)``.
    """
    holder: Dataset | None = source
    if frame and "RescaleSlope" not in source:
        holder = frame_item(source, "PixelValueTransformationSequence", frame)
    slope = _first(holder.get("RescaleSlope")) if holder is not None else None
    intercept = _first(holder.get("RescaleIntercept")) if holder is not None else None
    values = pixels.astype(np.float32)
    return values * np.float32(slope if slope else 1.0) + np.float32(intercept or 0.0)


def window_of(source: Dataset, values: np.ndarray, frame: int = 0) -> tuple[float, float]:
    """The (center, width) to display a slice with.

    The source's first Window Center/Width (for a multi-frame source, from its
    Frame VOI LUT functional group); else :data:`CT_DEFAULT_WINDOW` for CT; else
    the 1st to 99th percentile of the slice's values.
    """
    holder: Dataset | None = source
    if frame and "WindowCenter" not in source:
        holder = frame_item(source, "FrameVOILUTSequence", frame)
    if holder is not None:
        center, width = _first(holder.get("WindowCenter")), _first(holder.get("WindowWidth"))
        if center is not None and width is not None and width >= 1:
            return center, width
    if str(source.get("Modality", "")).upper() == "CT":
        return CT_DEFAULT_WINDOW
    low, high = (float(v) for v in np.percentile(values, (1, 99)))
    return (low + high) / 2, max(high - low, 1.0)


def windowed_gray(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Apply a linear VOI window (PS3.3 C.11.2.1.2.1) and return ``uint8`` grey levels."""
    scaled = ((values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5) * 255.0
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its edge (4-neighbourhood erosion)."""
    inner = mask.copy()
    for _ in range(width):
        eroded = inner.copy()
        eroded[1:, :] &= inner[:-1, :]
        eroded[:-1, :] &= inner[1:, :]
        eroded[:, 1:] &= inner[:, :-1]
        eroded[:, :-1] &= inner[:, 1:]
        eroded[0, :] = eroded[-1, :] = False
        eroded[:, 0] = eroded[:, -1] = False
        inner = eroded
    return mask & ~inner


@functools.lru_cache(maxsize=16)
def load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's default font at ``size`` pixels, loaded once per process and size."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):  # Pillow without FreeType: the fixed-size bitmap font
        return ImageFont.load_default()


def _legend_strip(
    columns: int, banner: str, segments: Sequence[SegmentSpec], font_size: int, note: str = ""
) -> np.ndarray:
    """Black strip with the banner and the note (each wrapped at spaces) and the legend entries below them."""
    entries = tuple((spec.name, tuple(int(c) for c in spec.color)) for spec in segments)
    return _legend_strip_of(columns, banner, entries, font_size, note)  # type: ignore[arg-type]


def _wrapped(text: str, width: float, measure: ImageDraw.ImageDraw,
             font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> list[str]:
    lines = [""]
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and measure.textlength(candidate, font=font) > width:
            lines.append(word)
        else:
            lines[-1] = candidate
    return lines


@functools.lru_cache(maxsize=64)
def _legend_strip_of(
    columns: int, banner: str, segments: tuple[tuple[str, tuple[int, int, int]], ...], font_size: int,
    note: str = "",
) -> np.ndarray:
    """:func:`_legend_strip` of ``(name, colour)`` entries; cached, so the array is read-only."""
    font = load_font(font_size)
    pad = max(2, font_size // 3)
    line = font_size + pad
    swatch = font_size
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    banner_lines = _wrapped(banner, columns - 2 * pad, measure, font)
    note_lines = _wrapped(note, columns - 2 * pad, measure, font) if note else []
    entries: list[list[tuple[str, tuple[int, int, int], int]]] = [[]]
    x = pad
    for name, color in segments:
        width = swatch + pad + int(measure.textlength(name, font=font)) + 2 * pad
        if entries[-1] and x + width > columns:
            entries.append([])
            x = pad
        entries[-1].append((name, color, x))
        x += width
    entries = [row for row in entries if row]
    height = pad + line * (len(banner_lines) + len(note_lines) + len(entries))
    strip = Image.new("RGB", (columns, height), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    for row, text in enumerate(banner_lines):
        draw.text((pad, pad + row * line), text, fill=_BANNER_COLOR, font=font)
    for row, text in enumerate(note_lines, start=len(banner_lines)):
        draw.text((pad, pad + row * line), text, fill=_TEXT_COLOR, font=font)
    for row, items in enumerate(entries, start=len(banner_lines) + len(note_lines)):
        y = pad + row * line
        for name, color, x in items:
            draw.rectangle((x, y, x + swatch - 1, y + swatch - 1), fill=color)
            draw.text((x + swatch + pad, y), name, fill=_TEXT_COLOR, font=font)
    array = np.asarray(strip).copy()
    array.flags.writeable = False
    return array


@functools.lru_cache(maxsize=256)
def _blend_table(color: tuple[float, float, float], alpha: float) -> np.ndarray:
    """Fill colour over each grey level 0-255: ``(3, 256)`` ``uint8``, one row per channel, read-only.

    The same float32 arithmetic as blending pixel by pixel (``grey * (1 - a) +
    colour * a``, rounded half to even), done once per grey level.  Rows are
    contiguous so a channel's lookup is a plain ``take``.
    """
    opacity = np.float32(alpha)
    levels = np.arange(256, dtype=np.float32)[None, :]
    colors = np.asarray(color, dtype=np.float32)[:, None]
    table = (levels * (1 - opacity) + colors * opacity).round().astype(np.uint8)
    table.flags.writeable = False
    return table


def segment_boxes(labels: np.ndarray, max_label: int) -> list[tuple[slice, slice] | None]:
    """Bounding box of each label ``1..max_label`` in a slice (index ``label - 1``; ``None`` if absent)."""
    if max_label < 1:
        return []
    return ndimage.find_objects(labels, max_label=max_label)  # type: ignore[no-any-return]


def render_overlay(
    values: np.ndarray,
    window: tuple[float, float],
    labels: np.ndarray,
    segments: Sequence[SegmentSpec],
    style: OverlayStyle,
    *,
    boxes: Sequence[tuple[slice, slice] | None] | None = None,
    note: str = "",
) -> np.ndarray:
    """Draw one slice with its segments, banner and legend.

    Parameters
    ----------
    values:
        The slice in modality units, ``(rows, columns)``.
    window:
        (center, width) of the display window.
    labels:
        Label map of the slice, ``(rows, columns)``; values are ``SegmentSpec.label``.
    segments:
        The segments to draw (those present in the slice), in legend order.
    style:
        Banner text and fill opacity.
    boxes:
        :func:`segment_boxes` of ``labels`` covering every label of
        ``segments``, when the caller already has them; computed otherwise.
    note:
        A line of text written under the banner (e.g. why there is no segment).

    Returns
    -------
    numpy.ndarray
        ``uint8`` RGB image ``(rows + strip, columns, 3)``; rows ``0..rows-1``
        are the slice, pixel for pixel.
    """
    rows, columns = values.shape
    gray = windowed_gray(values, *window)
    font_size = max(10, min(24, columns // 32))
    strip = _legend_strip(columns, style.banner, segments, font_size, note)
    image = np.empty((rows + strip.shape[0], columns, 3), dtype=np.uint8)
    for channel in range(3):  # one plane at a time: much faster than broadcasting gray[:, :, None]
        image[:rows, :, channel] = gray
    image[rows:] = strip
    if not segments:
        return image
    if boxes is None or len(boxes) < max(spec.label for spec in segments):
        boxes = segment_boxes(labels, max(spec.label for spec in segments))
    contour_width = max(1, min(rows, columns) // 256)
    for spec in segments:
        box = boxes[spec.label - 1] if spec.label >= 1 else None
        if box is None:
            continue
        # One pixel of margin (background) around the segment: the erosion in
        # _boundary then sees the same neighbours as on the whole slice.
        y0, y1 = max(box[0].start - 1, 0), min(box[0].stop + 1, rows)
        x0, x1 = max(box[1].start - 1, 0), min(box[1].stop + 1, columns)
        mask = labels[y0:y1, x0:x1] == spec.label
        region = image[y0:y1, x0:x1]
        table = _blend_table(tuple(float(c) for c in spec.color), float(style.fill_opacity))  # type: ignore[arg-type]
        contour = _boundary(mask, contour_width)
        under = gray[y0:y1, x0:x1]
        # Channel by channel: a masked copy into each strided plane is several
        # times faster than boolean indexing of the (rows, columns, 3) array.
        for channel, value in enumerate(np.asarray(spec.color, dtype=np.float32).round().astype(np.uint8)):
            plane = region[:, :, channel]
            np.copyto(plane, table[channel].take(under), where=mask)
            plane[contour] = value
    return image
