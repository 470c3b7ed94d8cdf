"""Result objects: deterministic identity, SEG and TID 1500 SR round trips, dciodvfy.

Sources are a real CT (pydicom-data's CQ500 head slice, stacked into a 3-slice
series by :func:`tests.realdata.real_ct_slices`), a real Enhanced MR (dicom2nifti,
from ``../shared/testdata``: skipped without it), and tiny synthetic CT slices made here.  Every object
is written to bytes and read back with highdicom; every object passes
dciodvfy without errors.
"""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from dicom_node.errors import InvalidUIDError, ResultError
from dicom_node.results.content import algorithm_family_code
from dicom_node.results.identity import (
    DEFAULT_UID_ROOT,
    MANUFACTURER,
    SOFTWARE_NAME,
    OutputIdentity,
    derive_identity,
)
from dicom_node.results.seg import SegResult, build_seg, outline_differs, seg_outline
from dicom_node.results.source import character_set
from dicom_node.results.sr import (
    NO_RESULT_FINDING,
    NO_SEGMENT_FINDING,
    PRIVATE_SCHEME,
    build_sr,
    class_concept,
    report_findings,
)
from inference.types import (
    SCT_ANATOMICAL_STRUCTURE,
    SCT_MEAN,
    SCT_VOLUME,
    UCUM_HU,
    UCUM_ML,
    Classification,
    Code,
    Detection,
    Measurement,
    ModelCard,
    Prediction,
    SegmentSpec,
    Task,
)
from tests.realdata import real_ct_slices, shared
from tests.tools import require_tool

ENHANCED_MR = "enhanced_mr_8frames/dicom2nifti__tests__data__philips_enhanced__anatomical__001__IM-0001-0170-0001.dcm"
DCIODVFY = "/usr/bin/dciodvfy"

LIVER = SegmentSpec(1, "Liver", SCT_ANATOMICAL_STRUCTURE, Code("10200004", "SCT", "Liver"), (200, 100, 50))
SPLEEN = SegmentSpec(2, "Spleen", SCT_ANATOMICAL_STRUCTURE, Code("78961009", "SCT", "Spleen"), (0, 255, 0))
KIDNEY = SegmentSpec(
    3, "Right kidney", SCT_ANATOMICAL_STRUCTURE, Code("9846003", "SCT", "Right kidney"), (0, 0, 255)
)
CARD = ModelCard(name="abdomen-ai", version="1.4.2", segments=(LIVER, SPLEEN, KIDNEY))


# --------------------------------------------------------------------------- helpers


def _shared_enhanced_mr() -> Dataset:
    """The Philips Enhanced MR of ../shared/testdata (8 frames, anonymisation removed its Frame of Reference)."""
    folder, name = ENHANCED_MR.split("/")
    return pydicom.dcmread(shared(folder) / name)


def _slice_position(ds: Dataset) -> float:
    normal = np.cross(
        np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
    )
    return float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float)))


@pytest.fixture(scope="module")
def ct_slices() -> list[Dataset]:
    """The three real CT slices, sorted by position along the slice normal."""
    return sorted(real_ct_slices(3), key=_slice_position)


def _synthetic_ct(
    count: int,
    rows: int = 16,
    columns: int = 16,
    *,
    patient_name: str = "Doe^Jane",
    charset: str | None = None,
) -> list[Dataset]:
    """Tiny single-frame CT slices of one series, with the modules highdicom copies."""
    study, series, frame_of_reference = (pydicom.uid.generate_uid() for _ in range(3))
    slices = []
    for index in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if charset is not None:
            ds.SpecificCharacterSet = charset
        ds.PatientName = patient_name
        ds.PatientID = "SYN-0001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.StudyInstanceUID = study
        ds.StudyDate = "20240102"
        ds.StudyTime = "101500"
        ds.StudyID = "S1"
        ds.AccessionNumber = "ACC1"
        ds.ReferringPhysicianName = ""
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = 3
        ds.Modality = "CT"
        ds.FrameOfReferenceUID = frame_of_reference
        ds.InstanceNumber = index + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-8.0, -8.0, 2.5 * index]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 2.5
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.zeros((rows, columns), np.int16).tobytes()
        slices.append(ds)
    return slices


def _identity(
    source: Sequence[Dataset], kind: str, card: ModelCard = CARD, number: int = 901
) -> OutputIdentity:
    series = source[0].SeriesInstanceUID
    description = f"AI {kind.upper()}"
    return derive_identity(DEFAULT_UID_ROOT, series, card.name, card.version, kind, number, description)


def _ct_labelmap() -> np.ndarray:
    """Liver on slices 0-1, spleen on slices 1-2; kidney (label 3) absent."""
    labelmap = np.zeros((3, 512, 512), np.uint8)
    labelmap[0:2, 200:300, 100:220] = 1
    labelmap[0, 250, 400] = 1  # a single isolated voxel survives the round trip too
    labelmap[1:3, 300:380, 350:450] = 2
    return labelmap


