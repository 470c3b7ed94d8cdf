"""Prediction label map -> secondary-capture overlay series, for viewers that cannot show SEG.

One RGB Secondary Capture Image (PS3.3 A.8.1) per source slice that has at
least one segmented pixel:

- the source slice, windowed (the source's Window Center/Width, else a CT soft
  tissue window for CT, else the 1st-99th percentile of the slice), in grey;
- each segment present in the slice as a translucent fill in its recommended
  display colour (from the model card) with an opaque contour;
- below the image, a strip with the configurable banner (e.g. "AI result - not
  for primary diagnosis") and a legend (colour swatch + segment name) of the
  segments drawn on that slice.

The image keeps the source's rows, columns and pixel spacing; the strip adds
rows at the bottom, so source pixel ``(y, x)`` is overlay pixel ``(y, x)``.

Every overlay is in the source study, in one new series; its SOP Instance
UID is derived from the output identity and the source SOP Instance UID (and
frame number for a multi-frame source), so re-processing the same series
replaces each image instead of adding copies.  Instance Number is the
position of the source slice in the volume (1-based).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Collection, Iterator, Sequence
from typing import Any, Final

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID
from scipy import ndimage

from dicom_node.errors import ResultError
from dicom_node.results.identity import (
    DEFAULT_DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    SOFTWARE_NAME,
    OutputIdentity,
    software_versions,
)
from dicom_node.results.overlay import OverlayStyle, frame_item, modality_values, render_overlay, window_of
from dicom_node.results.source import character_set, complete_source, drop_invalid_copied
from inference.types import Prediction

logger = logging.getLogger(__name__)

CLEARED_NOTE: Final[str] = "No finding on this slice: replaces an earlier result"

# --------------------------------------------------------------------------- DICOM


def _orientation_letter(vector: Sequence[float]) -> str:
    axis = int(np.argmax(np.abs(vector)))
    positive, negative = (("L", "R"), ("P", "A"), ("H", "F"))[axis]
    return positive if vector[axis] > 0 else negative


def _value_of(source: Dataset, keyword: str, group: str, frame: int) -> object:
    """``keyword`` of the source, or for a multi-frame source of its ``group`` functional group item."""
    value = source.get(keyword)
    if value is None and frame:
        item = frame_item(source, group, frame)
        value = item.get(keyword) if item is not None else None
    return value


def _patient_orientation(source: Dataset, frame: int) -> tuple[str, str] | None:
    orientation: Any = _value_of(source, "ImageOrientationPatient", "PlaneOrientationSequence", frame)
    if orientation is None or len(orientation) != 6:
        return None
    values = [float(v) for v in orientation]
    return _orientation_letter(values[:3]), _orientation_letter(values[3:])


def _pixel_spacing(source: Dataset, frame: int) -> tuple[float, float] | None:
    spacing: Any = _value_of(source, "PixelSpacing", "PixelMeasuresSequence", frame)
    if spacing is None or len(spacing) != 2:
        return None
    return float(spacing[0]), float(spacing[1])


def source_slices(source_images: Sequence[Dataset], depth: int) -> list[tuple[Dataset, int]]:
    """``(dataset, frame number)`` for each label map slice (frame 0 = single-frame)."""
    if len(source_images) == 1 and int(source_images[0].get("NumberOfFrames", 1) or 1) > 1:
        frames = int(source_images[0].NumberOfFrames)
        if frames != depth:
            raise ResultError(f"Label map has {depth} slices but the multi-frame source has {frames} frames")
        return [(source_images[0], frame) for frame in range(1, frames + 1)]
    if len(source_images) != depth:
        raise ResultError(f"Label map has {depth} slices but {len(source_images)} source images were given")
    return [(ds, 0) for ds in source_images]


def overlay_uid(identity: OutputIdentity, source: Dataset, frame: int) -> str:
    """SOP Instance UID of the overlay of one source slice (deterministic)."""
    return identity.derive("overlay", str(source.SOPInstanceUID), str(frame))


def _source_reference(source: Dataset, frame: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame:
        item.ReferencedFrameNumber = frame
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return item


def frame_pixels(source: Dataset, frame: int, cache: dict[int, np.ndarray]) -> np.ndarray:
    if not frame:
        return np.asarray(source.pixel_array)
    key = id(source)
    if key not in cache:
        cache[key] = np.asarray(source.pixel_array)
    return cache[key][frame - 1]


def iter_overlays(
    prediction: Prediction,
    source_images: Sequence[Dataset],
    identity: OutputIdentity,
    *,
    style: OverlayStyle = OverlayStyle(),
    device_serial_number: str = DEFAULT_DEVICE_SERIAL_NUMBER,
    replaces: Collection[str] = (),
) -> Iterator[Dataset]:
    """Encode a prediction as one RGB Secondary Capture image per slice with findings, one image at a time.

    Everything that can make the series fail (the label map, its labels, the
    sources' pixel data and matrix) is checked before the first image is
    made, so that a caller handing images on as they come (to be sent while
    the rest are drawn) never hands on part of a series that then fails.

    The first image with a given header (patient, study, geometry: everything
    taken from the source except its SOP Instance UID) is built and checked by
    :class:`highdicom.sc.SCImage`; the next images with the same header are
    copies of it that differ only in their own attributes (SOP Instance UID,
    Instance Number, Rows, pixels, source reference).  The result is the same
    as building each with highdicom, at a fraction of the cost.

    Parameters
    ----------
    prediction:
        Model output with a label map ``[z, y, x]`` on the grid of the sources.
    source_images:
        The source instances with pixel data: one single-frame image per
        slice in ``z`` order, or one multi-frame image whose frame ``z + 1``
        is slice ``z``.
    identity:
        Series identity of the overlay series (its SOP Instance UID is not
        used; each image gets :func:`overlay_uid`).
    style:
        Banner and fill opacity.
    device_serial_number:
        Device Serial Number (0018,1000) naming this node instance.
    replaces:
        SOP Instance UIDs of results sent earlier for this series and model.
        A slice without findings whose overlay UID is among them gets an
        image all the same, without segments and with :data:`CLEARED_NOTE`,
        which replaces the earlier overlay (a re-run after late arrivals may
        find less than the first run did).

    Yields
    ------
    pydicom.Dataset
        The images in slice order; none when no segment is present and
        nothing is to be replaced.

    Raises
    ------
    ResultError
        If there is no label map, it does not fit the sources, it holds labels
        the card does not declare, or a source has no pixel data.
    """
    card = prediction.card
    labelmap = prediction.labelmap
    if labelmap is None or labelmap.ndim != 3:
        raise ResultError(f"Model {card.name!r} produced no 3D label map; no overlay produced")
    if not source_images:
        raise ResultError("No source images given: an overlay is drawn over its source image")
    if labelmap.dtype.kind not in "ui":
        raise ResultError(f"Label map must be of an integer type, got {labelmap.dtype}")
    if labelmap.dtype.kind == "i" and labelmap.size and int(labelmap.min()) < 0:
        raise ResultError("Label map has negative values; labels are 0 (background) or SegmentSpec.label")
    slices = source_slices(source_images, labelmap.shape[0])
    specs = {spec.label: spec for spec in card.segments}
    replaced = frozenset(replaces)
    drawn = _check_overlays(prediction, slices, specs, identity, replaced)
    cache: dict[int, np.ndarray] = {}
    templates: dict[tuple[str, ...], Dataset] = {}
    versions = software_versions(card)
    cleared = made = 0
    for z, (source, frame) in enumerate(slices):
        if z not in drawn:
            continue
        plane = labelmap[z]
        box = _nonzero_box(plane)
        note = ""
        if box is None:
            boxes: list[tuple[slice, ...] | None] = []
            note = CLEARED_NOTE
            cleared += 1
        else:
            # The labels present and where, found in the labelled part of the slice only.
            local = ndimage.find_objects(plane[box])
            boxes = [None if b is None else tuple(slice(b[i].start + box[i].start, b[i].stop + box[i].start)
                                                  for i in range(2)) for b in local]
        present = [label for label, found in enumerate(boxes, start=1) if found is not None]
        unknown = [v for v in present if v not in specs]
        if unknown:
            raise ResultError(f"Label map of model {card.name!r} contains labels {unknown} its card does not declare")
        if "PixelData" not in source and "FloatPixelData" not in source:
            raise ResultError("A source image has no pixel data: overlays need the source pixels")
        pixels = frame_pixels(source, frame, cache)
        if pixels.shape != plane.shape:
            raise ResultError(f"Label map slices are {plane.shape} but a source frame is {pixels.shape}")
        values = modality_values(source, pixels, frame)
        rgb = render_overlay(values, window_of(source, values, frame), plane,
                             [specs[v] for v in present], style, boxes=boxes, note=note)  # type: ignore[arg-type]
        key = _header_key(source, frame)
        template = templates.get(key)
        image: Dataset
        if template is None:
            image = _sc_image(source, frame, z, rgb, identity, card.name, versions,
                              device_serial_number, card.model_hash)
            templates[key] = image
        else:
            image = _copy_of(template, source, frame, z, rgb, identity)
        made += 1
        yield image
    logger.info("Overlay series %s: %d images, %d of them replacing earlier findings (model %s %s)",
                identity.series_instance_uid, made, cleared, card.name, card.version)


def _check_overlays(prediction: Prediction, slices: Sequence[tuple[Dataset, int]], specs: dict[int, Any],
                    identity: OutputIdentity, replaced: frozenset[str]) -> set[int]:
    """The slices that get an image, once every check of :func:`iter_overlays` has passed for all of them.

    Raises
    ------
    ResultError
        A label the card does not declare, a source without pixel data, or
        a source frame whose matrix differs from the label map's slices.
    """
    labelmap = prediction.labelmap
    assert labelmap is not None
    per_slice = prediction.slice_label_counts()
    if per_slice is None:  # a signed label map (checked non-negative above): counted here
        length = int(labelmap.max()) + 1
        per_slice = np.stack([np.bincount(plane.ravel(), minlength=length) for plane in labelmap])
    found = per_slice[:, 1:].any(axis=0)
    unknown = [label for label in (np.flatnonzero(found) + 1).tolist() if label not in specs]
    if unknown:
        raise ResultError(f"Label map of model {prediction.card.name!r} contains labels {unknown} its card "
                          "does not declare")
    with_findings: np.ndarray = np.asarray(per_slice[:, 1:].any(axis=1))
    drawn = {z for z, (source, frame) in enumerate(slices)
             if with_findings[z] or (replaced and overlay_uid(identity, source, frame) in replaced)}
    for z in sorted(drawn):
        source, _ = slices[z]
        if "PixelData" not in source and "FloatPixelData" not in source:
            raise ResultError("A source image has no pixel data: overlays need the source pixels")
        rows, columns = int(source.Rows), int(source.Columns)
        if (rows, columns) != labelmap.shape[1:]:
            raise ResultError(f"Label map slices are {labelmap.shape[1:]} but a source frame is {(rows, columns)}")
    return drawn


def _nonzero_box(plane: np.ndarray) -> tuple[slice, slice] | None:
    """Bounding box of the non-zero pixels of a slice, ``None`` when there are none."""
    rows = np.flatnonzero(plane.any(axis=1))
    if not rows.size:
        return None
    columns = np.flatnonzero(plane[rows[0]:rows[-1] + 1].any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(columns[0]), int(columns[-1]) + 1)


_HEADER_KEYWORDS: Final[tuple[str, ...]] = (
    "StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName", "SpecificCharacterSet", "Laterality",
    "BodyPartExamined", "SOPClassUID",
)
"""Source attributes an overlay's header is built from (with pixel spacing and orientation)."""


def _header_key(source: Dataset, frame: int) -> tuple[str, ...]:
    """Everything :func:`_sc_image` takes from a source except the image's own identity."""
    values = tuple(repr(source.get(keyword)) for keyword in _HEADER_KEYWORDS)
    return values + (repr(_pixel_spacing(source, frame)), repr(_patient_orientation(source, frame)))


_OWN_TAGS: Final[frozenset[int]] = frozenset(
    {0x00080018, 0x00200013, 0x00280010, 0x00280011, 0x7FE00010, 0x00082112}
)
"""SOP Instance UID, Instance Number, Rows, Columns, Pixel Data, Source Image Sequence."""


def _copied(dataset: Dataset, skip: frozenset[int] = frozenset()) -> Dataset:
    """A copy of ``dataset`` sharing no element or sequence item with it (values are immutable or copied)."""
    return Dataset({tag: _copied_element(element) for tag, element in dataset.items() if tag not in skip})


def _copied_element(element: DataElement | RawDataElement) -> DataElement | RawDataElement:
    if element.VR == "SQ" and isinstance(element, DataElement):
        return DataElement(element.tag, "SQ", [_copied(item) for item in element.value])
    return copy.copy(element)


def _copy_of(template: Dataset, source: Dataset, frame: int, z: int, rgb: np.ndarray,
             identity: OutputIdentity) -> Dataset:
    """An overlay with ``template``'s header and its own identity, size, pixels and source reference.

    Elements are copied (sequences item by item), never shared, so changing
    one image later cannot change another.
    """
    image = _copied(template, skip=_OWN_TAGS)
    sop_instance_uid = overlay_uid(identity, source, frame)
    image.SOPInstanceUID = sop_instance_uid
    image.InstanceNumber = z + 1
    image.Rows, image.Columns = rgb.shape[0], rgb.shape[1]
    image.add_new(0x7FE00010, "OB", np.ascontiguousarray(rgb).tobytes())
    image.SourceImageSequence = DicomSequence([_source_reference(source, frame)])
    image.file_meta = FileMetaDataset(_copied(template.file_meta))
    image.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    return image


def _sc_image(source: Dataset, frame: int, z: int, rgb: np.ndarray, identity: OutputIdentity,
              model_name: str, versions: list[str], device_serial_number: str,
              model_hash: str = "") -> hd.sc.SCImage:
    completed = complete_source(source)
    try:
        image = hd.sc.SCImage(
            pixel_array=rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            study_instance_uid=completed.StudyInstanceUID,
            series_instance_uid=identity.series_instance_uid,
            series_number=identity.series_number,
            sop_instance_uid=overlay_uid(identity, source, frame),
            instance_number=z + 1,
            manufacturer=MANUFACTURER,
            patient_id=completed.PatientID,
            patient_name=completed.PatientName,
            patient_birth_date=completed.PatientBirthDate,
            patient_sex=completed.PatientSex or None,
            accession_number=completed.AccessionNumber,
            study_id=completed.StudyID,
            study_date=completed.StudyDate or None,
            study_time=completed.StudyTime or None,
            referring_physician_name=completed.get("ReferringPhysicianName", ""),
            pixel_spacing=_pixel_spacing(source, frame),
            patient_orientation=_patient_orientation(source, frame) or ("L", "P"),
            specific_character_set=character_set(source),
        )
    except ValueError as exc:
        raise ResultError(f"Overlay for model {model_name!r} could not be encoded: {exc}") from exc
    image.SeriesDescription = identity.series_description
    image.ManufacturerModelName = SOFTWARE_NAME
    image.SoftwareVersions = list(versions)  # type: ignore[assignment]  # highdicom types it as one value
    image.DeviceSerialNumber = device_serial_number
    image.BurnedInAnnotation = "YES"
    image.Laterality = source.get("Laterality", "")  # Type 2C: unknown for an image of both sides
    if "BodyPartExamined" in source:
        image.BodyPartExamined = source.BodyPartExamined
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.DerivationDescription = f"Segmentation by {model_name} drawn over the source image"[:1024]
    if model_hash:
        image.DerivationDescription += f" (model hash {model_hash})"
    image.SourceImageSequence = DicomSequence([_source_reference(source, frame)])
    drop_invalid_copied(image, source)
    return image
