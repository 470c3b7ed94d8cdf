"""Prediction -> TID 1500 Measurement Report (Comprehensive 3D SR) in the source study.

Content tree (:dcm:`TID 1500 <part16/chapter_A.html#sect_TID_1500>`):

- observation context: a *device* observer that is the model (Device Observer
  UID derived from the model name and version, name = card name,
  manufacturer = :data:`~dicom_node.results.identity.MANUFACTURER`, model name
  = card name and version); procedure reported = the first item of the
  source's Procedure Code Sequence, else SCT 363679005 "Imaging procedure";
- per SEG segment, a TID 1411 *Volumetric ROI* group: tracking identifier and
  UID (the segment's Tracking ID/UID in the SEG), the referenced segment (SEG
  SOP Instance UID, Segment Number, source series), finding type = the
  segment's Segmented Property Type, algorithm identification (TID 4019), and
  the prediction's measurements for that label; and, with the same tracking
  identifier and UID, a TID 1410 *Planar ROI* group placing the same finding:
  its largest cross-section as a SCOORD3D ellipse in the source's frame of
  reference (:mod:`dicom_node.results.places`), which a viewer draws and jumps to;
- per label that has measurements but no SEG segment: if present (the rule
  asked for no SEG), TID 1410 groups placing it with its values; if absent, a
  line in the report's findings;
- per classification, in the report's Qualitative Evaluations: CODE class ->
  SCT Yes/No, then the verdict and probability as TEXT (a classification of
  the series has no place; a measurement group without one stops OHIF 3.13
  from opening the report).  The ``measurements`` form (a destination's
  ``sr_form``) gives each class a TID 1501 group instead: class -> Yes/No
  and the probability as a NUM (DCM 122157 "Probability", UCUM ``1``), and
  an absent segment's values a group too;
- per detection (best score first, at most :data:`MAX_DETECTIONS`), a TID
  1410 *Planar ROI* group: finding type = the class (private scheme), the
  ellipse inscribed in the box's axial section through its centre as SCOORD3D
  (patient coordinates, the source's frame of reference), and the score
  (DCM 122157 "Probability");
- the report's Qualitative Evaluations container (TID 1500, UMLS C0034375)
  holding each free-text finding as TEXT (DCM 121071 "Finding"); it also says
  when the model found no segment (and therefore no SEG exists) or reported
  nothing at all.

The TID 1600 Image Library lists the source images; evidence lists them and the SEG.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeAlias

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from dicom_node.errors import ResultError
from dicom_node.results.content import algorithm_family_code, to_coded_concept
from dicom_node.results.identity import (
    DEFAULT_DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    SOFTWARE_NAME,
    OutputIdentity,
    derive_uid,
    software_versions,
)
from dicom_node.results.places import SlicePlane, box_place, nearest_slice, segment_place, slice_planes, to_image
from dicom_node.results.source import character_set, complete_source, drop_invalid_copied
from inference import anatomy
from inference.anatomy import private_code
from inference.types import (
    Classification,
    Code,
    Detection,
    Measurement,
    ModelCard,
    Prediction,
    SegmentSpec,
    Task,
)

logger = logging.getLogger(__name__)

PRIVATE_SCHEME: Final[str] = anatomy.PRIVATE_SCHEME
"""Private coding scheme of concepts the node makes up (classifier class names)."""

IMAGING_PROCEDURE: Final[Code] = Code("363679005", "SCT", "Imaging procedure")
"""Procedure reported when the source names none."""

NO_SEGMENT_FINDING: Final[str] = (
    "No segment present in the model output; no segmentation object was produced."
)
NO_RESULT_FINDING: Final[str] = "The model reported no segment, measurement, classification or finding."

_Group: TypeAlias = (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)
_YES: Final[hd.sr.CodedConcept] = hd.sr.CodedConcept("373066001", "SCT", "Yes")
_NO: Final[hd.sr.CodedConcept] = hd.sr.CodedConcept("373067005", "SCT", "No")
_UCUM_NO_UNITS: Final[hd.sr.CodedConcept] = hd.sr.CodedConcept("1", "UCUM", "no units")


def class_concept(name: str) -> hd.sr.CodedConcept:
    """Coded concept of a classifier class, in the private scheme :data:`PRIVATE_SCHEME`.

    Parameters
    ----------
    name:
        Class name from the model card, e.g. ``"pneumothorax"``.

    Returns
    -------
    highdicom.sr.CodedConcept
        Code value = the name in upper case with other characters than A-Z,
        0-9 replaced by ``_`` when that fits 16 characters, else its first 7
        characters, ``_`` and 8 hex digits of its SHA-256; meaning = the name.

    Raises
    ------
    ResultError
        If the name is empty.
    """
    if not name.strip():
        raise ResultError("Classification without a class name: fix the model card's classes")
    return to_coded_concept(private_code(name))


def _private_scheme() -> hd.coding_schemes.CodingSchemeIdentificationItem:
    """Coding Scheme Identification of :data:`PRIVATE_SCHEME` (PS3.3 C.12.1.1.5)."""
    return hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="dicom-node classifier classes",
        responsible_organization=MANUFACTURER,
    )


def _procedure_reported(source: Dataset) -> hd.sr.CodedConcept:
    for item in source.get("ProcedureCodeSequence", []):
        try:
            return hd.sr.CodedConcept.from_dataset(item)
        except (AttributeError, ValueError, TypeError):
            logger.debug("Procedure Code Sequence item not usable; falling back to %s", IMAGING_PROCEDURE)
    return to_coded_concept(IMAGING_PROCEDURE)


def _observation_context(card: ModelCard, identity: OutputIdentity) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derive_uid(identity.uid_root, "device", card.name, card.version),
        name=card.name,
        manufacturer_name=MANUFACTURER,
        model_name=f"{card.name} {card.version}",
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )


def _measurements(card: ModelCard, label: int, items: Sequence[Measurement]) -> list[hd.sr.Measurement]:
    out = []
    for item in items:
        if not math.isfinite(item.value):
            raise ResultError(
                f"Model {card.name!r} reported a non-finite {item.concept.meaning} for label {label}"
            )
        out.append(
            hd.sr.Measurement(
                name=to_coded_concept(item.concept),
                value=float(item.value),
                unit=to_coded_concept(item.unit),
            )
        )
    return out


def _segment_tracking(seg: Dataset, segment_number: int) -> tuple[str | None, str | None]:
    """Tracking UID and ID recorded for a segment in the SEG, if any."""
    for item in seg.get("SegmentSequence", []):
        if int(item.SegmentNumber) == segment_number:
            return item.get("TrackingUID"), item.get("TrackingID")
    raise ResultError(f"SEG {seg.SOPInstanceUID} has no segment number {segment_number}")


def _segment_groups(
    prediction: Prediction,
    specs: Mapping[int, SegmentSpec],
    identity: OutputIdentity,
    seg: Dataset,
    segment_numbers: Mapping[int, int],
    algorithm: hd.sr.AlgorithmIdentification,
    source_images: Sequence[Dataset],
    frame_of_reference: str,
) -> list[_Group]:
    groups: list[_Group] = []
    source_series = hd.sr.SourceSeriesForSegmentation(_source_series_uid(seg))
    labelmap = prediction.labelmap
    planes = slice_planes(source_images, labelmap.shape[0]) if labelmap is not None and labelmap.ndim == 3 else None
    for label, number in sorted(segment_numbers.items(), key=lambda item: item[1]):
        spec = specs[label]
        uid, tracking_id = _segment_tracking(seg, number)
        tracking = hd.sr.TrackingIdentifier(
            uid=uid or identity.derive("tracking", str(label)),
            identifier=tracking_id or spec.name,
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=number,
                    source_series=source_series,
                ),
                finding_type=to_coded_concept(spec.type),
                finding_sites=_finding_sites(spec),
                algorithm_id=algorithm,
                measurements=_measurements(prediction.card, label, prediction.measurements.get(label, ())),
            )
        )
        place = (segment_place(labelmap, label, planes, prediction.slice_label_counts())
                 if planes is not None and labelmap is not None else None)
        if place is not None and planes is not None:
            # The same finding (same tracking UID) where a viewer can draw it and jump to it: its largest
            # cross-section as TID 1410 planar ROIs, on its source image and on the source's frame of reference.
            groups.extend(_place_groups(tracking, spec.type, _finding_sites(spec), algorithm, place[1],
                                        source_images, planes, place[0], frame_of_reference))
    return groups


def _place_groups(
    tracking: hd.sr.TrackingIdentifier, finding: Code, sites: list[hd.sr.FindingSite] | None,
    algorithm: hd.sr.AlgorithmIdentification, ellipse: np.ndarray, source_images: Sequence[Dataset],
    planes: Sequence[SlicePlane] | None, index: int | None, frame_of_reference: str,
    measurements: Sequence[hd.sr.Measurement] = (),
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """A finding's ellipse as planar ROI groups: on its source image (SCOORD) first, then in 3D (SCOORD3D)."""
    regions: list[hd.sr.ImageRegion | hd.sr.ImageRegion3D] = []
    single_frame = planes is not None and len(source_images) == len(planes)
    if single_frame and index is not None and planes is not None:
        image = source_images[index]
        regions.append(hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.ELLIPSE, graphic_data=to_image(planes[index], ellipse),
            source_image=hd.sr.SourceImageForRegion(str(image.SOPClassUID), str(image.SOPInstanceUID))))
    if frame_of_reference:
        regions.append(hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.ELLIPSE, graphic_data=ellipse,
                                           frame_of_reference_uid=frame_of_reference))
    # The values go with the first form only: they are the finding's, not each drawing's (a viewer merging the
    # groups of one tracking UID would list them twice).
    return [hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, referenced_region=region, finding_type=to_coded_concept(finding),
        finding_sites=sites, algorithm_id=algorithm, measurements=(list(measurements) or None) if i == 0 else None)
        for i, region in enumerate(regions)]