def _ct_prediction() -> Prediction:
    return Prediction(
        card=CARD,
        labelmap=_ct_labelmap(),
        measurements={
            1: (Measurement(SCT_VOLUME, 12.25, UCUM_ML), Measurement(SCT_MEAN, 54.5, UCUM_HU)),
            2: (Measurement(SCT_VOLUME, 3.5, UCUM_ML),),
        },
        findings=("spleen borders uncertain",),
    )


def _sr_with_seg(
    prediction: Prediction, source: Sequence[Dataset], seg: SegResult
) -> hd.sr.Comprehensive3DSR:
    identity = _identity(source, "sr", prediction.card)
    return build_sr(prediction, source, identity, seg=seg.dataset, segment_numbers=seg.segment_numbers)


def _sr_without_seg(prediction: Prediction, source: Sequence[Dataset]) -> hd.sr.Comprehensive3DSR:
    identity = _identity(source, "sr", prediction.card)
    return build_sr(prediction, source, identity, seg=None, segment_numbers=None)


def _roundtrip_seg(dataset: Dataset) -> hd.seg.Segmentation:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.seg.segread(buffer)


def _roundtrip_sr(dataset: Dataset) -> hd.sr.Comprehensive3DSR:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    sr = hd.sr.srread(buffer)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    return sr


def _text_values(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> list[str]:
    return [
        str(item.TextValue)
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.Finding.value
    ]


@pytest.fixture(scope="module")
def ct_seg(ct_slices: list[Dataset]) -> SegResult:
    return build_seg(_ct_prediction(), ct_slices, _identity(ct_slices, "seg", number=900))


# --------------------------------------------------------------------------- identity


def test_identity_is_deterministic_and_valid() -> None:
    source = "1.2.840.113619.2.55.3.1234"
    first = derive_identity(DEFAULT_UID_ROOT, source, "lungs-ct", "2.0", "seg", 900, "AI lungs")
    again = derive_identity(DEFAULT_UID_ROOT, source, "lungs-ct", "2.0", "seg", 900, "AI lungs")
    assert first == again
    assert first.series_instance_uid != first.sop_instance_uid
    for uid in (first.series_instance_uid, first.sop_instance_uid):
        assert UID(uid).is_valid
        assert uid.startswith("2.25.")
        assert len(uid) <= 44


@pytest.mark.parametrize(
    "changed",
    [
        {"model_version": "2.1"},
        {"model_name": "lungs-ct-v2"},
        {"kind": "sr"},
        {"source_series_uid": "1.2.840.113619.2.55.3.1235"},
    ],
)
def test_identity_changes_with_each_input(changed: dict[str, str]) -> None:
    base = {
        "uid_root": DEFAULT_UID_ROOT,
        "source_series_uid": "1.2.840.113619.2.55.3.1234",
        "model_name": "lungs-ct",
        "model_version": "2.0",
        "kind": "seg",
        "series_number": 900,
        "series_description": "AI lungs",
    }
    first = derive_identity(**base)  # type: ignore[arg-type]
    other = derive_identity(**{**base, **changed})  # type: ignore[arg-type]
    assert other.series_instance_uid != first.series_instance_uid
    assert other.sop_instance_uid != first.sop_instance_uid


def test_identity_inputs_are_not_concatenated_ambiguously() -> None:
    source = "1.2.3.4"
    one = derive_identity("2.25", source, "ab", "c", "seg", 1, "x")
    two = derive_identity("2.25", source, "a", "bc", "seg", 1, "x")
    assert one.sop_instance_uid != two.sop_instance_uid


def test_identity_under_configured_root() -> None:
    root = "1.2.826.0.1.3680043.10.999"
    with_dot = derive_identity(root + ".", "1.2.3.4", "m", "1", "seg", 900, "AI")
    without_dot = derive_identity(root, "1.2.3.4", "m", "1", "seg", 900, "AI")
    assert with_dot == without_dot
    for uid in (with_dot.series_instance_uid, with_dot.sop_instance_uid):
        assert uid.startswith(root + ".")
        assert len(uid) == 64
        assert UID(uid).is_valid


@pytest.mark.parametrize(
    "root", ["", "1.2.03", "1..2", "abc.1", "1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18.19.20"]
)
def test_identity_rejects_invalid_root(root: str) -> None:
    with pytest.raises(InvalidUIDError):
        derive_identity(root, "1.2.3.4", "m", "1", "seg", 900, "AI")


def test_identity_rejects_invalid_source_uid_and_attributes() -> None:
    with pytest.raises(InvalidUIDError):
        derive_identity(DEFAULT_UID_ROOT, "1.2.abc", "m", "1", "seg", 900, "AI")
    with pytest.raises(ResultError, match="description"):
        derive_identity(DEFAULT_UID_ROOT, "1.2.3", "m", "1", "seg", 900, "x" * 65)
    with pytest.raises(ResultError, match="Series number"):
        derive_identity(DEFAULT_UID_ROOT, "1.2.3", "m", "1", "seg", 0, "AI")


# --------------------------------------------------------------------------- SEG


def test_seg_round_trip_gives_back_masks_per_source_instance(
    ct_slices: list[Dataset], ct_seg: SegResult
) -> None:
    assert ct_seg.segment_numbers == {1: 1, 2: 2}
    seg = _roundtrip_seg(ct_seg.dataset)
    labelmap = _ct_labelmap()
    uids = [str(ds.SOPInstanceUID) for ds in ct_slices]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2])
    assert pixels.shape == (3, 512, 512, 2)
    for label, number in ct_seg.segment_numbers.items():
        np.testing.assert_array_equal(pixels[..., number - 1], (labelmap == label).astype(pixels.dtype))


