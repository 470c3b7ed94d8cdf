"""Prediction -> Encapsulated PDF summary for referring clinicians (own output kind ``pdf``).

The PDF (made with Pillow, no other dependency) has A4 or US Letter pages
(``outputs.paper``) at 150 dpi:

- a header with the banner, the model (name, version, hash) and the node's version;
- a table: one row per segment with its measurements (value and unit, as a
  person writes it: HU, ml, %), then one row per classification (probability,
  positive or not), then the model's free-text findings; every cell wraps
  within its column and the table continues on the next page;
- key images: for each segment present, the slice where it is largest, drawn
  as in the secondary-capture overlay (see :mod:`dicom_node.results.sc`),
  at most :data:`MAX_KEY_IMAGES`, in slice order.

No patient identifier is written into the PDF content: the DICOM header
(copied patient and study modules) identifies the patient, as for every
other result object.  The DICOM object is an Encapsulated PDF Storage
instance (PS3.3 A.45.1) in the source study, in its own series (Modality
``DOC``), with a deterministic SOP Instance UID and Source Instance Sequence
referencing the key images' source instances.
"""

from __future__ import annotations

import datetime
import io
import logging
from collections.abc import Sequence
from typing import Final

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, EncapsulatedPDFStorage, ExplicitVRLittleEndian

from dicom_node.errors import ResultError
from dicom_node.results.identity import (
    DEFAULT_DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    SOFTWARE_NAME,
    SOFTWARE_VERSION,
    OutputIdentity,
    software_versions,
)
from dicom_node.results.overlay import OverlayStyle, load_font, modality_values, render_overlay, window_of
from dicom_node.results.sc import frame_pixels, source_slices
from dicom_node.results.source import character_set, complete_source
from inference.types import Prediction

logger = logging.getLogger(__name__)

MAX_KEY_IMAGES: Final[int] = 6
"""Most key images in one PDF."""

_DPI: Final[float] = 150.0
#: Paper sizes in inches (width, height).
PAPER: Final[dict[str, tuple[float, float]]] = {"a4": (8.27, 11.69), "letter": (8.5, 11.0)}
_MARGIN: Final[int] = 60  # 0.4 inch at 150 dpi
#: UCUM codes as people write the units (others print as their code).
UNIT_SYMBOLS: Final[dict[str, str]] = {"[hnsf'U]": "HU", "1": "", "{ratio}": "", "mm2": "mm²", "mm3": "mm³",
                                       "cm2": "cm²", "cm3": "cm³", "ml": "ml", "mL": "ml", "%": "%", "mm": "mm",
                                       "cm": "cm", "g/cm3": "g/cm³", "/min": "/min", "s": "s"}
_COPIED: Final[tuple[str, ...]] = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
_DOCUMENT_TITLE: Final[str] = "AI result summary"


def _font(points: float) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return load_font(round(points * _DPI / 72))


def unit_symbol(code: str) -> str:
    """The unit as a person writes it (``[hnsf'U]`` -> ``HU``)."""
    return UNIT_SYMBOLS.get(code, code)


def _value(value: float, unit: str) -> str:
    symbol = unit_symbol(unit)
    return f"{value:.4g} {symbol}".rstrip() if symbol != "%" else f"{value:.4g} %"


def wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (at spaces; a word longer than a line is cut)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width:  # a very long token: cut it where it fits
                cut = max(1, int(len(word) * width / max(font.getlength(word), 1.0)))
                while cut > 1 and font.getlength(word[:cut]) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _table_rows(prediction: Prediction) -> list[tuple[str, str]]:
    card = prediction.card
    rows: list[tuple[str, str]] = []
    present = {spec.label for spec in prediction.present_segments()}
    for spec in card.segments:
        items = prediction.measurements.get(spec.label, ())
        values = "; ".join(f"{m.concept.meaning} {_value(m.value, m.unit.value)}" for m in items)
        if not values:
            values = "present" if spec.label in present else "not found"
        rows.append((spec.name, values))
    for item in prediction.classifications:
        verdict = "positive" if item.positive else "negative"
        rows.append((item.name, f"probability {item.probability:.3f} ({verdict})"))
    rows.extend(("Finding", text) for text in prediction.findings if text.strip())
    return rows


