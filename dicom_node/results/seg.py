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

from dicom_node.errors import ResultError
from dicom_node.results.content import algorithm_identification, to_coded_concept
from dicom_node.results.identity import (
    DEFAULT_DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    SOFTWARE_NAME,
    OutputIdentity,
    software_versions,
)
from dicom_node.results.source import character_set, complete_source, drop_invalid_copied
from inference.types import Prediction, SegmentSpec

logger = logging.getLogger(__name__)

_CONTENT_LABEL_PATTERN: Final[re.Pattern[str]] = re.compile(r"^[A-Z0-9_ ]{1,16}$")
_MAX_LO_LENGTH: Final[int] = 64


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
    region = None
    if spec.site is not None:  # a finding in an organ: the organ is the anatomic region, the side qualifies it
        region = to_coded_concept(spec.site)
        if spec.modifier is not None:
            region.AnatomicRegionModifierSequence = [to_coded_concept(spec.modifier)]
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=spec.name,
        segmented_property_category=to_coded_concept(spec.category),
        segmented_property_type=to_coded_concept(spec.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=segment_tracking_uid(identity, spec.label),
        tracking_id=spec.name,
        anatomic_regions=None if region is None else [region],
        display_color=hd.color.CIELabColor.from_rgb(red, green, blue),
    )
    if spec.modifier is not None and spec.site is None:  # the side of the structure itself (Kidney, Left)
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            to_coded_concept(spec.modifier)]
    return description


def _plan(
    prediction: Prediction,
    source_images: Sequence[Dataset],
    segmentation_type: str | hd.seg.SegmentationTypeValues,
    content_label: str,
    omit_empty_segments: bool,
    clearing: bool,
) -> tuple[hd.seg.SegmentationTypeValues, tuple[SegmentSpec, ...], np.ndarray]:
    """The checks of :func:`build_seg` and what follows from them: the type, the segments made, the label counts."""
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
    per_slice = prediction.slice_label_counts()  # counted once for every output of the job
    counts = per_slice.sum(axis=0) if per_slice is not None else _label_counts(labelmap)
    specs = _select_segments(prediction, counts, omit_empty_segments, clearing)
    return seg_type, specs, counts


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
    seg_type, specs, counts = _plan(prediction, source_images, segmentation_type, content_label,
                                    omit_empty_segments, clearing)
    labelmap = prediction.labelmap
    assert labelmap is not None  # _plan checked it
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
            software_versions=software_versions(card),  # type: ignore[arg-type]  # highdicom takes a list too
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


#: SOP Class UID of each segmentation type made (PS3.4 B.5): what highdicom gives the SEG.
_SOP_CLASSES: Final[dict[hd.seg.SegmentationTypeValues, str]] = {
    hd.seg.SegmentationTypeValues.BINARY: "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    hd.seg.SegmentationTypeValues.LABELMAP: "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
}


def seg_outline(
    prediction: Prediction,
    source_images: Sequence[Dataset],
    identity: OutputIdentity,
    *,
    omit_empty_segments: bool = True,
    segmentation_type: str | hd.seg.SegmentationTypeValues = hd.seg.SegmentationTypeValues.BINARY,
) -> SegResult:
    """What an SR needs of the SEG that :func:`build_seg` makes from the same arguments, without making it.

    A data set of the SEG's identity (SOP Class, SOP Instance, Study and
    Series Instance UIDs), its referenced source series and, per segment, its
    number, Tracking UID and Tracking ID; and the label -> segment number
    mapping.  :func:`~dicom_node.results.sr.build_sr` given it makes the same
    SR as given the SEG itself, so the SR can be built while the SEG is
    (a few milliseconds instead of a highdicom build); :func:`outline_differs`
    checks the outline against the SEG once it is built.

    Raises
    ------
    ResultError
        As :func:`build_seg` for the same arguments (its checks are the same).
    """
    seg_type, specs, _ = _plan(prediction, source_images, segmentation_type, "AI_SEG", omit_empty_segments, False)
    segment_numbers = {spec.label: number for number, spec in enumerate(specs, start=1)}
    outline = Dataset()
    outline.SOPClassUID = _SOP_CLASSES[seg_type]
    outline.SOPInstanceUID = identity.sop_instance_uid
    outline.StudyInstanceUID = source_images[0].StudyInstanceUID
    outline.SeriesInstanceUID = identity.series_instance_uid
    referenced = Dataset()
    referenced.SeriesInstanceUID = source_images[0].SeriesInstanceUID
    outline.ReferencedSeriesSequence = [referenced]
    segments = []
    for spec in specs:
        item = Dataset()
        item.SegmentNumber = segment_numbers[spec.label]
        item.TrackingUID = segment_tracking_uid(identity, spec.label)
        item.TrackingID = spec.name
        segments.append(item)
    outline.SegmentSequence = segments
    return SegResult(dataset=outline, segment_numbers=segment_numbers)  # type: ignore[arg-type]


def outline_differs(outline: SegResult, seg: SegResult) -> str | None:
    """How the SEG differs from its outline in what an SR takes from it (``None``: in nothing).

    The segments compared are those the label map's labels became (a label
    map SEG's background segment 0 is no label's).
    """
    numbers = set(outline.segment_numbers.values()) | set(seg.segment_numbers.values())

    def described(ds: Dataset) -> tuple[object, ...]:
        referenced = ds.get("ReferencedSeriesSequence") or [Dataset()]
        return (str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                str(referenced[0].get("SeriesInstanceUID", "")),
                sorted((int(item.SegmentNumber), str(item.get("TrackingUID", "")), str(item.get("TrackingID", "")))
                       for item in ds.get("SegmentSequence", []) if int(item.SegmentNumber) in numbers))
    expected, made = described(outline.dataset), described(seg.dataset)
    if expected != made or dict(outline.segment_numbers) != dict(seg.segment_numbers):
        return f"SEG {seg.dataset.SOPInstanceUID}: outline {expected} {dict(outline.segment_numbers)}, " \
               f"made {made} {dict(seg.segment_numbers)}"
    return None