def test_seg_omits_empty_frames(ct_slices: list[Dataset]) -> None:
    labelmap = np.zeros((3, 512, 512), np.uint8)
    labelmap[1, 10:20, 10:20] = 2  # spleen on the middle slice only
    result = build_seg(Prediction(CARD, labelmap), ct_slices, _identity(ct_slices, "seg"))
    assert result.segment_numbers == {2: 1}
    seg = _roundtrip_seg(result.dataset)
    assert int(seg.NumberOfFrames) == 1
    frame_source = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert frame_source.ReferencedSOPInstanceUID == ct_slices[1].SOPInstanceUID
    np.testing.assert_array_equal(seg.pixel_array.reshape(512, 512), labelmap[1] == 2)


def test_seg_segment_descriptions_come_from_the_card(ct_seg: SegResult) -> None:
    seg = _roundtrip_seg(ct_seg.dataset)
    assert len(seg.SegmentSequence) == 2
    for spec in (LIVER, SPLEEN):
        description = seg.get_segment_description(ct_seg.segment_numbers[spec.label])
        assert description.segment_label == spec.name
        assert description.segmented_property_type == hd.sr.CodedConcept(
            spec.type.value, spec.type.scheme, spec.type.meaning
        )
        assert description.segmented_property_category == hd.sr.CodedConcept(
            spec.category.value, spec.category.scheme, spec.category.meaning
        )
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = description.algorithm_identification[0]
        assert algorithm.AlgorithmName == CARD.name
        assert algorithm.AlgorithmVersion == CARD.version
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert family.CodeValue == codes.cid7162.ArtificialIntelligence.value
        assert description.tracking_id == spec.name
        assert UID(description.tracking_uid).is_valid
        lab = hd.color.CIELabColor.from_dicom_value(tuple(description.RecommendedDisplayCIELabValue))
        assert all(abs(a - b) <= 1 for a, b in zip(lab.to_rgb(), spec.color, strict=True))


def test_seg_rebuilt_from_the_same_prediction_is_identical_in_identity(
    ct_slices: list[Dataset], ct_seg: SegResult
) -> None:
    again = build_seg(_ct_prediction(), ct_slices, _identity(ct_slices, "seg", number=900))
    assert again.dataset.SOPInstanceUID == ct_seg.dataset.SOPInstanceUID
    assert again.dataset.SeriesInstanceUID == ct_seg.dataset.SeriesInstanceUID
    tracking = [item.TrackingUID for item in again.dataset.SegmentSequence]
    assert tracking == [item.TrackingUID for item in ct_seg.dataset.SegmentSequence]
    assert len(set(tracking)) == len(tracking)
    assert again.dataset.PixelData == ct_seg.dataset.PixelData


def test_seg_is_in_the_source_study_with_its_own_identity(
    ct_slices: list[Dataset], ct_seg: SegResult
) -> None:
    seg = ct_seg.dataset
    identity = _identity(ct_slices, "seg", number=900)
    assert seg.StudyInstanceUID == ct_slices[0].StudyInstanceUID
    assert seg.PatientID == ct_slices[0].PatientID
    assert seg.SeriesInstanceUID != ct_slices[0].SeriesInstanceUID
    assert seg.SeriesInstanceUID == identity.series_instance_uid
    assert seg.SOPInstanceUID == identity.sop_instance_uid
    assert seg.SeriesNumber == 900
    assert seg.SeriesDescription == "AI SEG"
    assert seg.Manufacturer == MANUFACTURER
    assert seg.ManufacturerModelName == SOFTWARE_NAME
    assert seg.ContentLabel == "AI_SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_slices[0].SeriesInstanceUID


def test_seg_keeps_empty_segments_when_asked(ct_slices: list[Dataset]) -> None:
    result = build_seg(
        Prediction(CARD, _ct_labelmap()), ct_slices, _identity(ct_slices, "seg"), omit_empty_segments=False
    )
    assert result.segment_numbers == {1: 1, 2: 2, 3: 3}
    labels = [item.SegmentLabel for item in result.dataset.SegmentSequence]
    assert labels == ["Liver", "Spleen", "Right kidney"]


