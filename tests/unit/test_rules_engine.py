"""Rule language: every operator, keys (tags, private tags, sequence paths), groups, derived facts,
ordering / stop / default semantics, per-rule quiet time, study roles."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicom_node.domain import SeriesSummary
from dicom_node.errors import ConfigError
from dicom_node.rules.keys import Step, parse_key
from dicom_node.rules.matcher import check_condition, explain, first_failure, match, quiet_seconds_for, study_roles
from dicom_node.rules.summary import attributes_from_dataset, instance_geometry, read_series, scan_paths, series_facts
from dicom_node.settings import PRIORITY_LEVELS, Condition, RuleSettings, load_settings_text
from tests.phantoms import write_ct_series


def cond(c: Any) -> Condition:
    return Condition.model_validate(c)


def reason(c: Any, value: Any, key: str = "X") -> str | None:
    return check_condition(key, cond(c), value)


def rule(name: str, when: dict[str, Any], **extra: Any) -> RuleSettings:
    return RuleSettings.model_validate({"name": name, "when": when, "run": ["lungs"], **extra})


def series(**attributes: Any) -> SeriesSummary:
    facts = {k: attributes.pop(k) for k in list(attributes) if k[0].islower()}
    return SeriesSummary("1.2.3", "1.2.3.4", attributes, facts)


# --------------------------------------------------------------------------- operators


def test_exists_and_absent() -> None:
    assert reason({"exists": True}, "CT") is None
    assert reason({"exists": True}, None, key="ContrastBolusAgent") == "ContrastBolusAgent missing"
    assert reason({"exists": True}, "  ", key="ContrastBolusAgent") == "ContrastBolusAgent is empty"
    assert reason({"absent": True}, None) is None
    assert reason({"absent": True}, "") is None
    assert reason({"absent": True}, [], key="ImageType") is None
    assert reason({"absent": True}, "IODINE", key="ContrastBolusAgent") == (
        "ContrastBolusAgent 'IODINE' is present (absent required)")


def test_exists_false_and_absent_with_value_operators_are_config_errors() -> None:
    with pytest.raises(ValueError, match="write 'exists: true' or 'absent: true'"):
        cond({"exists": False})
    with pytest.raises(ValueError, match="'absent' cannot be combined"):
        cond({"absent": True, "equals": "x"})
    with pytest.raises(ValueError, match="boolean"):
        cond({"exists": "yes"})


def test_equals_is_exact_and_iequals_ignores_case() -> None:
    assert reason({"equals": "CHEST"}, "chest", key="BodyPartExamined") == "BodyPartExamined 'chest' != 'CHEST'"
    assert reason({"iequals": "CHEST"}, " chest ") is None
    assert reason({"iequals": "CHEST"}, "ABDOMEN", key="BodyPartExamined") == (
        "BodyPartExamined 'ABDOMEN' != 'CHEST' (ignoring case)")
    assert reason({"iequals": 2}, "2.0") is None
    assert reason({"iequals": "axial"}, ["ORIGINAL", "PRIMARY", "AXIAL"]) is None


def test_in_regex_min_max_still_hold() -> None:
    assert reason({"in": ["CT", "MR"]}, "MR") is None
    assert reason({"regex": "^1\\.0"}, "1.0 B31f") is None
    assert reason({"min": 1, "max": 3}, "2") is None
    assert reason({"max": 3}, 5.0, key="SliceThickness") == "SliceThickness 5.0 > max 3.0"


def test_contains_is_a_substring_of_any_value() -> None:
    assert reason({"contains": "LUNG"}, "CT LUNG 1mm") is None
    assert reason({"contains": "LOCALIZER"}, ["ORIGINAL", "PRIMARY", "LOCALIZER"]) is None
    assert reason({"contains": "lung"}, "CT LUNG", key="SeriesDescription") == (
        "SeriesDescription 'CT LUNG' does not contain 'lung'")
    assert reason({"contains": "DERIVED"}, None, key="image_type") == "image_type missing"


def test_not_negates_a_nested_condition() -> None:
    assert reason({"not": {"contains": "LOCALIZER"}}, ["ORIGINAL", "PRIMARY", "AXIAL"]) is None
    assert reason({"not": {"in": ["LOCALIZER", "DERIVED"]}}, ["DERIVED", "SECONDARY"], key="image_type") == (
        "image_type ['DERIVED', 'SECONDARY'] matches not {in: ['LOCALIZER', 'DERIVED']}")
    # A missing value fails the inner condition, so the negation holds.
    assert reason({"not": {"equals": "SR"}}, None) is None
    # Combined: every operator must hold.
    assert reason({"regex": "^CT", "not": {"contains": "SCOUT"}}, "CT SCOUT", key="SeriesDescription") == (
        "SeriesDescription 'CT SCOUT' matches not {contains: 'SCOUT'}")
    assert reason({"not": {"not": {"equals": "CT"}}}, "CT") is None


def test_unknown_operator_is_named_with_the_allowed_ones() -> None:
    text = "models: {m: {type: builtin, name: lungs-ct}}\nrules:\n  - name: r\n    when:\n      Modality: {startswith: C}\n    run: [m]\n"
    with pytest.raises(ConfigError, match=r":5: rules\[0\]\.when\.Modality\.startswith: unknown operator \(allowed: "
                       r"exists, absent, equals, iequals, in, regex, contains, min, max, not\)"):
        load_settings_text(text)


# --------------------------------------------------------------------------- keys


def test_tags_and_paths_parse_to_steps() -> None:
    assert parse_key("(0008,0060)") == (Step("Modality"),)
    assert parse_key("(0029,1010)") == (Step("(0029,1010)"),)
    assert parse_key("(0029,10aa)") == (Step("(0029,10AA)"),)
    assert parse_key("ReferencedImageSequence[1].ReferencedSOPClassUID") == (
        Step("ReferencedImageSequence", 1), Step("ReferencedSOPClassUID"))
    for bad, why in (("Modality.Rows", "not a sequence"), ("ReferencedImageSequence", "has VR SQ"),
                     ("PixelData", "VR OB or OW"), ("Modalty", "did you mean 'Modality'"),
                     ("(0008,0061", "neither a DICOM keyword nor a tag"), ("(0002,0010)", "file meta"),
                     ("Modality[0]", "item index"), ("OverlayData", "repeating group")):
        with pytest.raises(ValueError, match=re.escape(why)):
            parse_key(bad)


def test_conditions_on_tags_private_tags_and_sequence_paths() -> None:
    ds = Dataset()
    ds.Modality = "CT"
    ds.add_new(0x00291010, "LO", "HELICAL")
    first, second = Dataset(), Dataset()
    first.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    second.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.ReferencedImageSequence = DicomSequence([first, second])
    pixel = Dataset()
    pixel.SliceThickness = "0.8"
    group = Dataset()
    group.PixelMeasuresSequence = DicomSequence([pixel])
    ds.SharedFunctionalGroupsSequence = DicomSequence([group])
    s = SeriesSummary("1", "2", attributes_from_dataset(ds), {})
    holds = {
        "(0008,0060)": "CT",
        "(0029,1010)": {"equals": "HELICAL"},
        "ReferencedImageSequence.ReferencedSOPClassUID": "1.2.840.10008.5.1.4.1.1.4",  # any item
        "ReferencedImageSequence[0].ReferencedSOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "SharedFunctionalGroupsSequence.PixelMeasuresSequence.SliceThickness": {"max": 1.0},
        "SourceImageSequence.ReferencedSOPClassUID": {"absent": True},
    }
    assert first_failure(rule("r", holds).when, s) is None
    fails = rule("r", {"ReferencedImageSequence[1].ReferencedSOPClassUID": "1.2.840.10008.5.1.4.1.1.2"})
    assert first_failure(fails.when, s) == (
        "ReferencedImageSequence[1].ReferencedSOPClassUID '1.2.840.10008.5.1.4.1.1.4' != '1.2.840.10008.5.1.4.1.1.2'")
    assert first_failure(rule("r", {"(0029,1011)": {"exists": True}}).when, s) == "(0029,1011) missing"


# --------------------------------------------------------------------------- groups


def test_all_any_not_groups_nest() -> None:
    when = {
        "Modality": "CT",
        "any": [{"BodyPartExamined": ["CHEST", "LUNG"]}, {"SeriesDescription": {"regex": "(?i)thorax"}}],
        "not": {"image_type": {"contains": "LOCALIZER"}},
        "all": [{"SliceThickness": {"max": 3}}, {"any": [{"orientation": "axial"}, {"instance_count": {"min": 500}}]}],
    }
    r = rule("r", when)
    ok = series(Modality="CT", BodyPartExamined="ABDOMEN", SeriesDescription="Thorax 1.0", SliceThickness=1.0,
                orientation="axial", image_type=["ORIGINAL", "PRIMARY", "AXIAL"], instance_count=200)
    assert first_failure(r.when, ok) is None
    no_body = series(Modality="CT", BodyPartExamined="HEAD", SeriesDescription="Brain", SliceThickness=1.0,
                     orientation="axial", image_type=["ORIGINAL"], instance_count=200)
    assert first_failure(r.when, no_body) == (
        "any: none holds (BodyPartExamined 'HEAD' not in [CHEST, LUNG]; "
        "SeriesDescription 'Brain' does not match regex '(?i)thorax')")
    scout = series(Modality="CT", BodyPartExamined="CHEST", SliceThickness=1.0, orientation="axial",
                   image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"], instance_count=2)
    assert first_failure(r.when, scout) == (
        "not {image_type: {contains: 'LOCALIZER'}} holds (image_type ['ORIGINAL', 'PRIMARY', 'LOCALIZER'])")
    coronal = series(Modality="CT", BodyPartExamined="CHEST", SliceThickness=1.0, orientation="coronal",
                     image_type=["ORIGINAL"], instance_count=200)
    assert first_failure(r.when, coronal) == (
        "any: none holds (orientation 'coronal' != 'axial'; instance_count 200 < min 500.0)")


def test_group_config_errors_name_the_key() -> None:
    base = "models: {m: {type: builtin, name: lungs-ct}}\nrules:\n  - name: r\n    when:\n      WHEN\n    run: [m]\n"
    for when, msg in (("any: {Modality: CT}", "rules[0].when.any: 'any' takes a non-empty list"),
                      ("not: {equals: CT}", "rules[0].when.not: 'not' takes a mapping of conditions"),
                      ("all: [{Modalty: CT}]", "rules[0].when.all[0].Modalty: unknown DICOM keyword")):
        with pytest.raises(ConfigError, match=re.escape(msg)):
            load_settings_text(base.replace("WHEN", when))


# --------------------------------------------------------------------------- derived facts


def _geometry(iop: tuple[float, ...], positions: list[tuple[float, float, float]],
              image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")) -> list[Any]:
    out = []
    for p in positions:
        ds = Dataset()
        ds.ImageOrientationPatient = list(iop)
        ds.ImagePositionPatient = list(p)
        ds.ImageType = list(image_type)
        out.append(instance_geometry(ds))
    return out


@pytest.mark.parametrize(("iop", "expected"), [
    ((1, 0, 0, 0, 1, 0), "axial"),
    ((1, 0, 0, 0, 0, -1), "coronal"),
    ((0, 1, 0, 0, 0, -1), "sagittal"),
    ((1, 0, 0, 0, math.cos(math.radians(20)), -math.sin(math.radians(20))), "axial"),  # 20 degree gantry tilt
    ((1, 0, 0, 0, math.cos(math.radians(45)), -math.sin(math.radians(45))), "oblique"),
])
def test_orientation(iop: tuple[float, ...], expected: str) -> None:
    assert series_facts(_geometry(iop, [(0, 0, 0)]))["orientation"] == expected


def test_slice_spacing_is_the_median_step_along_the_normal_in_any_order() -> None:
    # Shuffled, one gap (10.0 missing) and one duplicate position: the median step is still 2.5.
    geometry = _geometry((1, 0, 0, 0, 1, 0), [(3.0, -4.0, v) for v in (7.5, 0.0, 12.5, 2.5, 5.0, 5.0)])
    assert series_facts(geometry)["slice_spacing"] == 2.5
    # Coronal slices step along Y.
    coronal = _geometry((1, 0, 0, 0, 0, -1), [(0, y, 0) for y in (0.0, 1.25, 2.5)])
    assert series_facts(coronal)["slice_spacing"] == 1.25
    assert series_facts(_geometry((1, 0, 0, 0, 1, 0), [(0, 0, 0)]))["slice_spacing"] is None
    assert series_facts([instance_geometry(Dataset())]) == {"slice_spacing": None, "orientation": None,
                                                           "image_type": [], "frames": 1}


def test_image_type_union_and_frames() -> None:
    scout = _geometry((1, 0, 0, 0, 1, 0), [(0, 0, 0)], ("ORIGINAL", "PRIMARY", "LOCALIZER"))
    axial = _geometry((1, 0, 0, 0, 1, 0), [(0, 0, 1)], ("ORIGINAL", "PRIMARY ", "AXIAL"))
    mf = Dataset()
    mf.NumberOfFrames = "40"
    mf.ImageType = "DERIVED"
    facts = series_facts([*scout, *axial, instance_geometry(mf)])
    assert facts["image_type"] == ["ORIGINAL", "PRIMARY", "LOCALIZER", "AXIAL", "DERIVED"]
    assert facts["frames"] == 42


def test_enhanced_multiframe_geometry_from_functional_groups() -> None:
    ds = Dataset()
    ds.NumberOfFrames = 3
    orient = Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    shared = Dataset()
    shared.PlaneOrientationSequence = DicomSequence([orient])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for y in (0.0, 2.0, 4.0):
        pos = Dataset()
        pos.ImagePositionPatient = [0, y, 0]
        item = Dataset()
        item.PlanePositionSequence = DicomSequence([pos])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    facts = series_facts([instance_geometry(ds)])
    assert facts == {"slice_spacing": 2.0, "orientation": "coronal", "image_type": [], "frames": 3}


def test_facts_from_real_files_read_all_headers(tmp_path: Path) -> None:
    hu = np.zeros((6, 8, 8), dtype=np.int16)
    files = write_ct_series(hu, (1.25, 0.7, 0.7), tmp_path / "s", slice_thickness=1.0)
    attributes, facts = read_series(files[::-1])
    assert attributes["Modality"] == "CT"
    assert facts == {"slice_spacing": 1.25, "orientation": "axial", "image_type": ["ORIGINAL", "PRIMARY", "AXIAL"],
                     "frames": 6}
    (summary, found), = scan_paths([tmp_path])
    assert summary.facts == {"instance_count": 6, **facts} and len(found) == 6


# --------------------------------------------------------------------------- rule list semantics


def test_rules_in_order_with_stop() -> None:
    rules = [rule("a", {"Modality": "CT"}), rule("b", {"Modality": "CT"}, mode="stop"), rule("c", {})]
    s = series(Modality="CT")
    assert [m.rule for m in match(rules, s)] == ["a", "b"]
    verdicts = explain(rules, s)
    assert [(v.rule, v.matched) for v in verdicts] == [("a", True), ("b", True), ("c", False)]
    assert verdicts[2].reason == "not evaluated: rule 'b' matched with mode: stop"
    # A stop rule that does not match stops nothing.
    assert [m.rule for m in match(rules, series(Modality="MR"))] == ["c"]


def test_default_rule_only_when_nothing_else_matched() -> None:
    rules = [rule("fallback", {}, default=True, priority="low"), rule("ct", {"Modality": "CT"})]
    assert [m.rule for m in match(rules, series(Modality="CT"))] == ["ct"]
    assert explain(rules, series(Modality="CT"))[0].reason == "default rule not needed: rule 'ct' matched"
    assert [m.rule for m in match(rules, series(Modality="MR"))] == ["fallback"]
    # A default rule's own conditions still apply.
    only_ct = [rule("d", {"Modality": "CT"}, default=True)]
    assert match(only_ct, series(Modality="MR")) == []


def test_priority_levels() -> None:
    assert [rule(p, {}, priority=p).job_priority for p in ("stat", "normal", "low")] == [10, 0, -10]
    assert PRIORITY_LEVELS["stat"] > PRIORITY_LEVELS["normal"] > PRIORITY_LEVELS["low"]
    with pytest.raises(ValueError):
        rule("x", {}, priority="urgent")


def test_quiet_seconds_override_takes_the_longest_matching_rule() -> None:
    rules = [rule("fast", {"Modality": "CT"}, quiet_seconds=5), rule("slow", {"BodyPartExamined": "CHEST"},
                                                                     quiet_seconds=120)]
    assert quiet_seconds_for(rules, series(Modality="CT"), 30) == 5
    assert quiet_seconds_for(rules, series(Modality="CT", BodyPartExamined="CHEST"), 30) == 120
    assert quiet_seconds_for(rules, series(Modality="MR"), 30) == 30
    mixed = [rule("fast", {"Modality": "CT"}, quiet_seconds=5), rule("plain", {})]
    assert quiet_seconds_for(mixed, series(Modality="CT"), 30) == 30


STUDY = {"series": {"arterial": {"SeriesDescription": {"regex": "(?i)arterial"}},
                    "venous": {"SeriesDescription": {"regex": "(?i)venous"}}},
         "quiet_seconds": 10, "max_wait_seconds": 100}


def test_study_rule_roles_and_explanations() -> None:
    rules = [rule("phases", {"Modality": "CT"}, study=STUDY)]
    assert study_roles(rules, series(Modality="CT", SeriesDescription="Arterial 1mm")) == {"phases": ("arterial",)}
    assert match(rules, series(Modality="CT", SeriesDescription="Arterial 1mm")) == []
    verdict = explain(rules, series(Modality="CT", SeriesDescription="Native"))[0]
    assert not verdict.matched
    assert verdict.reason == ("fits no required series of the study rule: arterial: SeriesDescription 'Native' "
                              "does not match regex '(?i)arterial'; venous: SeriesDescription 'Native' does not "
                              "match regex '(?i)venous'")
    assert explain(rules, series(Modality="MR", SeriesDescription="Arterial"))[0].reason == "Modality 'MR' != 'CT'"


def test_study_rule_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="max_wait_seconds"):
        rule("s", {}, study={**STUDY, "max_wait_seconds": 5})
    with pytest.raises(ValueError, match="cannot be a default rule"):
        rule("s", {}, study=STUDY, default=True)