def key_slices(prediction: Prediction) -> list[int]:
    """Slice indices ``z`` where each present segment has its largest area (unique, sorted)."""
    labelmap = prediction.labelmap
    if labelmap is None or labelmap.ndim != 3:
        return []
    chosen: set[int] = set()
    for spec in prediction.present_segments():
        areas = (labelmap == spec.label).sum(axis=(1, 2))
        chosen.add(int(np.argmax(areas)))
    return sorted(chosen)[:MAX_KEY_IMAGES]


def _pages(prediction: Prediction, key_images: Sequence[np.ndarray], style: OverlayStyle,
           paper: str = "a4") -> list[Image.Image]:
    card = prediction.card
    inches = PAPER.get(paper, PAPER["a4"])
    size = (round(inches[0] * _DPI), round(inches[1] * _DPI))
    width, height = size
    title, body, small = _font(16), _font(10), _font(7.5)
    line_height = round(body.size * 1.35) if hasattr(body, "size") else 20
    pages = [Image.new("RGB", size, (255, 255, 255))]
    draw = ImageDraw.Draw(pages[0])
    content = width - 2 * _MARGIN
    y = _MARGIN

    def text_block(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, fill: tuple[int, int, int],
                   step: int) -> None:
        nonlocal y
        for line in wrap(text, font, content):
            draw.text((_MARGIN, y), line, fill=fill, font=font)
            y += step

    text_block(_DOCUMENT_TITLE, title, (0, 0, 0), round(line_height * 1.8))
    text_block(style.banner, body, (180, 0, 0), line_height)
    text_block(f"Model {card.name} {card.version}", body, (0, 0, 0), line_height)
    if card.model_hash:
        text_block(f"Model hash {card.model_hash}", small, (90, 90, 90), round(line_height * 0.8))
    text_block(f"{SOFTWARE_NAME} {SOFTWARE_VERSION}", body, (90, 90, 90), line_height)
    y += line_height // 2
    name_width = round(content * 0.3)
    gap = 16
    values_x, values_width = _MARGIN + name_width + gap, content - name_width - gap
    for name, values in _table_rows(prediction):
        names, cells = wrap(name, body, name_width), wrap(values, body, values_width)
        rows = max(len(names), len(cells))
        if y + rows * line_height > height - _MARGIN:
            pages.append(Image.new("RGB", size, (255, 255, 255)))
            draw, y = ImageDraw.Draw(pages[-1]), _MARGIN
        draw.line((_MARGIN, y - 4, width - _MARGIN, y - 4), fill=(200, 200, 200))
        for i in range(rows):
            if i < len(names):
                draw.text((_MARGIN, y + i * line_height), names[i], fill=(0, 0, 0), font=body)
            if i < len(cells):
                draw.text((values_x, y + i * line_height), cells[i], fill=(0, 0, 0), font=body)
        y += rows * line_height + 6
    y += line_height
    tile = (content - _MARGIN) // 2
    x = _MARGIN
    for image in key_images:
        picture = Image.fromarray(image)
        scale = tile / max(picture.width, picture.height)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
        if y + picture.height > height - _MARGIN:
            pages.append(Image.new("RGB", size, (255, 255, 255)))
            draw, y, x = ImageDraw.Draw(pages[-1]), _MARGIN, _MARGIN
        pages[-1].paste(picture, (x, y))
        if x == _MARGIN:
            x = 2 * _MARGIN + tile
        else:
            x, y = _MARGIN, y + tile + 10
    return pages