@pytest.mark.parametrize("shape", [{}, {"omit_empty_segments": False}, {"segmentation_type": "LABELMAP"}])
def test_an_sr_built_from_the_segs_outline_is_the_sr_built_from_the_seg(ct_slices: list[Dataset],
                                                                        shape: dict[str, object]) -> None:
    from tests.unit.test_parallel_encode import _comparable

    prediction = _ct_prediction()
    identity = _identity(ct_slices, "seg", number=900)
    seg = build_seg(prediction, ct_slices, identity, **shape)  # type: ignore[arg-type]
    outline = seg_outline(prediction, ct_slices, identity, **shape)  # type: ignore[arg-type]
    assert outline_differs(outline, seg) is None
    assert len(outline.dataset.SegmentSequence) == len(seg.segment_numbers) >= 2  # a label map's background: no label
    from_seg = _sr_with_seg(prediction, ct_slices, seg)
    from_outline = _sr_with_seg(prediction, ct_slices, outline)
    assert _comparable(from_outline) == _comparable(from_seg)
    other = build_seg(prediction, ct_slices, _identity(ct_slices, "seg-other"), **shape)  # type: ignore[arg-type]
    assert outline_differs(outline, other) is not None  # another SEG's identity and tracking UIDs


def test_seg_renumbers_labels_consecutively(ct_slices: list[Dataset]) -> None:
    labelmap = np.zeros((3, 512, 512), np.uint16)
    labelmap[0, 0:5, 0:5] = 3
    labelmap[2, 5:9, 5:9] = 1
    result = build_seg(Prediction(CARD, labelmap), ct_slices, _identity(ct_slices, "seg"))
    assert result.segment_numbers == {1: 1, 3: 2}
    seg = _roundtrip_seg(result.dataset)
    assert seg.get_segment_description(2).segment_label == "Right kidney"
    pixels = seg.get_pixels_by_source_instance([str(ct_slices[0].SOPInstanceUID)], segment_numbers=[2])
    np.testing.assert_array_equal(pixels[0, ..., 0], labelmap[0] == 3)


def test_seg_without_any_segment_is_refused(ct_slices: list[Dataset]) -> None:
    empty = Prediction(CARD, np.zeros((3, 512, 512), np.uint8))
    with pytest.raises(ResultError, match="no segment present; no SEG produced"):
        build_seg(empty, ct_slices, _identity(ct_slices, "seg"))


@pytest.mark.parametrize(
    ("labelmap", "message"),
    [
        (np.ones((2, 512, 512), np.uint8), "3 source images"),
        (np.ones((3, 256, 512), np.uint8), "source image grid"),
        (np.full((3, 512, 512), 7, np.uint8), "does not declare"),
        (np.ones((3, 512, 512), np.float32), "integer type"),
    ],
)
def test_seg_rejects_label_maps_that_do_not_fit(
    ct_slices: list[Dataset], labelmap: np.ndarray, message: str
) -> None:
    with pytest.raises(ResultError, match=message):
        build_seg(Prediction(CARD, labelmap), ct_slices, _identity(ct_slices, "seg"))


def test_seg_rejects_unknown_algorithm_family(ct_slices: list[Dataset]) -> None:
    card = ModelCard(name="x", version="1", family="Magic", segments=(LIVER,))
    with pytest.raises(ResultError, match="Morphological Operations"):
        liver_only = (_ct_labelmap() == 1).astype(np.uint8)
        build_seg(Prediction(card, liver_only), ct_slices, _identity(ct_slices, "seg"))


def test_algorithm_family_lookup() -> None:
    assert algorithm_family_code("morphological operations") == codes.cid7162.MorphologicalOperations
    assert algorithm_family_code("Artificial Intelligence") == codes.cid7162.ArtificialIntelligence


def test_seg_of_a_multiframe_source_without_frame_of_reference_is_refused() -> None:
    source = _shared_enhanced_mr()  # anonymisation removed its Frame of Reference UID
    labelmap = np.zeros((int(source.NumberOfFrames), int(source.Rows), int(source.Columns)), np.uint8)
    labelmap[0, 0, 0] = 1
    card = ModelCard(name="brain-ai", version="0.1", segments=(LIVER,))
    with pytest.raises(ResultError, match="Frame Of Reference"):
        build_seg(Prediction(card, labelmap), [source], _identity([source], "seg", card))


def test_seg_of_a_multiframe_source(tmp_path: Path) -> None:
    source = _shared_enhanced_mr()
    source.FrameOfReferenceUID = pydicom.uid.generate_uid(entropy_srcs=[str(source.SOPInstanceUID), "for"])
    frames = int(source.NumberOfFrames)
    labelmap = np.zeros((frames, int(source.Rows), int(source.Columns)), np.uint8)
    labelmap[2:6, 100:140, 80:120] = 1
    card = ModelCard(name="brain-ai", version="0.1", segments=(LIVER,))
    result = build_seg(Prediction(card, labelmap), [source], _identity([source], "seg", card))
    seg = _roundtrip_seg(result.dataset)
    assert int(seg.NumberOfFrames) == 4
    pixels = seg.get_pixels_by_source_frame(
        str(source.SOPInstanceUID), source_frame_numbers=list(range(3, 7)), segment_numbers=[1]
    )
    np.testing.assert_array_equal(pixels[..., 0], labelmap[2:6])
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert "PatientSex" not in source  # the source is left as it was; the SEG has it empty
    assert seg.PatientSex == ""
    assert "PatientAge" in source and "PatientAge" not in seg  # "0Y" is not a valid AS value
    _assert_dciodvfy_clean(result.dataset, tmp_path / "seg_mf.dcm", "Segmentation")


