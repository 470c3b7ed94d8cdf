"""The anatomy code table the node ships: every TotalSegmentator class coded, valid SNOMED CT identifiers,
DICOM's own meanings, laterality as the SEG's type modifier and the SR's finding site, dciodvfy-clean.
"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.sr._concepts_dict import concepts

from dicom_node.results.seg import build_seg
from dicom_node.results.sr import build_sr
from inference import anatomy
from inference.models.monai_bundle import PRIVATE_SCHEME, segments_from_channels
from inference.types import SCT_VOLUME, UCUM_ML, Measurement, ModelCard, Prediction
from tests.unit.test_results import _assert_dciodvfy_clean, _identity, _synthetic_ct

#: The 117 classes of TotalSegmentator v2's "total" task, in its label order (facts about its output).
TOTAL_V2 = (
    "spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right adrenal_gland_left "
    "lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right lung_middle_lobe_right lung_lower_lobe_right "
    "esophagus trachea thyroid_gland small_bowel duodenum colon urinary_bladder prostate kidney_cyst_left "
    "kidney_cyst_right sacrum vertebrae_S1 vertebrae_L5 vertebrae_L4 vertebrae_L3 vertebrae_L2 vertebrae_L1 "
    "vertebrae_T12 vertebrae_T11 vertebrae_T10 vertebrae_T9 vertebrae_T8 vertebrae_T7 vertebrae_T6 vertebrae_T5 "
    "vertebrae_T4 vertebrae_T3 vertebrae_T2 vertebrae_T1 vertebrae_C7 vertebrae_C6 vertebrae_C5 vertebrae_C4 "
    "vertebrae_C3 vertebrae_C2 vertebrae_C1 heart aorta pulmonary_vein brachiocephalic_trunk subclavian_artery_right "
    "subclavian_artery_left common_carotid_artery_right common_carotid_artery_left brachiocephalic_vein_left "
    "brachiocephalic_vein_right atrial_appendage_left superior_vena_cava inferior_vena_cava "
    "portal_vein_and_splenic_vein iliac_artery_left iliac_artery_right iliac_vena_left iliac_vena_right "
    "humerus_left humerus_right scapula_left scapula_right clavicula_left clavicula_right femur_left femur_right "
    "hip_left hip_right spinal_cord gluteus_maximus_left gluteus_maximus_right gluteus_medius_left "
    "gluteus_medius_right gluteus_minimus_left gluteus_minimus_right autochthon_left autochthon_right "
    "iliopsoas_left iliopsoas_right brain skull "
    + " ".join(f"rib_{side}_{n}" for side in ("left", "right") for n in range(1, 13))
    + " sternum costal_cartilages"
).split()

#: TotalSegmentator v1 names that MONAI's wholeBody_ct_segmentation bundle still writes.
TOTAL_V1_EXTRA = ("heart_myocardium", "heart_atrium_left", "heart_atrium_right", "heart_ventricle_left",
                  "heart_ventricle_right", "pulmonary_artery", "face")

def _verhoeff_ok(number: str) -> bool:
    """SNOMED CT identifiers end in a Verhoeff check digit."""
    d = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
         [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
         [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
         [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
    p = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4]]
    for _ in range(6):
        p.append([p[1][p[-1][k]] for k in range(10)])
    check = 0
    for i, digit in enumerate(reversed(number)):
        check = d[check][p[i % 8][int(digit)]]
    return check == 0


def test_verhoeff_rejects_a_changed_digit() -> None:
    assert _verhoeff_ok("64033007") and not _verhoeff_ok("64033008") and not _verhoeff_ok("64303007")


def test_every_totalsegmentator_class_is_coded() -> None:
    missing = [name for name in (*TOTAL_V2, *TOTAL_V1_EXTRA) if anatomy.lookup(name) is None]
    assert len(TOTAL_V2) == 117 and not missing, missing


def test_codes_are_snomed_identifiers_with_dicom_meanings() -> None:
    dicom: dict[str, set[str]] = {}
    for by_code in concepts["SCT"].values():
        for code, (meaning, _cids) in by_code.items():
            dicom.setdefault(code, set()).add(meaning)
    rows = anatomy.table().values()
    assert len(rows) > 130
    in_dicom = 0
    for row in rows:
        for code in (row.type, row.category, row.laterality, row.site):
            if code is None:
                continue
            assert code.scheme == "SCT" and code.value.isdigit() and 6 <= len(code.value) <= 18, row
            assert code.value[-3:-1] in ("00", "10"), f"{row.name}: {code.value} is not a concept identifier"
            assert _verhoeff_ok(code.value), f"{row.name}: {code.value} fails the Verhoeff check"
            if code.value in dicom and code in (row.type, row.site):  # PS3.16 lists it: the same meaning
                in_dicom += 1
                assert code.meaning in dicom[code.value], (row.name, code, dicom[code.value])
        assert 1 <= len(row.label) <= 64
    assert in_dicom > 100


@pytest.mark.parametrize(("written", "name", "side"), [
    ("kidney_left", "kidney_left", "Left"), ("Left kidney", "kidney_left", "Left"),
    ("right-kidney", "kidney_right", "Right"), ("left rib 4", "rib_left_4", "Left"),
    ("Vertebrae_l1", "vertebrae_L1", None), ("vertebra T12", "vertebrae_T12", None),
    ("Urinary Bladder", "urinary_bladder", None), ("Spleen", "spleen", None),
])
def test_names_as_models_write_them(written: str, name: str, side: str | None) -> None:
    found = anatomy.lookup(written)
    assert found is not None and found.name == name
    assert (found.laterality.meaning if found.laterality else None) == side


def test_unknown_names_get_private_codes_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    segments = segments_from_channels({0: "background", 1: "kidney_left", 2: "tumour", 3: "thing"}, "m")
    assert [s.type.scheme for s in segments] == ["SCT", PRIVATE_SCHEME, PRIVATE_SCHEME]
    assert segments[0].name == "Left kidney" and segments[0].modifier == anatomy.LATERALITY["L"]
    assert sum("no known SNOMED CT code" in r.getMessage() for r in caplog.records) == 1


def test_laterality_and_site_in_seg_and_sr(tmp_path: Path) -> None:
    source = _synthetic_ct(3)
    names = ("kidney_left", "kidney_cyst_right", "liver")
    segments = tuple(anatomy.segment(value, name) for value, name in enumerate(names, start=1))
    assert all(segments)
    card = ModelCard(name="abdomen", version="2", segments=segments)  # type: ignore[arg-type]
    labelmap = np.zeros((3, 16, 16), np.uint8)
    labelmap[0:2, 2:6, 2:6], labelmap[1, 8:10, 8:10], labelmap[2, 10:14, 2:8] = 1, 2, 3
    prediction = Prediction(card, labelmap, measurements={v: (Measurement(SCT_VOLUME, 1.0, UCUM_ML),)
                                                          for v in (1, 2, 3)})
    seg = build_seg(prediction, source, _identity(source, "seg", card, number=900))
    described = {int(s.SegmentNumber): s for s in seg.dataset.SegmentSequence}
    kidney, cyst, liver = (described[seg.segment_numbers[v]] for v in (1, 2, 3))
    kidney_type = kidney.SegmentedPropertyTypeCodeSequence[0]
    assert kidney.SegmentLabel == "Left kidney" and kidney_type.CodeValue == "64033007"
    assert kidney_type.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    assert cyst.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert cyst.SegmentedPropertyTypeCodeSequence[0].CodeValue == "367643001"
    assert "SegmentedPropertyTypeModifierCodeSequence" not in cyst.SegmentedPropertyTypeCodeSequence[0]
    region = cyst.AnatomicRegionSequence[0]
    assert region.CodeValue == "64033007" and region.AnatomicRegionModifierSequence[0].CodeValue == "24028007"
    assert "SegmentedPropertyTypeModifierCodeSequence" not in liver.SegmentedPropertyTypeCodeSequence[0]
    _assert_dciodvfy_clean(seg.dataset, tmp_path / "seg.dcm", "Segmentation")

    sr = build_sr(prediction, source, _identity(source, "sr", card), seg=seg.dataset,
                  segment_numbers=seg.segment_numbers)
    _assert_dciodvfy_clean(sr, tmp_path / "sr.dcm", "Comprehensive3DSR")
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    sites = {}
    for group in report.content.get_volumetric_roi_measurement_groups():
        for site in group.finding_sites:
            lat = [m for m in site.ContentSequence if m.ConceptNameCodeSequence[0].CodeValue == "272741003"]
            sites[group.finding_type.value] = (site.value.value, lat[0].ConceptCodeSequence[0].CodeMeaning)
    assert sites == {"64033007": ("64033007", "Left"), "367643001": ("64033007", "Right")}, json.dumps(sites)