def render_pdf(prediction: Prediction, source_images: Sequence[Dataset], style: OverlayStyle,
               paper: str = "a4") -> tuple[bytes, list[tuple[Dataset, int]]]:
    """Render the summary PDF.

    Returns
    -------
    tuple
        The PDF bytes and ``(source dataset, frame number)`` of each key image.
    """
    key_images: list[np.ndarray] = []
    references: list[tuple[Dataset, int]] = []
    labelmap = prediction.labelmap
    if labelmap is not None and labelmap.ndim == 3 and source_images:
        slices = source_slices(source_images, labelmap.shape[0])
        specs = {spec.label: spec for spec in prediction.card.segments}
        cache: dict[int, np.ndarray] = {}
        for z in key_slices(prediction):
            source, frame = slices[z]
            values = modality_values(source, frame_pixels(source, frame, cache), frame)
            present = [specs[int(v)] for v in np.unique(labelmap[z]) if v != 0 and int(v) in specs]
            key_images.append(render_overlay(values, window_of(source, values, frame), labelmap[z], present, style))
            references.append((source, frame))
    pages = _pages(prediction, key_images, style, paper)
    buffer = io.BytesIO()
    pages[0].save(buffer, "PDF", save_all=True, append_images=pages[1:], resolution=_DPI,
                  title=_DOCUMENT_TITLE, author=SOFTWARE_NAME, producer=SOFTWARE_NAME)
    return buffer.getvalue(), references


def build_pdf(
    prediction: Prediction,
    source_images: Sequence[Dataset],
    identity: OutputIdentity,
    *,
    style: OverlayStyle = OverlayStyle(),
    device_serial_number: str = DEFAULT_DEVICE_SERIAL_NUMBER,
    paper: str = "a4",
) -> Dataset:
    """Encode the summary as an Encapsulated PDF Storage instance in the source study.

    Parameters
    ----------
    prediction:
        Model output (segments with measurements, classifications, findings).
    source_images:
        The source instances with pixel data (see :func:`~dicom_node.results.sc.iter_overlays`).
    identity:
        Series/SOP Instance UIDs, Series Number and Series Description of the PDF object.
    style:
        Banner and fill opacity of the key images.
    device_serial_number:
        Device Serial Number (0018,1000) naming this node instance.
    paper:
        ``a4`` or ``letter``.

    Returns
    -------
    pydicom.Dataset
        The Encapsulated PDF dataset with file meta, ready for ``save_as``.

    Raises
    ------
    ResultError
        If no source image is given or the label map does not fit the sources.
    """
    if not source_images:
        raise ResultError("No source images given: a PDF summary belongs to the study of its images")
    card = prediction.card
    source = complete_source(source_images[0])
    document, references = render_pdf(prediction, source_images, style, paper)
    now = datetime.datetime.now()

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(identity.sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = UID(PYDICOM_IMPLEMENTATION_UID)
    ds.SpecificCharacterSet = character_set(source_images[0])
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = identity.sop_instance_uid
    for keyword in _COPIED:
        if keyword in source:
            ds[keyword] = source[keyword]
        else:
            setattr(ds, keyword, "")
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = identity.series_instance_uid
    ds.SeriesNumber = identity.series_number
    ds.SeriesDescription = identity.series_description
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = SOFTWARE_NAME
    ds.SoftwareVersions = list(software_versions(card))
    ds.DeviceSerialNumber = device_serial_number
    ds.ConversionType = "SYN"
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = f"{_DOCUMENT_TITLE} - {card.name} {card.version}"[:64]
    ds.ConceptNameCodeSequence = DicomSequence()
    if references:
        items = []
        for ref, frame in references:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.SOPClassUID
            item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
            if frame:
                item.ReferencedFrameNumber = frame
            items.append(item)
        ds.SourceInstanceSequence = DicomSequence(items)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = document + (b"\x00" if len(document) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(document)
    logger.info("PDF %s: %d bytes, %d key images (model %s %s)", identity.sop_instance_uid, len(document),
                len(references), card.name, card.version)
    return ds