def test_invalid_optional_patient_attributes_are_not_copied() -> None:
    source = _synthetic_ct(1)
    with pytest.warns(UserWarning, match="AS"):  # pydicom agrees that it is invalid
        source[0].PatientAge = "0Y"
    source[0].PatientWeight = "72.5"
    labelmap = np.ones((1, 16, 16), np.uint8)
    seg = build_seg(Prediction(CARD, labelmap), source, _identity(source, "seg")).dataset
    assert "PatientAge" not in seg
    assert seg.PatientWeight == 72.5


def test_character_set_of_empty_source_value_becomes_utf8() -> None:
    ds = Dataset()
    assert character_set(ds) == "ISO_IR 192"
    ds.SpecificCharacterSet = ""
    assert character_set(ds) == "ISO_IR 192"
    ds.SpecificCharacterSet = "ISO_IR 100"
    assert character_set(ds) == "ISO_IR 100"
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    assert character_set(ds) == ["ISO 2022 IR 6", "ISO 2022 IR 87"]


def test_seg_and_sr_keep_a_latin1_patient_name() -> None:
    source = _synthetic_ct(2, patient_name="Müller^Jürgen", charset="ISO_IR 100")
    labelmap = np.zeros((2, 16, 16), np.uint8)
    labelmap[:, 4:8, 4:8] = 1
    prediction = Prediction(CARD, labelmap)
    seg = _roundtrip_seg(build_seg(prediction, source, _identity(source, "seg")).dataset)
    sr = _roundtrip_sr(_sr_without_seg(prediction, source))
    for result in (seg, sr):
        assert result.SpecificCharacterSet == "ISO_IR 100"
        assert str(result.PatientName) == "Müller^Jürgen"


# --------------------------------------------------------------------------- SR


def test_sr_round_trip_references_seg_and_measurements(ct_slices: list[Dataset], ct_seg: SegResult) -> None:
    sr = _roundtrip_sr(_sr_with_seg(_ct_prediction(), ct_slices, ct_seg))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    by_type = {group.finding_type.value: group for group in groups}
    seg_uid = ct_seg.dataset.SOPInstanceUID
    expected = {LIVER: {("Volume", 12.25, "ml"), ("Mean", 54.5, "[hnsf'U]")}, SPLEEN: {("Volume", 3.5, "ml")}}
    for spec, measurements in expected.items():
        group = by_type[spec.type.value]
        reference = group.referenced_segment
        assert reference.referenced_sop_instance_uid == seg_uid
        assert reference.referenced_sop_class_uid == ct_seg.dataset.SOPClassUID
        assert reference.referenced_segment_numbers == [ct_seg.segment_numbers[spec.label]]
        assert reference.source_series_for_segmentation.value == ct_slices[0].SeriesInstanceUID
        got = {(m.name.meaning, m.value, m.unit.value) for m in group.get_measurements()}
        assert got == measurements
        seg_item = ct_seg.dataset.SegmentSequence[ct_seg.segment_numbers[spec.label] - 1]
        assert group.tracking_uid == seg_item.TrackingUID
    assert sr.content.get_image_measurement_groups() == []  # findings describe the study: not a measurement group
    assert report_findings(sr) == ["spleen borders uncertain"]


def test_sr_identity_study_and_evidence(ct_slices: list[Dataset], ct_seg: SegResult) -> None:
    identity = _identity(ct_slices, "sr")
    sr = _sr_with_seg(_ct_prediction(), ct_slices, ct_seg)
    assert sr.StudyInstanceUID == ct_slices[0].StudyInstanceUID
    assert sr.PatientID == ct_slices[0].PatientID
    assert sr.SeriesInstanceUID == identity.series_instance_uid != ct_slices[0].SeriesInstanceUID
    assert sr.SeriesInstanceUID != ct_seg.dataset.SeriesInstanceUID
    assert sr.SOPInstanceUID == identity.sop_instance_uid
    assert sr.SeriesDescription == "AI SR"
    assert sr.Manufacturer == MANUFACTURER
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in ct_slices} | {ct_seg.dataset.SOPInstanceUID}


def test_sr_observer_is_the_model_device(ct_slices: list[Dataset], ct_seg: SegResult) -> None:
    sr = _roundtrip_sr(_sr_with_seg(_ct_prediction(), ct_slices, ct_seg))
    context = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.get("TextValue") or item.get("UID")
        for item in sr.content.get_observer_contexts()[0]
    }
    assert context["Device Observer Name"] == CARD.name
    assert context["Device Observer Manufacturer"] == MANUFACTURER
    assert context["Device Observer Model Name"] == f"{CARD.name} {CARD.version}"
    assert UID(context["Device Observer UID"]).is_valid
    procedure = sr.ContentSequence  # procedure reported is a root child
    codes_reported = [item.ConceptCodeSequence[0].CodeValue for item in procedure if item.ValueType == "CODE"]
    assert "363679005" in codes_reported


