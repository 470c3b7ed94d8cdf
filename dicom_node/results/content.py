"""Coded concepts and algorithm identification shared by every result object (SEG, SR, SC, PDF)."""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode

from dicom_node.errors import ResultError
from dicom_node.results.identity import algorithm_parameters
from inference.types import Code, ModelCard, Prediction, Task


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


def result_words(prediction: Prediction) -> str:
    """The result in a few words, for a series description's ``{result}`` (never PHI: model output only).

    A classifier: its positive classes with their probabilities
    (``"Nodule present 0.83"``), or ``"negative"``; a detector: its count
    per class (``"3 Lung nodule"``), or ``"none found"``; otherwise empty.
    """
    if prediction.card.task is Task.CLASSIFICATION:
        positive = [c for c in prediction.classifications if c.positive]
        return ", ".join(f"{c.name} {c.probability:.2f}" for c in positive) if positive else "negative"
    if prediction.card.task is Task.DETECTION:
        counts: dict[str, int] = {}
        for item in prediction.detections:
            name = (prediction.card.classes[item.label] if 0 <= item.label < len(prediction.card.classes)
                    else f"class {item.label}")
            counts[name] = counts.get(name, 0) + 1
        return ", ".join(f"{n} {name}" for name, n in counts.items()) if counts else "none found"
    return ""
