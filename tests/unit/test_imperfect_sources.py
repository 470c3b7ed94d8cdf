"""Real headers with values the standard forbids: every output kind is still produced, valid, and says what changed.

The corpus is the real CT of pydicom-data (:func:`tests.realdata.real_ct_slices`)
with one header oddity each, as scanners and archives write them.  Each case
runs through the node's header check and then SEG, SR, the overlay series and
the PDF; every object must pass dciodvfy without errors and carry the change
in its Contributing Equipment item.  The change lines never hold the value
(it may be PHI).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_node.results.header_check import _verdict, check_sources, copied_keywords, record_changes
from dicom_node.results.pdf import build_pdf
from dicom_node.results.sc import iter_overlays
from dicom_node.results.seg import build_seg
from dicom_node.results.sr import build_sr
from inference.types import Prediction
from tests.realdata import real_ct_slices
from tests.unit.test_results import CARD, _assert_dciodvfy_clean, _identity

SECRET = "SECRET-VALUE"


def _set(keyword: str, value: object) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        with pydicom.config.disable_value_validation():  # write the bad value as a scanner would
            setattr(ds, keyword, value)
    return edit


# (case, edit of every slice, keyword, expected value in the results or None = left out, expected change)
CASES: list[tuple[str, Callable[[Dataset], None], str, object, str]] = [
    ("sex-0000", _set("PatientSex", "0000"), "PatientSex", "", "PatientSex: not one of F, M, O; emptied"),
    ("sex-lowercase", _set("PatientSex", "f"), "PatientSex", "F",
     "PatientSex: not spelled as the standard's enumerated value; normalised"),
    ("sex-word", _set("PatientSex", "MALE"), "PatientSex", "M",
     "PatientSex: not spelled as the standard's enumerated value; normalised"),
    ("lo-65", _set("StudyDescription", "X" * 65), "StudyDescription", None,
     "StudyDescription: The value length (65) exceeds the maximum length of 64 allowed for VR LO; left out"),
    ("da-20230230", _set("StudyDate", "20230230"), "StudyDate", "", "StudyDate: not a calendar date; emptied"),
    ("da-dotted", _set("PatientBirthDate", "1970.01.31"), "PatientBirthDate", "19700131",
     "PatientBirthDate: date written YYYY.MM.DD; normalised"),
    ("tm-colons", _set("StudyTime", "10:15:30"), "StudyTime", "101530",
     "StudyTime: time written HH:MM:SS; normalised"),
    ("pn-6-components", _set("PatientName", f"{SECRET}^JANE^A^B^C^D"), "PatientName", "",
     "PatientName: more than five name components; emptied"),
    ("pn-trailing-empty", _set("PatientName", "DOE^JANE^^^^"), "PatientName", "DOE^JANE",
     "PatientName: empty trailing name components; normalised"),
    ("as-invalid", _set("PatientAge", "45Y"), "PatientAge", None, "PatientAge: Invalid value for VR AS: (value); left out"),
    ("laterality-word", _set("Laterality", "left"), "Laterality", "L",
     "Laterality: not spelled as the standard's enumerated value; normalised"),
    ("body-part-too-long", _set("BodyPartExamined", "CHEST_ABDOMEN_PELVIS"), "BodyPartExamined", None,
     "BodyPartExamined: The value length (20) exceeds the maximum length of 16 allowed for VR CS; left out"),
    ("sex-multivalued", _set("PatientSex", ["M", "F"]), "PatientSex", "",
     "PatientSex: 2 values where the standard allows one; emptied"),
]


#: Series-level attributes only the overlay images copy (results/sc.py); SEG, SR and PDF do not carry them.
ONLY_IN_SC = {"Laterality", "BodyPartExamined"}


def _with(edit: Callable[[Dataset], None]) -> list[Dataset]:
    slices = real_ct_slices(3)
    for ds in slices:
        edit(ds)
    return slices


def _prediction() -> Prediction:
    labelmap = np.zeros((3, 512, 512), np.uint8)
    labelmap[1, 200:260, 200:280] = 1
    return Prediction(CARD, labelmap)


def _every_output(sources: list[Dataset]) -> list[tuple[str, Dataset, str]]:
    """(kind, object, dciodvfy IOD name) of SEG, SR, the first overlay image and the PDF built from ``sources``."""
    prediction = _prediction()
    seg = build_seg(prediction, sources, _identity(sources, "seg", CARD)).dataset
    sr = build_sr(prediction, sources, _identity(sources, "sr", CARD), seg=seg, segment_numbers={1: 1})
    overlays = list(iter_overlays(prediction, sources, _identity(sources, "sc", CARD)))
    pdf = build_pdf(prediction, sources, _identity(sources, "pdf", CARD))
    return [("seg", seg, "Segmentation"), ("sr", sr, "Comprehensive3DSR"), ("sc", overlays[0], "SCImage"),
            ("pdf", pdf, "EncapsulatedPDF")]


def test_the_check_covers_every_attribute_highdicom_copies() -> None:
    keywords = copied_keywords(pydicom.uid.CTImageStorage)
    assert len(keywords) == 105  # 103 of highdicom's modules + Laterality and Body Part Examined
    assert {"PatientName", "PatientID", "PatientSex", "StudyDate", "StudyDescription", "PatientAge"} <= set(keywords)


def test_a_clean_source_is_not_copied_and_changes_nothing() -> None:
    slices = real_ct_slices(3)
    checked, changes = check_sources(slices)
    assert changes == [] and all(a is b for a, b in zip(checked, slices))


@pytest.mark.parametrize(("case", "edit", "keyword", "expected", "change"), CASES, ids=[c[0] for c in CASES])
def test_every_output_kind_is_produced_valid_and_says_what_changed(
        tmp_path: Path, case: str, edit: Callable[[Dataset], None], keyword: str, expected: object,
        change: str) -> None:
    sources = _with(edit)
    before = [ds.get(keyword) for ds in sources]
    checked, changes = check_sources(sources)
    assert [str(c) for c in changes] == [change]
    assert SECRET not in change
    assert [ds.get(keyword) for ds in sources] == before, "the sources themselves are never modified"

    for kind, ds, iod in _every_output(checked):
        record_changes(ds, changes)
        if keyword in ONLY_IN_SC and kind != "sc":
            assert keyword not in ds, (kind, keyword)
        elif expected is None:
            assert keyword not in ds, (kind, keyword)
        else:
            assert str(ds[keyword].value or "") == expected, (kind, ds[keyword].value)  # empty: "" or None
        (item,) = [i for i in ds.ContributingEquipmentSequence
                   if i.PurposeOfReferenceCodeSequence[0].CodeValue == "109103"]
        assert change in item.ContributionDescription
        _assert_dciodvfy_clean(ds, tmp_path / f"{kind}.dcm", iod)


def test_a_patient_id_is_never_changed_but_for_its_spaces() -> None:
    checked, changes = check_sources(_with(_set("PatientID", "  ABC123 ")))
    assert checked[0].PatientID == "ABC123"
    assert [str(c) for c in changes] == ["PatientID: surrounding spaces; normalised"]
    checked, changes = check_sources(_with(_set("PatientID", "P" * 70)))
    assert checked[0].PatientID == "P" * 70
    assert [c.action for c in changes] == ["kept (the patient's identity)"]


def test_a_uid_with_a_trailing_space_is_normalised() -> None:
    # pydicom already strips a UID's padding when it reads or sets one; a value that reaches the
    # check some other way (a raw element, a multi-valued UI) is normalised the same.
    verdict = _verdict("StudyInstanceUID", "UI", "1.2.840.113619.2.55 ")
    assert verdict is not None
    value, change = verdict
    assert value == "1.2.840.113619.2.55"
    assert str(change) == "StudyInstanceUID: padding around the UID; normalised"


def test_a_uid_written_with_a_trailing_space_reaches_every_output_without_it(tmp_path: Path) -> None:
    # As an archive writes it: the Study Instance UID padded with a space (UI pads with NUL) in the file.
    written = []
    for index, ds in enumerate(real_ct_slices(3)):
        uid = f"{ds.StudyInstanceUID}9 "
        ds[0x0020000D] = RawDataElement(Tag(0x0020000D), "UI", len(uid), uid.encode(), 0, False, True)
        path = tmp_path / f"{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    assert b"18009969 " in written[0].read_bytes()
    sources = [pydicom.dcmread(p) for p in written]
    checked, changes = check_sources(sources)
    assert changes == []  # pydicom drops the padding on reading: nothing left to change
    for kind, ds, iod in _every_output(checked):
        assert str(ds.StudyInstanceUID).endswith("18009969"), kind
        _assert_dciodvfy_clean(ds, tmp_path / f"{kind}.dcm", iod)