def test_sr_without_seg_says_no_segment_was_found(ct_slices: list[Dataset]) -> None:
    prediction = Prediction(
        CARD,
        np.zeros((3, 512, 512), np.uint8),
        measurements={1: (Measurement(SCT_VOLUME, 0.0, UCUM_ML),)},
        findings=("no lungs found",),
    )
    sr = _roundtrip_sr(_sr_without_seg(prediction, ct_slices))
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    # Nothing has a place: no measurement group (a viewer could not place one); the absent liver is said in words.
    assert sr.content.get_image_measurement_groups() == []
    assert sr.content.get_planar_roi_measurement_groups() == []
    assert report_findings(sr) == ["no lungs found", "Liver: not found in the image (Volume 0 ml)", NO_SEGMENT_FINDING]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert [series.SeriesInstanceUID for series in evidence] == [ct_slices[0].SeriesInstanceUID]


def test_sr_records_classifications() -> None:
    source = _synthetic_ct(3)
    card = ModelCard(
        name="ptx-cls", version="3", task=Task.CLASSIFICATION, classes=("pneumothorax", "effusion")
    )
    prediction = Prediction(
        card,
        classifications=(Classification("pneumothorax", 0.91, True), Classification("effusion", 0.12, False)),
    )
    sr = _roundtrip_sr(_sr_without_seg(prediction, source))
    assert sr.content.get_image_measurement_groups() == []  # no place on an image: not a measurement group
    (evaluations,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    codes_found = {item.ConceptNameCodeSequence[0].CodeMeaning: (item.ConceptNameCodeSequence[0].CodingSchemeDesignator,
                                                                item.ConceptCodeSequence[0].CodeValue)
                   for item in evaluations.ContentSequence if item.ValueType == "CODE"}
    assert codes_found == {"pneumothorax": (PRIVATE_SCHEME, "373066001"), "effusion": (PRIVATE_SCHEME, "373067005")}
    assert report_findings(sr) == ["pneumothorax: positive, probability 0.910", "effusion: negative, probability 0.120"]
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME


def test_sr_measurements_form_gives_each_class_a_group_with_its_probability(tmp_path: Path) -> None:
    """The form a destination with ``sr_form: measurements`` gets: numbers in TID 1501 groups."""
    source = _synthetic_ct(3)
    card = ModelCard(name="ptx-cls", version="3", task=Task.CLASSIFICATION, classes=("pneumothorax", "effusion"),
                     segments=(SegmentSpec(1, "Liver", SCT_ANATOMICAL_STRUCTURE, Code("10200004", "SCT", "Liver")),))
    prediction = Prediction(
        card, classifications=(Classification("pneumothorax", 0.91, True), Classification("effusion", 0.12, False)),
        measurements={1: (Measurement(SCT_VOLUME, 0.0, UCUM_ML),)}, findings=("check apex",))
    sr = build_sr(prediction, source, _identity(source, "sr", card), seg=None, segment_numbers=None,
                  form="measurements")
    _assert_dciodvfy_clean(sr, tmp_path / "sr_measurements.dcm", "Comprehensive3DSR")
    report = _roundtrip_sr(sr)
    groups = report.content.get_image_measurement_groups()
    by_name = {str(g.tracking_identifier): g for g in groups}
    assert sorted(by_name) == ["Liver", "effusion", "pneumothorax"]
    (probability,) = by_name["pneumothorax"].get_measurements()
    assert probability.name.meaning == "Probability" and probability.value == pytest.approx(0.91)
    assert probability.unit.value == "1"
    (verdict,) = by_name["effusion"].get_qualitative_evaluations(name=class_concept("effusion"))
    assert verdict.value.value == "373067005"  # No
    (volume,) = by_name["Liver"].get_measurements()  # an absent segment's value: a number, not words
    assert volume.value == 0.0 and volume.name.meaning == "Volume"
    assert report_findings(sr) == ["check apex"]
    with pytest.raises(ResultError, match="SR form 'pretty'"):
        build_sr(prediction, source, _identity(source, "sr", card), seg=None, segment_numbers=None, form="pretty")


def test_sr_with_nothing_to_report_still_says_so() -> None:
    source = _synthetic_ct(2)
    card = ModelCard(name="empty", version="1", task=Task.CLASSIFICATION)
    sr = _roundtrip_sr(_sr_without_seg(Prediction(card), source))
    assert sr.content.get_image_measurement_groups() == []
    assert report_findings(sr) == [NO_RESULT_FINDING]


def test_sr_rejects_inconsistent_inputs(ct_slices: list[Dataset], ct_seg: SegResult) -> None:
    identity = _identity(ct_slices, "sr")
    with pytest.raises(ResultError, match="both"):
        build_sr(_ct_prediction(), ct_slices, identity, seg=ct_seg.dataset, segment_numbers=None)
    bad = Prediction(CARD, classifications=(Classification("x", 1.5, True),))
    with pytest.raises(ResultError, match=r"not in \[0, 1\]"):
        build_sr(bad, ct_slices, identity, seg=None, segment_numbers=None)
    undeclared = Prediction(CARD, measurements={9: (Measurement(SCT_VOLUME, 1.0, UCUM_ML),)})
    with pytest.raises(ResultError, match="does not declare"):
        build_sr(undeclared, ct_slices, identity, seg=None, segment_numbers=None)


def test_sr_uses_the_source_procedure_code() -> None:
    source = _synthetic_ct(2)
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "24627-2", "LN", "CT Chest"
    for ds in source:
        ds.ProcedureCodeSequence = [item]
    card = ModelCard(name="c", version="1", task=Task.CLASSIFICATION)
    sr = _sr_without_seg(Prediction(card, findings=("ok",)), source)
    reported = [i.ConceptCodeSequence[0].CodeValue for i in sr.ContentSequence if i.ValueType == "CODE"]
    assert "24627-2" in reported


# --------------------------------------------------------------------------- dciodvfy


def _dciodvfy() -> str:
    return DCIODVFY if os.path.exists(DCIODVFY) else require_tool("dciodvfy")


def _assert_dciodvfy_clean(dataset: Dataset, path: Path, iod: str) -> None:
    """Write ``dataset`` and check that dciodvfy validates it as ``iod`` without any error."""
    tool = _dciodvfy()
    dataset.save_as(path, enforce_file_format=True)
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120, check=False)
    output = run.stdout + run.stderr
    assert iod in output.splitlines(), f"dciodvfy did not check {path.name} as {iod}:\n{output}"
    errors = [line for line in output.splitlines() if "Error" in line]
    assert not errors, f"dciodvfy reports errors for {path.name}:\n{output}"


