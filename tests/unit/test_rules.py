"""Rules: condition semantics with reasons, matching, loop protection, series summaries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SegmentationStorage, generate_uid

from dicom_node.domain import OutputKind, RuleMatch, SeriesSummary
from dicom_node.rules.matcher import check_condition, explain, match
from dicom_node.rules.summary import OWN_MANUFACTURER, attributes_from_dataset, never_process_reason, scan_paths
from dicom_node.settings import Condition, RuleSettings
from tests.realdata import dicomdir_series, shared

CHEST_CT = RuleSettings.model_validate(
    {
        "name": "chest-ct",
        "when": {
            "Modality": "CT",
            "BodyPartExamined": {"in": ["CHEST", "LUNG", "THORAX"]},
            "SliceThickness": {"max": 3.0},
        },
        "run": ["lungs"],
        "outputs": ["seg", "sr"],
        "send_to": ["pacs"],
    }
)


def summary(**attributes: Any) -> SeriesSummary:
    facts = {k: attributes.pop(k) for k in list(attributes) if k in ("instance_count", "calling_ae")}
    return SeriesSummary(study_uid="1.2.3", series_uid="1.2.3.4", attributes=attributes, facts=facts)


def rule(name: str, when: dict[str, Any], run: tuple[str, ...] = ("lungs",)) -> RuleSettings:
    return RuleSettings.model_validate({"name": name, "when": when, "run": list(run)})


def reason(condition: Any, value: Any, key: str = "X") -> str | None:
    return check_condition(key, Condition.model_validate(condition), value)


# --------------------------------------------------------------------------- operators


def test_equals_text_is_exact_after_strip() -> None:
    assert reason({"equals": "CT"}, " CT ") is None
    assert reason("CT", "CT") is None
    assert reason({"equals": "CT"}, "ct") == "X 'ct' != 'CT'"
    assert reason({"equals": "CT"}, "MR", key="Modality") == "Modality 'MR' != 'CT'"


def test_equals_numbers_compare_numerically() -> None:
    assert reason({"equals": 3}, "3.0") is None
    assert reason({"equals": 3}, 3.0) is None
    assert reason({"equals": "3"}, 3) is None
    assert reason({"equals": 3}, "three") == "X 'three' != 3"
    assert reason({"equals": 3}, 4) == "X 4 != 3"


def test_in_operator_and_list_shorthand() -> None:
    assert reason({"in": ["CHEST", "LUNG"]}, "LUNG") is None
    assert reason(["CHEST", "LUNG"], "CHEST ") is None
    assert reason(["CHEST", "LUNG", "THORAX"], "HEAD", key="BodyPartExamined") == (
        "BodyPartExamined 'HEAD' not in [CHEST, LUNG, THORAX]"
    )


def test_regex_searches_anywhere() -> None:
    assert reason({"regex": "(?i)lung"}, "CT LUNG 1mm") is None
    assert reason({"regex": "^lung$"}, "lung window") == "X 'lung window' does not match regex '^lung$'"
    assert reason({"regex": "lung"}, "LUNG") == "X 'LUNG' does not match regex 'lung'"


def test_min_and_max_are_inclusive() -> None:
    assert reason({"min": 1.0, "max": 3.0}, 1.0) is None
    assert reason({"min": 1.0, "max": 3.0}, 3.0) is None
    assert reason({"max": 3.0}, "2.5") is None
    assert reason({"max": 3.0}, 5.0, key="SliceThickness") == "SliceThickness 5.0 > max 3.0"
    assert reason({"min": 1.0}, 0.5, key="SliceThickness") == "SliceThickness 0.5 < min 1.0"


def test_min_on_non_numeric_value_fails_with_reason() -> None:
    assert reason({"min": 1}, "thin", key="SliceThickness") == "SliceThickness 'thin' is not a number (min 1.0)"


def test_operators_in_one_condition_are_anded_in_order() -> None:
    condition = {"equals": "CT", "regex": "C"}
    assert reason(condition, "CT") is None
    assert reason({"in": ["CT", "MR"], "regex": "M"}, "CT") == "X 'CT' does not match regex 'M'"


def test_missing_and_empty_values_fail() -> None:
    assert reason("CT", None, key="Modality") == "Modality missing"
    assert reason("CT", "", key="Modality") == "Modality is empty"
    assert reason({"in": ["A"]}, [], key="ImageType") == "ImageType is empty"


def test_multi_valued_attributes() -> None:
    image_type = ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert reason({"equals": "AXIAL"}, image_type) is None
    assert reason(["LOCALIZER", "PRIMARY"], image_type) is None
    assert reason({"regex": "^AX"}, image_type) is None
    assert reason({"equals": "LOCALIZER"}, image_type, key="ImageType") == (
        "ImageType ['ORIGINAL', 'PRIMARY', 'AXIAL'] != 'LOCALIZER'"
    )
    assert reason({"max": 1.0}, [0.7, 0.7]) is None
    assert reason({"max": 1.0}, [0.7, 1.2], key="PixelSpacing") == "PixelSpacing [0.7, 1.2] > max 1.0"


def test_long_values_are_cut_in_reasons() -> None:
    text = reason("CT", "A" * 500)
    assert text is not None and len(text) < 120 and text.endswith("!= 'CT'")


# --------------------------------------------------------------------------- rules


def test_chest_rule_matches_and_reports_what_to_do() -> None:
    series = summary(Modality="CT", BodyPartExamined="CHEST", SliceThickness=1.0)
    assert match([CHEST_CT], series) == [
        RuleMatch(rule="chest-ct", models=("lungs",), outputs=(OutputKind.SEG, OutputKind.SR), destinations=("pacs",))
    ]
    verdict = explain([CHEST_CT], series)[0]
    assert verdict.matched and verdict.reason == ""


def test_conditions_are_anded_and_first_failure_is_reported() -> None:
    thick = summary(Modality="CT", BodyPartExamined="CHEST", SliceThickness=5.0)
    assert match([CHEST_CT], thick) == []
    assert explain([CHEST_CT], thick)[0].reason == "SliceThickness 5.0 > max 3.0"
    head = summary(Modality="CT", BodyPartExamined="HEAD", SliceThickness=5.0)
    assert explain([CHEST_CT], head)[0].reason == "BodyPartExamined 'HEAD' not in [CHEST, LUNG, THORAX]"
    no_modality = summary(BodyPartExamined="CHEST", SliceThickness=1.0)
    assert explain([CHEST_CT], no_modality)[0].reason == "Modality missing"


def test_empty_rule_set_matches_nothing() -> None:
    series = summary(Modality="CT", BodyPartExamined="CHEST", SliceThickness=1.0)
    assert match([], series) == []
    assert explain([], series) == []


def test_all_matching_rules_in_order_and_explain_covers_every_rule() -> None:
    rules = [
        rule("big", {"instance_count": {"min": 100}}),
        rule("ct", {"Modality": "CT"}),
        rule("from-pacs", {"calling_ae": "PACS"}, run=("other",)),
    ]
    series = summary(Modality="CT", instance_count=40, calling_ae="PACS")
    assert [m.rule for m in match(rules, series)] == ["ct", "from-pacs"]
    assert match(rules, series)[1].models == ("other",)
    verdicts = explain(rules, series)
    assert [(v.rule, v.matched) for v in verdicts] == [("big", False), ("ct", True), ("from-pacs", True)]
    assert verdicts[0].reason == "instance_count 40 < min 100.0"


def test_derived_fact_wins_over_attribute_of_same_name() -> None:
    series = SeriesSummary("1", "2", attributes={"instance_count": 1}, facts={"instance_count": 50})
    assert match([rule("r", {"instance_count": {"min": 10}})], series) != []


def test_empty_when_matches_every_series() -> None:
    assert [m.rule for m in match([rule("all", {})], summary())] == ["all"]


# --------------------------------------------------------------------------- loop protection


@pytest.mark.parametrize("modality", ["SEG", "SR", "KO", "PR", "RTSTRUCT", "REG"])
def test_never_process_derived_modalities(modality: str) -> None:
    why = never_process_reason(summary(Modality=modality))
    assert why is not None and modality in why


def test_never_process_seg_and_sr_sop_classes_whatever_the_modality() -> None:
    assert never_process_reason(summary(Modality="CT", SOPClassUID=SegmentationStorage)) is not None
    assert never_process_reason(summary(Modality="OT", SOPClassUID="1.2.840.10008.5.1.4.1.1.88.33")) is not None
    assert never_process_reason(summary(Modality="OT", SOPClassUID="1.2.840.10008.5.1.4.1.1.11.1")) is not None


def test_never_process_own_results() -> None:
    why = never_process_reason(summary(Modality="CT", Manufacturer=f" {OWN_MANUFACTURER.upper()} "))
    assert why is not None and "Manufacturer" in why
    assert never_process_reason(summary(Modality="CT", Manufacturer="ACME AI"), manufacturer="ACME AI") is not None


def test_ct_image_series_may_be_processed() -> None:
    assert never_process_reason(summary(Modality="CT", SOPClassUID=CTImageStorage, Manufacturer="Philips")) is None


# --------------------------------------------------------------------------- attributes


def test_attributes_from_dataset_gives_plain_values() -> None:
    ds = Dataset()
    ds.Modality = "CT"
    ds.PatientName = "Doe^Jane"
    ds.SliceThickness = "1.25"
    ds.InstanceNumber = "7"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.Rows = 512
    ds.BodyPartExamined = ""
    ds.SeriesNumber = None
    ds.SOPClassUID = CTImageStorage
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedFrameNumber = None
    ds.ReferencedImageSequence = DicomSequence([item, Dataset()])
    ds.PixelData = b"\x00\x00"
    ds.add_new(0x60003000, "OW", b"\x00\x00")  # overlay data
    ds.add_new(0x00091001, "LO", "private")
    attrs = attributes_from_dataset(ds)
    assert attrs == {
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "SOPClassUID": CTImageStorage,
        "Modality": "CT",
        "PatientName": "Doe^Jane",
        "BodyPartExamined": "",
        "SliceThickness": 1.25,
        "SeriesNumber": None,
        "InstanceNumber": 7,
        "PixelSpacing": [0.5, 0.5],
        "ReferencedImageSequence": [{"ReferencedSOPClassUID": CTImageStorage, "ReferencedFrameNumber": None}, {}],
        "Rows": 512,
        "(0009,1001)": "private",
    }
    assert type(attrs["SliceThickness"]) is float and type(attrs["InstanceNumber"]) is int
    assert type(attrs["SOPClassUID"]) is str and type(attrs["PatientName"]) is str
    json.dumps(attrs, allow_nan=False)


def test_attributes_from_dataset_skips_undecodable_values() -> None:
    ds = Dataset()
    ds.Modality = "CT"
    # As received from a peer: SliceThickness (DS) not a number, Rows (US) with an odd byte count.
    ds[0x00180050] = RawDataElement(Tag(0x00180050), "DS", 12, b"not-a-number", 0, False, True)
    ds[0x00280010] = RawDataElement(Tag(0x00280010), "US", 3, b"\x01\x02\x03", 0, False, True)
    ds.SeriesDescription = "kept"
    attrs = attributes_from_dataset(ds)
    assert attrs == {"Modality": "CT", "SeriesDescription": "kept"}


@pytest.mark.parametrize("origin", ["registry", "shared"])
def test_attributes_from_a_real_ct_file(origin: str) -> None:
    if origin == "registry":  # a GE head CT of pydicom's test files
        path, manufacturer, thickness = dicomdir_series("77654033/CT2")[0], "GE MEDICAL SYSTEMS", 1.25
    else:
        path, manufacturer, thickness = shared("ct_head_5mm_philips") / "I10", "Philips", 5.0
    attrs = attributes_from_dataset(pydicom.dcmread(path, stop_before_pixels=True))
    assert attrs["Modality"] == "CT"
    assert attrs["Manufacturer"] == manufacturer
    assert attrs["SliceThickness"] == thickness
    assert attrs["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert "PixelData" not in attrs
    assert all(not key.startswith("Private") for key in attrs)
    json.dumps(attrs, allow_nan=False)


# --------------------------------------------------------------------------- scanning files


def write_instance(path: Path, study: str, series: str, number: int | None, modality: str = "CT") -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = modality
    if number is not None:
        ds.InstanceNumber = number
        ds.SliceLocation = float(number)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_scan_paths_groups_series_and_skips_non_dicom(tmp_path: Path) -> None:
    study, ct, mr = generate_uid(), generate_uid(), generate_uid()
    for number in (3, 1, 2):
        write_instance(tmp_path / "a" / f"ct{number}.dcm", study, ct, number)
    write_instance(tmp_path / "b" / "nested" / "mr1.dcm", study, mr, None, modality="MR")
    write_instance(tmp_path / "b" / "mr2.dcm", study, mr, 2, modality="MR")
    (tmp_path / "b" / "notes.txt").write_text("not DICOM", encoding="utf-8")

    found = scan_paths([tmp_path])

    assert len(found) == 2
    by_series = {s.series_uid: (s, files) for s, files in found}
    ct_summary, ct_files = by_series[ct]
    assert ct_summary.study_uid == study
    assert ct_summary.facts == {"instance_count": 3, "frames": 3, "image_type": [], "orientation": None,
                                "slice_spacing": None}
    assert ct_summary.attributes["InstanceNumber"] == 1
    assert [p.name for p in ct_files] == ["ct1.dcm", "ct2.dcm", "ct3.dcm"]
    mr_summary, mr_files = by_series[mr]
    assert mr_summary.attributes["Modality"] == "MR"
    assert mr_summary.attributes["InstanceNumber"] == 2, "instances without InstanceNumber sort last"
    assert [p.name for p in mr_files] == ["mr2.dcm", "mr1.dcm"]


@pytest.mark.parametrize("origin", ["registry", "shared"])
def test_scan_paths_accepts_files_and_real_data(tmp_path: Path, origin: str) -> None:
    if origin == "registry":
        source, names, body_part = dicomdir_series("77654033/CT2")[0].parent, ("17106", "17136"), "HEAD"
    else:
        source, names, body_part = shared("ct_head_5mm_philips"), ("I10", "I20"), "BRAIN"
    copy = tmp_path / "ct"
    shutil.copytree(source, copy)
    found = scan_paths([copy / names[0], copy / names[1]])
    assert len(found) == 1
    series, files = found[0]
    assert series.facts["instance_count"] == 2
    assert series.attributes["BodyPartExamined"] == body_part
    assert explain([CHEST_CT], series)[0].reason == f"BodyPartExamined {body_part!r} not in [CHEST, LUNG, THORAX]"


def test_scan_paths_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        scan_paths([tmp_path / "absent"])


def test_own_manufacturer_is_what_every_result_object_is_written_with() -> None:
    from dicom_node.results.identity import MANUFACTURER

    assert MANUFACTURER == OWN_MANUFACTURER, "loop protection must recognise the node's own SEG/SR/SC/PDF"
    # An overlay (secondary capture, modality OT) or PDF (DOC) of ours is caught by its Manufacturer.
    for modality in ("OT", "DOC"):
        assert never_process_reason(summary(Modality=modality, Manufacturer=MANUFACTURER)) is not None
