"""Every attribute a result copies from its source, checked against the standard before any object is built.

highdicom copies the root attributes of the source's Patient and Study
modules (Patient, Clinical Trial Subject, General Study, Patient Study,
Clinical Trial Study: 103 keywords for a CT image) into SEG, SR and SC
objects, the PDF copies the same, and the overlay images also carry the
source's Laterality and Body Part Examined; real scanners and archives write
values the standard forbids there (PatientSex ``0000``, a 65-character LO,
``20230230``, a UID with a trailing space, a name with six components),
and one such value would make highdicom refuse the object or the result
fail validation.  :func:`check_sources` checks each of them once per job,
by one policy:

===================================  =============================================================
what is wrong                        what the result gets
===================================  =============================================================
case or spelling of an enumerated    normalised when the intent is unambiguous (``m`` -> ``M``,
value, ``YYYY.MM.DD`` dates,         ``MALE`` -> ``M``, ``2023.01.02`` -> ``20230102``,
``HH:MM:SS`` times, empty trailing   ``10:15:00`` -> ``101500``, ``DOE^JANE^^^^`` -> ``DOE^JANE``,
name components, padding of a UID    ``1.2.3 `` -> ``1.2.3``)
anything else (not a real date, a    Type 2 attributes (must be present) are emptied; every other
value out of its enumeration, too    attribute is left out.  Never a guessed value.
long, wrong characters, too many
values)
Patient ID                           never changed but for surrounding spaces: the patient's
                                     identity in the PACS must match (a value the VR forbids
                                     stays, and is reported)
===================================  =============================================================

Each change is a line without PHI (the attribute and the reason, never the
value), logged, kept in the job's notes (``dicom-node status``), and written
into every result object as a Contributing Equipment item (PS3.3 C.12.1,
purpose "Modifying Equipment", the lines as its Contribution Description).
The source files themselves are never modified.
"""

from __future__ import annotations

import datetime
import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import pydicom.config
from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map
from pydicom import Dataset
from pydicom.datadict import dictionary_VM, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage
from pydicom.valuerep import validate_value

from dicom_node.results.identity import MANUFACTURER, SOFTWARE_NAME

logger = logging.getLogger(__name__)