def test_dciodvfy_seg(ct_seg: SegResult, tmp_path: Path) -> None:
    _assert_dciodvfy_clean(ct_seg.dataset, tmp_path / "seg.dcm", "Segmentation")


def test_dciodvfy_sr_with_seg(ct_slices: list[Dataset], ct_seg: SegResult, tmp_path: Path) -> None:
    sr = _sr_with_seg(_ct_prediction(), ct_slices, ct_seg)
    _assert_dciodvfy_clean(sr, tmp_path / "sr_seg.dcm", "Comprehensive3DSR")


def test_dciodvfy_sr_without_seg(ct_slices: list[Dataset], tmp_path: Path) -> None:
    prediction = Prediction(CARD, np.zeros((3, 512, 512), np.uint8), findings=("no lungs found",))
    sr = _sr_without_seg(prediction, ct_slices)
    _assert_dciodvfy_clean(sr, tmp_path / "sr_noseg.dcm", "Comprehensive3DSR")


def test_dciodvfy_sr_with_classification(tmp_path: Path) -> None:
    source = _synthetic_ct(3)
    card = ModelCard(name="ptx-cls", version="3", task=Task.CLASSIFICATION, classes=("pneumothorax",))
    prediction = Prediction(
        card, classifications=(Classification("pneumothorax", 0.7, True),), findings=("check apex",)
    )
    sr = _sr_without_seg(prediction, source)
    _assert_dciodvfy_clean(sr, tmp_path / "sr_cls.dcm", "Comprehensive3DSR")


def test_dciodvfy_sr_with_detections_and_boxes_read_back(tmp_path: Path) -> None:
    """A detection model's boxes: one Planar ROI per box, the SCOORD3D ellipse inscribed in its central section."""
    source = _synthetic_ct(3)
    card = ModelCard(name="nodules", version="1", task=Task.DETECTION, classes=("Lung nodule",))
    boxes = (Detection(0, 0.61, (10.0, -20.0, 5.0), (8.0, 6.0, 4.0)), Detection(0, 0.93, (-30.0, 12.5, 2.5),
                                                                                     (12.0, 12.0, 9.0)))
    sr = _sr_without_seg(Prediction(card, detections=boxes), source)
    _assert_dciodvfy_clean(sr, tmp_path / "sr_det.dcm", "Comprehensive3DSR")
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    every = report.content.get_planar_roi_measurement_groups()
    assert len(every) == 4  # per box: on its source image (SCOORD) first, then in 3D (SCOORD3D), one tracking UID
    images = [g for g in every if g.roi.ValueType == "SCOORD"]
    groups = [g for g in every if g not in images]
    assert [g.tracking_uid for g in images] == [g.tracking_uid for g in groups]
    on_image = images[0].roi  # the best box's centre (z 2.5) lies on the second slice
    assert on_image.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source[1].SOPInstanceUID
    np.testing.assert_allclose(np.asarray(on_image.GraphicData).reshape(-1, 2).mean(axis=0), (-21.5, 21.0))
    best = groups[0]  # best score first
    # The class is coded from the node's table: SNOMED CT Nodule, found in the lung.
    assert (best.finding_type.value, best.finding_type.scheme_designator) == ("27925004", "SCT")
    assert [site.value.meaning for site in best.finding_sites] == ["Lung"]
    region = best.roi
    assert region is not None and region.graphic_type == hd.sr.GraphicTypeValues3D.ELLIPSE
    assert region.frame_of_reference_uid == source[0].FrameOfReferenceUID
    points = region.value
    assert points.shape == (4, 3)  # major axis end points, then minor axis end points
    np.testing.assert_allclose(points.min(axis=0), (-36.0, 6.5, 2.5))
    np.testing.assert_allclose(points.max(axis=0), (-24.0, 18.5, 2.5))
    np.testing.assert_allclose(points.mean(axis=0), (-30.0, 12.5, 2.5))
    second = groups[1].roi.value  # 8 x 6 mm: the major axis runs along x
    np.testing.assert_allclose(second[:2], [[6.0, -20.0, 5.0], [14.0, -20.0, 5.0]])
    probability = next(m for m in images[0].get_measurements() if m.name.meaning == "Probability")
    assert probability.value == pytest.approx(0.93) and best.get_measurements() == []  # the values: once


