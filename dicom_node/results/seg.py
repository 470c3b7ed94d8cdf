"""Prediction label map -> DICOM Segmentation (SEG) in the source study.

The SEG is a highdicom :class:`highdicom.seg.Segmentation` of type BINARY:

- one segment per :class:`~inference.types.SegmentSpec` of the model card that
  has at least one voxel in the label map (empty segments are left out unless
  ``omit_empty_segments=False``), numbered ``1..n`` consecutively in the order
  of their labels; the mapping label -> segment number is returned so that the
  SR can reference each segment;
- Segment Label, Segmented Property Category and Type from the card (SNOMED CT),
  Recommended Display CIELab Value from the card's RGB colour, Tracking ID /
  Tracking UID per segment, algorithm identification (card name, version and
  the CID 7162 family), Segment Algorithm Type AUTOMATIC;
- frames reference the source instances (Derivation Image / Source Image
  Sequence, filled in by highdicom); frames without any segmented pixel are
  omitted;
- patient and study modules copied from the source by highdicom; series and
  instance identity from :class:`~dicom_node.results.identity.OutputIdentity`.

A prediction without any segment present gives no SEG at all
(:class:`~dicom_node.errors.ResultError`): the caller then writes only an SR
that records the finding.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode
from pydicom.valuerep import VALIDATORS

from dicom_node.errors import ResultError
from dicom_node.results.identity import (
    DEFAULT_DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    SOFTWARE_NAME,
    OutputIdentity,
    algorithm_parameters,
    software_versions,
)
from inference.types import Code, ModelCard, Prediction, SegmentSpec

logger = logging.getLogger(__name__)

_CONTENT_LABEL_PATTERN: Final[re.Pattern[str]] = re.compile(r"^[A-Z0-9_ ]{1,16}$")
_MAX_LO_LENGTH: Final[int] = 64
_UTF8: Final[str] = "ISO_IR 192"
_COPIED_TYPE2: Final[tuple[str, ...]] = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
_PATIENT_GROUP: Final[int] = 0x0010
_UNCHECKED_VRS: Final[frozenset[str]] = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "UI"})
_SHARED_GEOMETRY: Final[tuple[str, ...]] = ("PlaneOrientationSequence", "PixelMeasuresSequence")
_DEFAULT_REPERTOIRE_EXTENSION: Final[str] = "ISO 2022 IR 6"


@dataclass(frozen=True)
class SegResult:
    """A SEG object and how its segments relate to the model's labels.

    Parameters
    ----------
    dataset:
        The Segmentation instance (a :class:`pydicom.Dataset`), ready to be
        written with ``dataset.save_as(path)``.
    segment_numbers:
        Label map value (:attr:`SegmentSpec.label`) -> Segment Number
        (0062,0004) for every segment in the SEG.  Labels absent from the
        mapping have no segment (they were empty and omitted).
    """

    dataset: hd.seg.Segmentation
    segment_numbers: Mapping[int, int]


def to_coded_concept(code: Code) -> hd.sr.CodedConcept:
    """Convert a model-card :class:`~inference.types.Code` to a highdicom coded concept.

    Parameters
    ----------
    code:
        ``(value, scheme, meaning)`` of the concept.

    Returns
    -------
    highdicom.sr.CodedConcept
        The same concept; long values are encoded as Long Code Value by highdicom.

    Raises
    ------
    ResultError
        If the code cannot be encoded (empty value, scheme or meaning).
    """
    if not code.value or not code.scheme or not code.meaning:
        raise ResultError(f"Code {code!r} needs a value, a scheme and a meaning: fix the model card")
    try:
        return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)
    except ValueError as exc:
        raise ResultError(f"Code {code!r} cannot be encoded in DICOM: {exc}") from exc


def complete_source(source: Dataset) -> Dataset:
    """The source as highdicom needs it, without modifying it.

    - highdicom copies Patient ID, Patient's Name, Birth Date, Sex, Study ID,
      Date, Time and Accession Number from the first source; real sources
      often leave some of these Type 2 attributes out, which PS3.3 allows
      only as an empty value: absent ones are added empty.
    - For a multi-frame source highdicom reads the Plane Orientation and Pixel
      Measures from the Shared Functional Groups; many scanners (Philips
      Enhanced MR, for one) put them in every per-frame item instead.  When
      all frames carry the same values, they are copied into the shared item.

    Parameters
    ----------
    source:
        A source image; it is never modified.

    Returns
    -------
    pydicom.Dataset
        ``source`` itself when nothing is missing, else a new dataset that
        shares the source's other elements and its file meta.

    Raises
    ------
    ResultError
        If the frames of a multi-frame source differ in orientation or pixel
        measures (they are not one volume).
    """
    missing = [keyword for keyword in _COPIED_TYPE2 if keyword not in source]
    shared = _shared_geometry(source)
    if not missing and shared is None:
        return source
    completed = Dataset(dict(source.items()))
    if hasattr(source, "file_meta"):
        completed.file_meta = source.file_meta
    for keyword in missing:
        setattr(completed, keyword, "")
    if shared is not None:
        completed.SharedFunctionalGroupsSequence = [shared]
    logger.debug("Source %s completed for encoding (absent: %s)", source.get("SOPInstanceUID", "?"), missing)
    return completed


def _shared_geometry(source: Dataset) -> Dataset | None:
    """A Shared Functional Groups item with per-frame geometry moved in, or ``None`` if not needed."""
    per_frame = source.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return None
    shared_items = source.get("SharedFunctionalGroupsSequence") or [Dataset()]
    shared = shared_items[0]
    needed = [keyword for keyword in _SHARED_GEOMETRY if keyword not in shared]
    if not needed:
        return None
    completed = Dataset(dict(shared.items()))
    for keyword in needed:
        items = [frame.get(keyword) for frame in per_frame]
        if any(not item for item in items):
            continue  # neither shared nor in every frame: highdicom says what is missing
        values = [_geometry_values(item[0]) for item in items]
        if any(len(v) != len(values[0]) or not np.allclose(v, values[0], atol=1e-4) for v in values):
            raise ResultError(
                f"Frames of the multi-frame source differ in {keyword}: it is not one volume; no SEG produced"
            )
        setattr(completed, keyword, items[0])
    return completed


def _geometry_values(item: Dataset) -> list[float]:
    values: list[float] = []
    for keyword in ("ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices"):
        value = item.get(keyword)
        if value is None or value == "":
            continue
        items = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
        values.extend(float(v) for v in items)
    return values


def drop_invalid_copied(result: Dataset, source: Dataset) -> list[str]:
    """Remove optional attributes copied from the source whose values are invalid for their VR.

    highdicom copies the Patient and Patient Study modules of the source,
    including optional (Type 3) attributes such as Patient's Age; a value the
    source got wrong (``"0Y"`` for AS) would make the result fail validation.
    Only patient attributes (group 0010) equal to the source's are checked;
    the Type 2 ones highdicom needs are kept as they are.

    Parameters
    ----------
    result:
        The new object; modified in place.
    source:
        The source image the attributes were copied from.

    Returns
    -------
    list of str
        Keywords of the removed attributes.
    """
    removed = []
    # Only patient attributes are checked: select them by tag before touching any element.
    for tag in sorted(tag for tag in result.keys() if tag >> 16 == _PATIENT_GROUP):
        element = result[tag]
        keyword = element.keyword
        if (
            element.VR in _UNCHECKED_VRS
            or keyword in _COPIED_TYPE2
            or keyword not in source
            or source[element.tag].value != element.value
        ):
            continue
        values = element.value if isinstance(element.value, MultiValue) else [element.value]
        if element.VR in ("IS", "DS"):
            values = [str(value) for value in values if value is not None]
        validator = VALIDATORS.get(element.VR)
        if validator is None:
            continue
        if not all(validator(element.VR, value)[0] for value in values if value is not None):
            del result[element.tag]
            removed.append(keyword)
    if removed:
        logger.info("Dropped source attributes with values invalid for their VR: %s", ", ".join(removed))
    return removed


def character_set(source: Dataset) -> str | list[str]:
    """Specific Character Set for an object derived from ``source``.

    highdicom copies the source's value, which must then be a defined term;
    real sources often carry an empty value (meaning the default repertoire).

    Parameters
    ----------
    source:
        A source image.

    Returns
    -------
    str or list of str
        The source's value when it names a character set; ``"ISO_IR 192"``
        (UTF-8, a superset of the default repertoire) when the source has no
        or an empty value; empty components of a multi-valued source value
        replaced by ``"ISO 2022 IR 6"``.
    """
    value = source.get("SpecificCharacterSet")
    if value is None or isinstance(value, str):
        return value.strip() if value and value.strip() else _UTF8
    terms = [str(term).strip() or _DEFAULT_REPERTOIRE_EXTENSION for term in value]
    if not any(term != _DEFAULT_REPERTOIRE_EXTENSION for term in terms):
        return _UTF8
    return terms if len(terms) > 1 else terms[0]


def algorithm_family_code(family: str) -> PydicomCode:
    """Return the CID 7162 "Algorithm Family" code whose meaning is ``family``.

    Parameters
    ----------
    family:
        Code meaning, compared without regard to case, e.g.
        ``"Artificial Intelligence"`` or ``"Morphological Operations"``.

    Returns
    -------
    pydicom.sr.coding.Code
        The code of the family.

    Raises
    ------
    ResultError
        If no CID 7162 code has that meaning; the message lists the allowed ones.
    """
    cid = codes.cid7162
    known = [getattr(cid, keyword) for keyword in cid.dir()]
    for code in known:
        if code.meaning.casefold() == family.strip().casefold():
            return code
    allowed = ", ".join(sorted(code.meaning for code in known))
    raise ResultError(f"Model family {family!r} is not a CID 7162 algorithm family; use one of: {allowed}")


def algorithm_identification(card: ModelCard) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence (name, version, family) of a model card.

    Parameters
    ----------
    card:
        The card of the model that made the prediction.

    Returns
    -------
    highdicom.AlgorithmIdentificationSequence
        The sequence to put in every segment description.

    Raises
    ------
    ResultError
        If the card's family is not a CID 7162 family.
    """
    return hd.AlgorithmIdentificationSequence(
        name=card.name,
        family=algorithm_family_code(card.family),
        version=card.version,
        parameters=algorithm_parameters(card),
    )