def _finding_sites(spec: SegmentSpec) -> list[hd.sr.FindingSite] | None:
    """The finding's site with its side (TID 1419 row 4): the organ of a finding, or the structure's own side."""
    if spec.site is None and spec.modifier is None:
        return None
    location = spec.site if spec.site is not None else spec.type
    return [hd.sr.FindingSite(anatomic_location=to_coded_concept(location),
                              laterality=None if spec.modifier is None else to_coded_concept(spec.modifier))]


def _source_series_uid(seg: Dataset) -> str:
    referenced = seg.get("ReferencedSeriesSequence", [])
    if not referenced:
        raise ResultError(f"SEG {seg.SOPInstanceUID} references no source series")
    return str(referenced[0].SeriesInstanceUID)


def _unreferenced_groups(
    prediction: Prediction,
    specs: Mapping[int, SegmentSpec],
    identity: OutputIdentity,
    labels: Sequence[int],
    algorithm: hd.sr.AlgorithmIdentification,
    source_images: Sequence[Dataset],
    frame_of_reference: str,
    form: str = "viewer",
) -> tuple[list[_Group], list[str]]:
    """Labels with measurements but no SEG segment: placed where they are (TID 1410), else said in words.

    A present segment (the rule asked for no SEG) keeps its values on its largest cross-section; the values
    of an absent one (a volume of 0 ml) have no place, and go to the report's findings as text, or in the
    ``measurements`` form to a TID 1501 group of their own.
    """
    groups: list[_Group] = []
    texts: list[str] = []
    labelmap = prediction.labelmap
    planes = slice_planes(source_images, labelmap.shape[0]) if labelmap is not None and labelmap.ndim == 3 else None
    for label in labels:
        spec = specs[label]
        values = _measurements(prediction.card, label, prediction.measurements[label])
        place = (segment_place(labelmap, label, planes, prediction.slice_label_counts())
                 if planes is not None and labelmap is not None else None)
        if place is None and form == "measurements":
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.derive("tracking", str(label)),
                                                             identifier=spec.name),
                finding_type=to_coded_concept(spec.type), finding_sites=_finding_sites(spec), algorithm_id=algorithm,
                measurements=values))
            continue
        if place is None:
            words = "; ".join(f"{m.concept.meaning} {m.value:.4g} {m.unit.value}"
                              for m in prediction.measurements[label])
            texts.append(f"{spec.name}: not found in the image ({words})" if words else f"{spec.name}: not found")
            continue
        tracking = hd.sr.TrackingIdentifier(uid=identity.derive("tracking", str(label)), identifier=spec.name)
        groups.extend(_place_groups(tracking, spec.type, _finding_sites(spec), algorithm, place[1], source_images,
                                    planes, place[0], frame_of_reference, values))
    return groups, texts