def test_sr_places_each_segment_and_lists_its_images(ct_slices: list[Dataset], ct_seg: SegResult) -> None:
    """Every segment finding also has a place (its largest cross-section, SCOORD3D ellipse, same tracking UID);
    the Image Library (TID 1600) lists the images the findings are placed on. A viewer (OHIF) needs both to
    open the report."""
    sr = _roundtrip_sr(_sr_with_seg(_ct_prediction(), ct_slices, ct_seg))
    volumetric = {g.tracking_uid: g for g in sr.content.get_volumetric_roi_measurement_groups()}
    planar = {g.tracking_uid: g for g in sr.content.get_planar_roi_measurement_groups()}
    assert set(planar) == set(volumetric) and len(planar) == 2
    library = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028"]
    assert len(library) == 1
    listed = {ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
              for group in library[0].ContentSequence for ref in group.ContentSequence}
    placed_on = {g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                 for g in planar.values() if g.roi is not None and g.roi.ValueType == "SCOORD"}
    placed_on |= {item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for g in sr.content.get_planar_roi_measurement_groups() for item in [g.roi]
                  if item is not None and item.ValueType == "SCOORD"}
    assert listed and listed == placed_on and listed <= {ds.SOPInstanceUID for ds in ct_slices}
    liver = next(g for g in planar.values() if g.finding_type.meaning == "Liver")
    points = liver.roi.value
    # Liver: rows 200-299, columns 100-219 on slices 0 and 1 (plus one voxel); slice 0 has the most pixels.
    first = ct_slices[0]
    spacing = [float(v) for v in first.PixelSpacing]
    row_dir, col_dir = np.asarray(first.ImageOrientationPatient[:3], float), np.asarray(first.ImageOrientationPatient[3:], float)
    centre = np.asarray(first.ImagePositionPatient, float) + 159.5 * spacing[1] * row_dir + 249.5 * spacing[0] * col_dir
    np.testing.assert_allclose(points.mean(axis=0), centre, atol=0.02 * spacing[0] * 100)
    major = np.linalg.norm(points[1] - points[0])
    assert major == pytest.approx(4 * 120 / np.sqrt(12) * spacing[1], rel=0.02)  # 4 sigma of a 120-pixel span


def test_label_counts_are_made_once_per_prediction_and_agree_with_a_direct_count() -> None:
    from dicom_node.results.places import segment_place, slice_planes

    rng = np.random.default_rng(7)
    labelmap = np.zeros((6, 20, 24), np.uint8)
    labelmap[1:5] = rng.integers(0, 3, (4, 20, 24))
    labelmap[3, :, :12] = 2  # label 2's largest cross-section: slice 3
    card = CARD
    prediction = Prediction(card=card, labelmap=labelmap)
    counts = prediction.slice_label_counts()
    assert counts is not None and prediction.slice_label_counts() is counts  # counted once
    expected = np.array([[np.count_nonzero(plane == v) for v in range(3)] for plane in labelmap])
    np.testing.assert_array_equal(counts, expected)
    assert [s.label for s in prediction.present_segments()] == [1, 2]  # the card's kidney (3) is absent
    planes = slice_planes(_synthetic_ct(6, rows=20, columns=24), 6)
    assert planes is not None
    for label in (1, 2):
        with_counts = segment_place(labelmap, label, planes, counts)
        alone = segment_place(labelmap, label, planes)
        assert with_counts is not None and alone is not None and with_counts[0] == alone[0]
        np.testing.assert_array_equal(with_counts[1], alone[1])
    assert segment_place(labelmap, 2, planes, counts)[0] == 3  # type: ignore[index]
    assert Prediction(card=card, labelmap=labelmap.astype(np.int16)).slice_label_counts() is None


@pytest.mark.parametrize("labels", [1, 2, 8, 9, 40])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_label_counts_agree_with_a_direct_count_with_few_and_many_labels(labels: int, dtype: type) -> None:
    # A few labels are counted by comparisons, many by bincount: both give the same counts.
    rng = np.random.default_rng(labels)
    labelmap = np.zeros((5, 16, 18), dtype)
    labelmap[1] = rng.integers(0, labels + 1, (16, 18))
    labelmap[3, 2:9, 4:11] = labels  # the highest label on one slice only
    labelmap[4, 0, 0] = 1
    counts = Prediction(card=CARD, labelmap=labelmap).slice_label_counts()
    expected = np.array([[np.count_nonzero(plane == v) for v in range(labels + 1)] for plane in labelmap])
    assert counts is not None
    np.testing.assert_array_equal(counts, expected)