def segment_tracking_uid(seg_identity: OutputIdentity, label: int) -> str:
    """Tracking UID of the segment of label ``label`` in the SEG of ``seg_identity``.

    Parameters
    ----------
    seg_identity:
        Identity of the SEG object.
    label:
        Label map value of the segment.

    Returns
    -------
    str
        A UID, deterministic for the SEG and the label.
    """
    return seg_identity.derive("segment-tracking", str(label))


def _check_frames(source_images: Sequence[Dataset], shape: tuple[int, ...]) -> None:
    """Check that the label map matches the source frames one to one.

    Raises
    ------
    ResultError
        If the number of frames, the rows or the columns differ.
    """
    if not source_images:
        raise ResultError("No source images given: a SEG must reference the images it was derived from")
    depth = shape[0]
    first = source_images[0]
    frames = int(first.get("NumberOfFrames", 1) or 1)
    if len(source_images) == 1 and frames > 1:
        if frames != depth:
            raise ResultError(
                f"Label map has {depth} slices but the multi-frame source has {frames} frames: "
                "the label map must have one slice per source frame, in frame order"
            )
    else:
        if len(source_images) != depth:
            raise ResultError(
                f"Label map has {depth} slices but {len(source_images)} source images were given: "
                "pass one single-frame source image per slice, in slice order"
            )
        if any(int(ds.get("NumberOfFrames", 1) or 1) != 1 for ds in source_images):
            raise ResultError(
                "Several source images given but some are multi-frame: pass one series of single frames"
            )
    for ds in source_images:
        if (int(ds.Rows), int(ds.Columns)) != shape[1:]:
            raise ResultError(
                f"Label map slices are {shape[1]}x{shape[2]} but a source image is {ds.Rows}x{ds.Columns}: "
                "the label map must be on the source image grid"
            )


