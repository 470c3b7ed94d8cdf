"""SNOMED CT codes for the structure names that segmentation models write (``inference/data/anatomy.tsv``).

Whole-body CT models name their labels in snake case with the side last
(TotalSegmentator's ``kidney_left``, ``rib_right_4``, ``vertebrae_L1``);
other models write ``Left kidney`` or ``left-kidney``.  :func:`lookup` finds
all of these in the table the node ships, and :func:`segment` turns a label
into a :class:`~inference.types.SegmentSpec` with the category, the type, the
laterality (as DICOM's type modifier) and, for findings that are not
themselves anatomy (a kidney cyst), the anatomic region.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from inference.types import SCT_ANATOMICAL_STRUCTURE, Code, SegmentSpec

logger = logging.getLogger(__name__)

TABLE = Path(__file__).with_name("data") / "anatomy.tsv"

CATEGORIES = {
    "anatomy": Code("123037004", "SCT", "Anatomical Structure"),
    "tissue": Code("85756007", "SCT", "Tissue"),
    "altered": Code("49755003", "SCT", "Morphologically Altered Structure"),
    "object": Code("260787004", "SCT", "Physical object"),
}
#: Private coding scheme for label names without a known SNOMED CT code.
PRIVATE_SCHEME = "99DCMNODE"

LATERALITY = {"L": Code("7771000", "SCT", "Left"), "R": Code("24028007", "SCT", "Right")}

#: Colours by kind of structure (RGB), so neighbouring labels of a whole-body model stay distinguishable.
_BONE, _MUSCLE, _ARTERY, _VEIN = (241, 214, 145), (192, 104, 88), (216, 60, 50), (70, 110, 220)
_ORGANS = ((221, 130, 101), (144, 238, 144), (128, 174, 128), (111, 184, 210), (183, 156, 220),
           (252, 208, 0), (255, 128, 0), (0, 151, 206), (216, 101, 79), (170, 250, 250))


@dataclass(frozen=True)
class Structure:
    """One row of the table."""

    name: str
    label: str
    category: Code
    type: Code
    laterality: Code | None
    site: Code | None


def _normal(name: str) -> str:
    """``Left Kidney`` / ``left-kidney`` / ``kidney_left`` -> ``kidney_left``; ``vertebrae_L1`` keeps its level."""
    text = re.sub(r"[\s\-/,.]+", "_", name.strip()).strip("_")
    levels = re.fullmatch(r"(?i)(vertebrae?)_([CTLS]\d{1,2})", text)
    if levels:
        return f"vertebrae_{levels.group(2).upper()}"
    text = text.lower()
    side = re.match(r"(left|right)_(.+)", text)
    if side:  # "left_kidney" -> "kidney_left"; "left_rib_4" -> "rib_left_4"
        rest = side.group(2)
        numbered = re.fullmatch(r"(.+?)_(\d+)", rest)
        text = f"{numbered.group(1)}_{side.group(1)}_{numbered.group(2)}" if numbered else f"{rest}_{side.group(1)}"
    return text


@lru_cache(maxsize=1)
def table() -> dict[str, Structure]:
    """The shipped table, by normalised name."""
    rows: dict[str, Structure] = {}
    with open(TABLE, encoding="utf-8") as f:
        header: list[str] | None = None
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if header is None:
                header = fields
                continue
            row = dict(zip(header, fields, strict=True))
            rows[_normal(row["name"])] = Structure(
                name=row["name"], label=row["label"], category=CATEGORIES[row["category"]],
                type=Code(row["code"], "SCT", row["meaning"]),
                laterality=LATERALITY.get(row["laterality"]),
                site=Code(row["site_code"], "SCT", row["site_meaning"]) if row["site_code"] else None)
    return rows


def lookup(name: str) -> Structure | None:
    """The table's entry for a model's label name, or ``None``."""
    return table().get(_normal(name))


def _color(structure: Structure, index: int) -> tuple[int, int, int]:
    meaning = structure.type.meaning.lower()
    if any(word in meaning for word in ("vertebra", "rib", "bone", "femur", "humerus", "scapula", "clavicle",
                                        "sacrum", "skull", "sternum", "cartilage", "hip")):
        return _BONE
    if "muscle" in meaning:
        return _MUSCLE
    if any(word in meaning for word in ("artery", "aorta", "trunk")):
        return _ARTERY
    if any(word in meaning for word in ("vein", "vena")):
        return _VEIN
    return _ORGANS[index % len(_ORGANS)]


def segment(value: int, name: str) -> SegmentSpec | None:
    """The segment for label ``value`` named ``name`` when the table knows the name, else ``None``."""
    structure = lookup(name)
    if structure is None:
        return None
    return SegmentSpec(value, structure.label[:64], structure.category, structure.type, _color(structure, value),
                       modifier=structure.laterality, site=structure.site)


def private_code(name: str) -> Code:
    """A private code (scheme :data:`PRIVATE_SCHEME`) for a class name no table codes.

    Code value = the name in upper case with other characters than A-Z, 0-9
    replaced by ``_`` when that fits 16 characters (VR SH), else its first 7
    characters, ``_`` and 8 hex digits of its SHA-256; meaning = the name.
    """
    value = re.sub(r"[^A-Z0-9_]+", "_", name.strip().upper()).strip("_") or "CLASS"
    if len(value) > 16:
        value = f"{value[:7]}_{hashlib.sha256(name.encode('utf-8')).hexdigest()[:8].upper()}"
    return Code(value, PRIVATE_SCHEME, name.strip()[:64])


#: Colours of detection boxes in a SEG (one per box, cycling).
_BOXES = ((255, 215, 0), (0, 200, 255), (255, 80, 200), (120, 255, 80), (255, 140, 0), (160, 120, 255))


def finding_segment(value: int, name: str) -> SegmentSpec:
    """A detection class as a segment (``value`` its label): the table's codes, or a private code.

    A name the table lacks (a model's own class) is a finding of category
    Morphologically Altered Structure with :func:`private_code`.
    """
    known = segment(value, name)
    color = _BOXES[(value - 1) % len(_BOXES)]
    if known is not None:
        return SegmentSpec(value, known.name, known.category, known.type, color, known.modifier, known.site)
    return SegmentSpec(value, name.strip()[:64] or f"Finding {value}", CATEGORIES["altered"], private_code(name),
                       color)


def segments_for(names: Mapping[int, str], model: str) -> tuple[SegmentSpec, ...]:
    """Segments for label values 1.. named ``names`` (value 0, the background, is skipped).

    A name the table knows gets its codes; any other gets a private code
    (scheme :data:`PRIVATE_SCHEME`), and one warning lists them all.
    """
    segments, uncoded = [], []
    for value, name in sorted(names.items()):
        if value == 0:
            continue
        known = segment(value, name)
        if known is None:
            uncoded.append(name)
            code = Code(name.strip()[:16].upper().replace(" ", "_") or f"L{value}", PRIVATE_SCHEME, name[:64])
            known = SegmentSpec(value, name[:64] or f"Label {value}", SCT_ANATOMICAL_STRUCTURE, code,
                                _ORGANS[value % len(_ORGANS)])
        segments.append(known)
    if uncoded:
        logger.warning("Model %s: %d of %d label(s) have no known SNOMED CT code (%s%s); they get private codes "
                       "(scheme %s): list them under labels in the config to code them", model, len(uncoded),
                       len(segments), ", ".join(uncoded[:5]), ", ..." if len(uncoded) > 5 else "", PRIVATE_SCHEME)
    return tuple(segments)