#: Attributes the result objects need present (Type 2 in SEG, SR, SC and PDF): emptied, never left out.
TYPE2: Final[frozenset[str]] = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "Laterality",
})
#: Series-level attributes the node itself copies into its overlay images (``results/sc.py``).
NODE_COPIED: Final[tuple[str, ...]] = ("Laterality", "BodyPartExamined")
#: Enumerated values (PS3.3) of copied attributes, and the spellings taken as each.
ENUMERATIONS: Final[dict[str, dict[str, str]]] = {
    "PatientSex": {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F", "OTHER": "O"},
    "PatientIdentityRemoved": {"YES": "YES", "NO": "NO"},
    "PatientSexNeutered": {"ALTERED": "ALTERED", "UNALTERED": "UNALTERED"},
    "QualityControlSubject": {"YES": "YES", "NO": "NO"},
    "Laterality": {"R": "R", "L": "L", "RIGHT": "R", "LEFT": "L"},
}
#: Purpose of Reference of the Contributing Equipment item (DCM 109103).
_MODIFYING_EQUIPMENT: Final[tuple[str, str, str]] = ("109103", "DCM", "Modifying Equipment")
_UID_RE: Final[re.Pattern[str]] = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_DOTTED_DATE: Final[re.Pattern[str]] = re.compile(r"(\d{4})\.(\d{2})\.(\d{2})")
_COLON_TIME: Final[re.Pattern[str]] = re.compile(r"(\d{2}):(\d{2})(?::(\d{2}(?:\.\d{1,6})?))?")
_MAX_DESCRIPTION: Final[int] = 1024  # Contribution Description, VR ST


@dataclass(frozen=True)
class Change:
    """One copied attribute the results carry differently from the source; ``str()`` is PHI-free."""

    keyword: str
    reason: str
    action: str  # "normalised", "emptied", "left out", "kept"

    def __str__(self) -> str:
        return f"{self.keyword}: {self.reason}; {self.action}"


@functools.cache
def copied_keywords(sop_class_uid: str) -> tuple[str, ...]:
    """Root attributes of the Patient and Study modules of the source's IOD (what highdicom copies),
    and :data:`NODE_COPIED`.

    An IOD highdicom does not know falls back to the CT Image IOD's modules.
    """
    iods = get_sop_class_iod_map()
    iod = iods.get(sop_class_uid) or iods[CTImageStorage]
    attributes = get_module_attribute_map()
    keywords: dict[str, None] = {}
    for module in get_iod_module_map()[iod]:
        if module["ie"] in ("Patient", "Study"):
            keywords.update((str(a["keyword"]), None) for a in attributes[module["key"]] if not a["path"])
    keywords.update((keyword, None) for keyword in NODE_COPIED)
    return tuple(keywords)


def check_sources(sources: Sequence[Dataset]) -> tuple[list[Dataset], list[Change]]:
    """The sources as the result builders should see them, and what was changed.

    Parameters
    ----------
    sources:
        The source images of a job (never modified).

    Returns
    -------
    list of pydicom.Dataset
        Each source, or a shallow copy of it (pixels shared) with its copied
        attributes corrected by the policy of this module.
    list of Change
        The changes, once each (the same header repeated over a series is
        reported once).
    """
    checked: list[Dataset] = []
    changes: dict[tuple[str, str, str], Change] = {}
    verdicts: dict[tuple[str, str, str], tuple[object, Change] | None] = {}  # a series repeats its headers
    for source in sources:
        fixed, found = _check_one(source, verdicts)
        checked.append(fixed)
        for change in found:
            changes.setdefault((change.keyword, change.reason, change.action), change)
    for change in changes.values():
        logger.info("Results from an imperfect source: %s", change)
    return checked, list(changes.values())


def _check_one(source: Dataset, verdicts: dict[tuple[str, str, str], tuple[object, Change] | None]
               ) -> tuple[Dataset, list[Change]]:
    found: list[Change] = []
    replacement: dict[str, object] = {}
    for keyword in copied_keywords(str(source.get("SOPClassUID", ""))):
        if keyword not in source:
            continue
        element = source[keyword]
        if element.VR in ("SQ", "OB", "OW", "UN") or element.value in (None, ""):
            continue
        key = (keyword, element.VR, repr(element.value))
        if key in verdicts:
            verdict = verdicts[key]
        else:
            verdict = verdicts[key] = _verdict(keyword, element.VR, element.value)
        if verdict is None:
            continue
        value, change = verdict
        found.append(change)
        if not change.action.startswith("kept"):
            replacement[keyword] = value
    if not replacement:
        return source, found
    fixed = Dataset(dict(source.items()))
    if hasattr(source, "file_meta"):
        fixed.file_meta = source.file_meta
    for keyword, value in replacement.items():
        if value is _LEAVE_OUT:
            del fixed[keyword]
        else:  # a new element: the source's own element objects are shared with the copy
            old = source[keyword]
            fixed[old.tag] = DataElement(old.tag, old.VR, value)
    return fixed, found


_LEAVE_OUT = object()


def _verdict(keyword: str, vr: str, value: object) -> tuple[object, Change] | None:
    """``None`` when the value is valid; else the value the results carry and the change."""
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    texts = [str(v) for v in values]
    if keyword == "PatientID":
        stripped = texts[0].strip() if len(texts) == 1 else None
        if stripped is not None and stripped != texts[0]:
            return stripped, Change(keyword, "surrounding spaces", "normalised")
        problem = _problem(vr, texts, keyword)
        return None if problem is None else (value, Change(keyword, problem, "kept (the patient's identity)"))
    normalised = [_normalise(keyword, vr, text) for text in texts]
    if normalised != texts and _problem(vr, normalised, keyword) is None:
        what = {"DA": "date written YYYY.MM.DD", "TM": "time written HH:MM:SS", "PN": "empty trailing name components",
                "UI": "padding around the UID"}.get(vr, "not spelled as the standard's enumerated value")
        return (normalised[0] if len(normalised) == 1 else normalised), Change(keyword, what, "normalised")
    problem = _problem(vr, texts, keyword)
    if problem is None:
        return None
    if keyword in TYPE2:
        return "", Change(keyword, problem, "emptied")
    return _LEAVE_OUT, Change(keyword, problem, "left out")


def _normalise(keyword: str, vr: str, text: str) -> str:
    """The unambiguous standard spelling of ``text``, or ``text`` itself."""
    if keyword in ENUMERATIONS:
        return ENUMERATIONS[keyword].get(text.strip().upper(), text)
    if vr == "DA" and (m := _DOTTED_DATE.fullmatch(text.strip())):
        return "".join(m.groups())
    if vr == "TM" and (m := _COLON_TIME.fullmatch(text.strip())):
        return m.group(1) + m.group(2) + (m.group(3) or "")
    if vr == "PN":
        groups = [group.rstrip("^") for group in text.split("=")]
        return "=".join(groups).rstrip("=")
    if vr == "UI":
        return text.strip(" \x00")
    return text


def _problem(vr: str, texts: list[str], keyword: str) -> str | None:
    """Why the values break the standard (PHI-free), or ``None``."""
    tag = tag_for_keyword(keyword)
    vm = dictionary_VM(tag) if tag is not None else "1-n"
    if vm == "1" and len(texts) > 1:
        return f"{len(texts)} values where the standard allows one"
    if keyword in ENUMERATIONS and any(t not in ENUMERATIONS[keyword].values() for t in texts):
        return f"not one of {', '.join(sorted(set(ENUMERATIONS[keyword].values())))}"
    for text in texts:
        try:
            validate_value(vr, text, pydicom.config.RAISE)
        except ValueError as exc:
            reason = str(exc).split(". Please see")[0]
            return re.sub(r"'[^']*'", "(value)", reason).rstrip(".")  # never the value itself: PHI
        if vr == "DA" and text and not _real_date(text):
            return "not a calendar date"
        if vr == "PN" and any(len(group.split("^")) > 5 for group in text.split("=")):
            return "more than five name components"
        if vr == "UI" and not (_UID_RE.fullmatch(text) and len(text) <= 64):
            return "not a UID"
    return None


def _real_date(text: str) -> bool:
    try:
        datetime.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return False
    return True


def record_changes(result: Dataset, changes: Sequence[Change]) -> None:
    """Say in ``result`` what its copied attributes changed (Contributing Equipment Sequence, PS3.3 C.12.1)."""
    if not changes:
        return
    item = Dataset()
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = SOFTWARE_NAME
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = _MODIFYING_EQUIPMENT
    item.PurposeOfReferenceCodeSequence = DicomSequence([code])
    text = "Attributes copied from the source, changed to conform: " + "; ".join(str(c) for c in changes)
    item.ContributionDescription = text[:_MAX_DESCRIPTION]
    existing = list(result.get("ContributingEquipmentSequence", []))
    result.ContributingEquipmentSequence = DicomSequence([*existing, item])