def _label_counts(labelmap: np.ndarray) -> np.ndarray:
    """Voxel count per label value (index = label), in one pass over the array."""
    if labelmap.dtype.kind not in "ui":
        raise ResultError(f"Label map must be of an integer type, got {labelmap.dtype}")
    if labelmap.size == 0:
        raise ResultError("Label map is empty (a dimension of size 0)")
    if labelmap.dtype.kind == "i" and int(labelmap.min()) < 0:
        raise ResultError("Label map has negative values; labels are 0 (background) or SegmentSpec.label")
    # bincount of the whole array first casts it to intp (8 bytes per voxel): slice by slice
    # is an order of magnitude faster on a 300x512x512 uint8 label map.
    length = int(labelmap.max()) + 1
    counts = np.zeros(length, dtype=np.int64)
    for plane in labelmap:
        if plane.any():
            counts += np.bincount(plane.ravel(), minlength=length)
        else:  # an empty slice (most of a volume, often): only background
            counts[0] += plane.size
    return counts


def _to_segment_numbers(labelmap: np.ndarray, segment_numbers: Mapping[int, int], length: int) -> np.ndarray:
    """Label map with label values replaced by segment numbers (0 stays background).

    Labels without a segment (none when called from :func:`build_seg`, which
    rejects undeclared labels) become background.  When labels already equal
    segment numbers the unsigned input is used as it is, without a copy.
    """
    identical = all(label == number for label, number in segment_numbers.items())
    if identical and labelmap.dtype.kind == "u" and length - 1 <= len(segment_numbers):
        return labelmap
    lut = np.zeros(length, dtype=np.uint8 if len(segment_numbers) < 256 else np.uint16)
    for label, number in segment_numbers.items():
        if label < length:
            lut[label] = number
    return lut[labelmap]