def _classification_items(items: Sequence[Classification]) -> list[hd.sr.ContentItem]:
    """Each class as the report's qualitative evaluation: CODE class -> Yes/No, then its probability in words.

    A classification of the series has no place on an image; as a measurement group without one, OHIF 3.13
    fails to open the whole report.  TID 1500's Qualitative Evaluations hold CODE and TEXT items.
    """
    out: list[hd.sr.ContentItem] = []
    for item in items:
        if not 0.0 <= item.probability <= 1.0:
            raise ResultError(f"Probability of class {item.name!r} is {item.probability}, not in [0, 1]")
        out.append(hd.sr.CodeContentItem(name=class_concept(item.name), value=_YES if item.positive else _NO,
                                         relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        out.append(hd.sr.TextContentItem(
            name=codes.DCM.Finding, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            value=f"{item.name}: {'positive' if item.positive else 'negative'}, probability {item.probability:.3f}"))
    return out


def _classification_group(
    index: int, item: Classification, identity: OutputIdentity, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The ``measurements`` form of a class: a TID 1501 group, class -> Yes/No and its probability as a NUM."""
    if not 0.0 <= item.probability <= 1.0:
        raise ResultError(f"Probability of class {item.name!r} is {item.probability}, not in [0, 1]")
    concept = class_concept(item.name)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.derive("classification", str(index), item.name),
                                                     identifier=item.name[:64]),
        finding_type=concept,
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=concept, value=_YES if item.positive else _NO)],
        measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=float(item.probability),
                                        unit=_UCUM_NO_UNITS)],
    )


#: SR forms (per destination, ``sr_form``): ``viewer`` puts only findings with a place in measurement groups,
#: ``measurements`` gives every value its own group (numbers where a reader of numbers looks for them).
SR_FORMS: Final[tuple[str, ...]] = ("viewer", "measurements")


#: At most this many boxes are reported (a detector's random or untrained output can hold hundreds).
MAX_DETECTIONS: Final[int] = 100


def _detection_groups(
    index: int, item: Detection, classes: Sequence[str], frame_of_reference: str, identity: OutputIdentity,
    algorithm: hd.sr.AlgorithmIdentification, source_images: Sequence[Dataset], planes: Sequence[SlicePlane] | None,
    seg_tracking: tuple[str | None, str | None] = (None, None),
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """A box as placed groups; ``seg_tracking`` is its segment's tracking UID and ID in the box SEG, if one is made."""
    if not 0.0 <= item.score <= 1.0:
        raise ResultError(f"Score of detection {index} is {item.score}, not in [0, 1]")
    name = classes[item.label] if 0 <= item.label < len(classes) else f"class {item.label}"
    spec = anatomy.finding_segment(index + 1, name)  # the class's code (the table's, else private) and its site
    tracking = hd.sr.TrackingIdentifier(uid=seg_tracking[0] or identity.derive("detection", str(index)),
                                        identifier=(seg_tracking[1] or f"{name} {index + 1}")[:64])
    probability = hd.sr.Measurement(name=codes.DCM.Probability, value=float(item.score), unit=_UCUM_NO_UNITS)
    ellipse = box_place(item.center, item.size)
    slice_index = nearest_slice(planes, item.center) if planes else None
    return _place_groups(tracking, spec.type, _finding_sites(spec), algorithm, ellipse, source_images, planes,
                         slice_index, frame_of_reference, [probability])


#: TID 1500's report-level container of qualitative evaluations (row 8): free-text findings of the whole study.
QUALITATIVE_EVALUATIONS: Final[hd.sr.CodedConcept] = hd.sr.CodedConcept("C0034375", "UMLS",
                                                                          "Qualitative Evaluations")


def _findings_container(texts: Sequence[str], evaluations: Sequence[hd.sr.ContentItem] = ()
                        ) -> hd.sr.ContainerContentItem:
    """Free-text findings as TEXT items of the report's Qualitative Evaluations, not as a measurement group.

    They describe the study, not a region: a TID 1501 group holding only text has no place and no value, and
    a viewer that places every measurement group (OHIF 3.13) fails on one.
    """
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = DicomSequence([*evaluations, *(
        hd.sr.TextContentItem(name=codes.DCM.Finding, value=text[:1024],
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for text in texts)])
    return container


def report_findings(sr: Dataset) -> list[str]:
    """The free-text findings of a report made by :func:`build_sr` (its Qualitative Evaluations)."""
    found: list[str] = []
    for item in sr.get("ContentSequence", []):
        concept = item.ConceptNameCodeSequence[0]
        if item.ValueType == "CONTAINER" and concept.CodeValue == QUALITATIVE_EVALUATIONS.value:
            found.extend(str(child.TextValue) for child in item.get("ContentSequence", []) if child.ValueType == "TEXT")
    return found


def _check_seg(
    seg: Dataset | None,
    segment_numbers: Mapping[int, int] | None,
    source: Dataset,
    specs: Mapping[int, SegmentSpec],
) -> None:
    if (seg is None) != (segment_numbers is None):
        raise ResultError("Pass both the SEG and its segment numbers, or neither")
    if seg is None or segment_numbers is None:
        return
    if seg.StudyInstanceUID != source.StudyInstanceUID:
        raise ResultError("The SEG belongs to another study than the source images")
    unknown = sorted(set(segment_numbers) - set(specs))
    if unknown:
        raise ResultError(f"Segment numbers given for labels {unknown} that the model card does not declare")


def _library(groups: Sequence[_Group], source_images: Sequence[Dataset]) -> list[Dataset]:
    """The source images that the groups' regions reference, in source order (the first one when none)."""
    referenced: set[str] = set()

    def walk(items: Any) -> None:
        for item in items:
            if not isinstance(item, Dataset):  # a template: a list of content items
                walk(item)
                continue
            for ref in item.get("ReferencedSOPSequence", []):
                referenced.add(str(ref.ReferencedSOPInstanceUID))
            walk(item.get("ContentSequence", []))

    walk(groups)
    chosen = [image for image in source_images if str(image.SOPInstanceUID) in referenced]
    return chosen or list(source_images[:1])


def build_sr(
    prediction: Prediction,
    source_images: Sequence[Dataset],
    identity: OutputIdentity,
    *,
    seg: Dataset | None,
    segment_numbers: Mapping[int, int] | None,
    device_serial_number: str = DEFAULT_DEVICE_SERIAL_NUMBER,
    form: str = "viewer",
) -> hd.sr.Comprehensive3DSR:
    """Encode a prediction as a TID 1500 Measurement Report (Comprehensive 3D SR).

    Parameters
    ----------
    prediction:
        Model output: measurements per label, classifications, findings.
    source_images:
        The source instances (complete datasets); listed as evidence, their
        patient and study attributes are copied.
    identity:
        Series/SOP Instance UIDs, Series Number and Series Description of the SR.
    seg:
        The SEG made from the same prediction (see
        :func:`~dicom_node.results.seg.build_seg`), or ``None`` when there is
        none (no segment present, or the rule asked for an SR only).
    segment_numbers:
        Label -> Segment Number in ``seg`` (``SegResult.segment_numbers``);
        ``None`` exactly when ``seg`` is ``None``.
    device_serial_number:
        Device Serial Number (0018,1000) naming this node instance.
    form:
        ``"viewer"`` (default): every measurement group has a place (OHIF 3.x
        opens no report holding a group without one); a classification is
        a qualitative evaluation of the report, its probability in words.
        ``"measurements"``: each classification is a TID 1501 group with
        its probability as a NUM, and the values of an absent segment a
        group of their own, for consumers that read numbers from groups.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The SR dataset, ready to be written with ``save_as``.

    Raises
    ------
    ResultError
        If the inputs are inconsistent (SEG without segment numbers, labels
        the card does not declare, probabilities outside [0, 1], non-finite
        values) or highdicom rejects them.
    """
    if not source_images:
        raise ResultError("No source images given: an SR must reference the images it reports on")
    if form not in SR_FORMS:
        raise ResultError(f"SR form {form!r} is not one of {', '.join(SR_FORMS)}")
    card = prediction.card
    source = source_images[0]
    specs = {spec.label: spec for spec in card.segments}
    _check_seg(seg, segment_numbers, source, specs)
    undeclared = sorted(set(prediction.measurements) - set(specs))
    if undeclared:
        raise ResultError(
            f"Measurements given for labels {undeclared} that model {card.name!r} does not declare"
        )

    try:
        algorithm = hd.sr.AlgorithmIdentification(
            name=card.name,
            version=card.version,
            family=algorithm_family_code(card.family),
            parameters=[f"model_hash={card.model_hash}"] if card.model_hash else None,
        )
        groups: list[_Group] = []
        referenced: Mapping[int, int] = {}
        boxes_seg = card.task is Task.DETECTION  # a SEG of a detection model's boxes: its segments are the boxes
        if seg is not None and segment_numbers is not None and not boxes_seg:
            referenced = segment_numbers
            groups.extend(_segment_groups(prediction, specs, identity, seg, segment_numbers, algorithm,
                                          source_images, str(getattr(source, "FrameOfReferenceUID", "") or "")))
        others = sorted(
            label for label, items in prediction.measurements.items() if items and label not in referenced
        )
        frame_of_reference = str(getattr(source, "FrameOfReferenceUID", "") or "")
        placed, unplaced = _unreferenced_groups(prediction, specs, identity, others, algorithm, source_images,
                                                frame_of_reference, form)
        groups.extend(placed)
        evaluations: list[hd.sr.ContentItem] = []
        if form == "measurements":
            groups.extend(_classification_group(index, item, identity, algorithm)
                          for index, item in enumerate(prediction.classifications))
        else:
            evaluations = _classification_items(prediction.classifications)
        detections = sorted(prediction.detections, key=lambda d: -d.score)
        if detections and not getattr(source, "FrameOfReferenceUID", None):
            raise ResultError("the source images have no FrameOfReferenceUID: boxes cannot be placed")
        planes = slice_planes(source_images, len(source_images)) if detections else None
        for index, item in enumerate(detections[:MAX_DETECTIONS]):
            number = (segment_numbers or {}).get(index + 1)
            tracking = _segment_tracking(seg, number) if seg is not None and number else (None, None)
            groups.extend(_detection_groups(index, item, card.classes, str(source.FrameOfReferenceUID), identity,
                                            algorithm, source_images, planes, tracking))
        if len(detections) > MAX_DETECTIONS:
            texts_extra = [f"{len(detections) - MAX_DETECTIONS} more box(es) with lower scores are not listed"]
        else:
            texts_extra = []

        texts = [text for text in prediction.findings if text.strip()] + unplaced + texts_extra
        # A SEG is only made when a segment is present: no need to scan the label map then.
        if card.segments and prediction.labelmap is not None and seg is None and not boxes_seg \
                and not prediction.present_segments():
            texts.append(NO_SEGMENT_FINDING)
        if not groups and not texts and not evaluations:
            texts.append(NO_RESULT_FINDING)

        # highdicom builds TID 1500 from at least one measurement group; a report of findings only has none
        # (TID 1500 needs Imaging Measurements or Qualitative Evaluations): the placeholder is taken out again.
        placeholder = [] if groups else [hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.derive("findings"), identifier="Findings"))]
        report = hd.sr.MeasurementReport(
            observation_context=_observation_context(card, identity),
            procedure_reported=_procedure_reported(source),
            imaging_measurements=groups or placeholder,
            # TID 1600 Image Library: the images the report's groups are placed on (a viewer finds them there);
            # every source image would be hundreds of entries highdicom takes seconds to build and copy.
            referenced_images=_library(groups, source_images),
        )
        root = report[0].ContentSequence
        if placeholder:
            kept = [item for item in root if not (item.ValueType == "CONTAINER" and
                                                  item.ConceptNameCodeSequence[0].CodeValue == "126010")]
            while len(root):
                root.pop()
            root.extend(kept)  # without Imaging Measurements
        if texts or evaluations:
            root.append(_findings_container(texts, evaluations))
        evidence = [complete_source(source), *source_images[1:], *([seg] if seg is not None else [])]
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=identity.series_instance_uid,
            series_number=identity.series_number,
            sop_instance_uid=identity.sop_instance_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            series_description=identity.series_description,
            manufacturer_model_name=SOFTWARE_NAME,
            software_versions=software_versions(card),
            device_serial_number=device_serial_number,
            specific_character_set=character_set(source),
            coding_schemes=[_private_scheme()] if prediction.classifications or prediction.detections else None,
        )
    except ValueError as exc:
        raise ResultError(f"SR for model {card.name!r} could not be encoded: {exc}") from exc
    drop_invalid_copied(sr, source)
    logger.info(
        "SR %s: %d measurement groups, SEG %s (model %s %s)",
        identity.sop_instance_uid,
        len(groups),
        seg.SOPInstanceUID if seg is not None else "none",
        card.name,
        card.version,
    )
    return sr
