"""What a result object copies from its source image, checked so that the object stays valid.

highdicom copies the Patient and General Study modules of the first source
image into every object it builds (SEG, SR, SC); the PDF copies them the
same way.  Real sources break the standard in ways that would make the
result invalid: Type 2 attributes left out, optional values of the wrong
form, a de-identification flag without its method, per-frame geometry where
highdicom reads shared geometry.  These helpers give every output builder
the same completed source and the same clean-up afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import VALIDATORS

from dicom_node.errors import ResultError

logger = logging.getLogger(__name__)

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
#: De-identification Method (0012,0063) of a result whose de-identified source did not state one.
DEIDENTIFICATION_UNKNOWN: Final[str] = "Unknown: not stated by the source image"


def complete_source(source: Dataset) -> Dataset:
    """The source as highdicom needs it, without modifying it.

    - highdicom copies Patient ID, Patient's Name, Birth Date, Sex, Study ID,
      Date, Time and Accession Number from the first source; real sources
      often leave some of these Type 2 attributes out, which PS3.3 allows
      only as an empty value: absent ones are added empty.
    - A de-identified source (Patient Identity Removed ``YES``) that does not
      say how (no De-identification Method, which is then required) gets
      :data:`DEIDENTIFICATION_UNKNOWN` as its method, so the copy stays valid.
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
    unstated_method = (str(source.get("PatientIdentityRemoved", "")).strip().upper() == "YES"
                       and not source.get("DeidentificationMethod")
                       and not source.get("DeidentificationMethodCodeSequence"))
    if not missing and shared is None and not unstated_method:
        return source
    completed = Dataset(dict(source.items()))
    if hasattr(source, "file_meta"):
        completed.file_meta = source.file_meta
    for keyword in missing:
        setattr(completed, keyword, "")
    if unstated_method:
        # PS3.3 C.7.1.1: with Patient Identity Removed YES, De-identification Method (or its
        # code sequence) is Type 1C. Keep the source's statement and say the method is unknown.
        completed.DeidentificationMethod = DEIDENTIFICATION_UNKNOWN
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