def _select_segments(
    prediction: Prediction, counts: np.ndarray, omit_empty_segments: bool, clearing: bool = False
) -> tuple[SegmentSpec, ...]:
    card = prediction.card
    declared = {spec.label for spec in card.segments}
    if len(declared) != len(card.segments) or any(label <= 0 for label in declared):
        raise ResultError(f"Model card {card.name!r} has duplicate or non-positive segment labels")
    found = {int(label) for label in np.flatnonzero(counts) if label != 0}
    undeclared = sorted(found - declared)
    if undeclared:
        raise ResultError(
            f"Label map of model {card.name!r} contains labels {undeclared} that its card does not "
            "declare: add them to the card's segments or fix the model's output"
        )
    specs = sorted(card.segments, key=lambda spec: spec.label)
    if not found and clearing and specs:
        return tuple(specs)
    if omit_empty_segments:
        specs = [spec for spec in specs if spec.label in found]
    if not found:
        raise ResultError(
            f"Model {card.name!r}: no segment present; no SEG produced (record the finding in the SR only)"
        )
    return tuple(specs)


def _segment_description(
    spec: SegmentSpec,
    number: int,
    identity: OutputIdentity,
    algorithm: hd.AlgorithmIdentificationSequence,
) -> hd.seg.SegmentDescription:
    if not spec.name or len(spec.name) > _MAX_LO_LENGTH:
        raise ResultError(
            f"Segment name {spec.name!r} must be 1 to {_MAX_LO_LENGTH} characters: fix the model card"
        )
    red, green, blue = spec.color
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=spec.name,
        segmented_property_category=to_coded_concept(spec.category),
        segmented_property_type=to_coded_concept(spec.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=segment_tracking_uid(identity, spec.label),
        tracking_id=spec.name,
        display_color=hd.color.CIELabColor.from_rgb(red, green, blue),
    )


def build_seg(
    prediction: Prediction,
    source_images: Sequence[Dataset],
    identity: OutputIdentity,
    *,
    content_label: str = "AI_SEG",
    omit_empty_segments: bool = True,
    device_serial_number: str = DEFAULT_DEVICE_SERIAL_NUMBER,
    segmentation_type: str | hd.seg.SegmentationTypeValues = hd.seg.SegmentationTypeValues.BINARY,
    clearing: bool = False,
) -> SegResult:
    """Encode a prediction's label map as a DICOM Segmentation (BINARY or LABELMAP).

    Parameters
    ----------
    prediction:
        Model output.  ``prediction.labelmap`` is indexed ``[z, y, x]``; slice
        ``z`` lies on the grid of ``source_images[z]`` (single-frame sources,
        in slice order) or of frame ``z + 1`` of ``source_images[0]`` (one
        multi-frame source).
    source_images:
        The source instances, complete datasets (pixel data is not needed).
        Their patient and study attributes are copied into the SEG.
    identity:
        Series/SOP Instance UIDs, Series Number and Series Description of the SEG.
    content_label:
        Content Label (0070,0080): 1 to 16 upper-case letters, digits, ``_`` or space.
    omit_empty_segments:
        If true (default), card segments without any voxel in the label map
        are not described in the SEG; the returned mapping tells which labels
        got a segment.  If false, every card segment is described, empty or not.
    device_serial_number:
        Device Serial Number (0018,1000) naming this node instance.
    segmentation_type:
        ``"BINARY"`` (default: Segmentation Storage, one bit-packed frame per
        segment and slice, shown by every SEG-capable viewer) or
        ``"LABELMAP"`` (Label Map Segmentation Storage, 1.2.840.10008.5.1.4.1.1.66.7,
        one 8/16-bit frame per slice holding segment numbers: much smaller with
        many segments, but only recent viewers read it).
    clearing:
        When no segment is present, make an empty SEG instead of refusing: it
        describes every card segment and holds empty frames only (of the
        first source slice, for single-frame sources).  It replaces an earlier
        SEG of the same identity whose findings a re-run no longer finds, so
        the PACS does not keep showing them.

    Returns
    -------
    SegResult
        The Segmentation dataset and the label -> segment number mapping.

    Raises
    ------
    ResultError
        If there is no label map, no segment is present ("no SEG produced";
        not when ``clearing``),
        the label map does not match the source frames, the card is
        inconsistent with the label map, or highdicom rejects the input.
    """
    card = prediction.card
    labelmap = prediction.labelmap
    try:
        seg_type = hd.seg.SegmentationTypeValues(
            segmentation_type.upper() if isinstance(segmentation_type, str) else segmentation_type
        )
    except ValueError:
        raise ResultError(f"Segmentation type {segmentation_type!r} must be BINARY or LABELMAP") from None
    if seg_type is hd.seg.SegmentationTypeValues.FRACTIONAL:
        raise ResultError("FRACTIONAL segmentations are not produced: model outputs are label maps")
    if labelmap is None:
        raise ResultError(f"Model {card.name!r} produced no label map; no SEG produced")
    if labelmap.ndim != 3:
        raise ResultError(f"Label map must be 3D (z, y, x), got shape {labelmap.shape}")
    if not _CONTENT_LABEL_PATTERN.match(content_label):
        raise ResultError(
            f"Content label {content_label!r} must be 1-16 characters of A-Z, 0-9, '_' or space"
        )
    _check_frames(source_images, labelmap.shape)
    counts = _label_counts(labelmap)
    specs = _select_segments(prediction, counts, omit_empty_segments, clearing)
    content_description = f"{card.name} {card.version}"
    if clearing and not counts[1:].any():
        content_description += ": no segment found"
        if len(source_images) > 1:  # one empty frame per segment is enough to replace the earlier SEG
            source_images, labelmap = source_images[:1], labelmap[:1]

    segment_numbers = {spec.label: number for number, spec in enumerate(specs, start=1)}
    algorithm = algorithm_identification(card)
    descriptions = [
        _segment_description(spec, segment_numbers[spec.label], identity, algorithm) for spec in specs
    ]
    segments_array = _to_segment_numbers(labelmap, segment_numbers, counts.shape[0])

    try:
        seg = hd.seg.Segmentation(
            source_images=[complete_source(source_images[0]), *source_images[1:]],
            pixel_array=segments_array,
            segmentation_type=seg_type,
            segment_descriptions=descriptions,
            series_instance_uid=identity.series_instance_uid,
            series_number=identity.series_number,
            sop_instance_uid=identity.sop_instance_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=SOFTWARE_NAME,
            software_versions=software_versions(card),
            device_serial_number=device_serial_number,
            content_description=content_description[:_MAX_LO_LENGTH],
            content_label=content_label,
            series_description=identity.series_description,
            specific_character_set=character_set(source_images[0]),
            omit_empty_frames=True,
        )
    except ValueError as exc:
        raise ResultError(f"SEG for model {card.name!r} could not be encoded: {exc}") from exc
    drop_invalid_copied(seg, source_images[0])
    logger.info(
        "SEG %s (%s): %d segments, %d frames (model %s %s)",
        identity.sop_instance_uid,
        seg_type.value,
        len(descriptions),
        int(seg.NumberOfFrames),
        card.name,
        card.version,
    )
    return SegResult(dataset=seg, segment_numbers=segment_numbers)
