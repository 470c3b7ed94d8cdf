"""The keys of a rule's ``when``: derived facts, DICOM keywords, tags and paths into sequences.

Grammar of a key (validated when the configuration is loaded)::

    key    := FACT | GROUP | path
    GROUP  := "all" | "any" | "not"
    path   := step ("." step)*
    step   := (KEYWORD | "(gggg,eeee)") ["[" INDEX "]"]

- ``FACT`` is one of :data:`DERIVED_FACTS` (``instance_count``, ``orientation``...).
- A public tag ``(0008,0060)`` is the same as its keyword ``Modality``; a private
  tag (odd group) is looked up as written (upper-case hex).
- Every step but the last must be a sequence (VR SQ); ``[n]`` picks item ``n``
  (0-based), without it every item is searched.  The last step must have a text
  or numeric value.

This module imports nothing of the node: the settings validate ``when`` keys
with :func:`parse_key`, and the matcher resolves them with :func:`resolve`.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_dict, keyword_for_tag, repeater_has_keyword, tag_for_keyword

__all__ = ["DERIVED_FACTS", "GEOMETRY_FACTS", "GROUP_KEYS", "OPERATORS", "Step", "parse_key", "resolve"]

#: Keys of a rule's ``when`` that are facts about the series, not DICOM keywords.
#: Derived facts that come from the headers of every instance (the node reads them only when a rule uses one).
GEOMETRY_FACTS: frozenset[str] = frozenset({"slice_spacing", "orientation", "image_type", "frames"})
DERIVED_FACTS: frozenset[str] = frozenset({
    "instance_count", "calling_ae", "called_ae", "source_host",  # from the association and the store
}) | GEOMETRY_FACTS

#: Keys of a rule's ``when`` that group conditions: ``all``/``any`` take a list of mappings, ``not`` one.
GROUP_KEYS: frozenset[str] = frozenset({"all", "any", "not"})

#: Operator keys of a condition mapping, in the order the matcher checks them.
OPERATORS: tuple[str, ...] = ("exists", "absent", "equals", "iequals", "in", "regex", "contains", "min", "max", "not")

# VRs whose values are bytes: never visible to rules.
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_STEP_RE = re.compile(r"(?:(?P<kw>[A-Za-z][A-Za-z0-9]*)|\((?P<group>[0-9A-Fa-f]{4}),(?P<elem>[0-9A-Fa-f]{4})\))"
                      r"(?:\[(?P<index>[0-9]{1,4})\])?")


@dataclass(frozen=True)
class Step:
    """One step of a path: the attribute's key in a summary, and an optional item index."""

    name: str
    index: int | None = None


@functools.lru_cache(maxsize=4096)
def parse_key(key: str) -> tuple[Step, ...]:
    """Parse a ``when`` key that names an attribute (not a fact or group key).

    Parameters
    ----------
    key:
        A keyword (``SliceThickness``), a tag (``(0018,0050)``), or a path
        (``SharedFunctionalGroupsSequence.PixelMeasuresSequence.SliceThickness``,
        ``ReferencedImageSequence[0].ReferencedSOPClassUID``).

    Returns
    -------
    tuple[Step, ...]
        The steps, public tags replaced by their keywords.

    Raises
    ------
    ValueError
        Unknown keyword (with the closest spelling), a binary or repeating-group
        attribute, a sequence as last step, a non-sequence in the middle of a path.
    """
    parts = key.split(".")
    steps: list[Step] = []
    for i, part in enumerate(parts):
        m = _STEP_RE.fullmatch(part.strip())
        if m is None:
            raise ValueError(
                f"{key!r}: {part!r} is neither a DICOM keyword nor a tag written (gggg,eeee); "
                f"keys of 'when' are keywords, tags, paths such as Sequence.Keyword, or derived facts "
                f"({', '.join(sorted(DERIVED_FACTS))})"
            )
        last = i == len(parts) - 1
        index = int(m["index"]) if m["index"] is not None else None
        if m["kw"] is not None:
            name, tag = m["kw"], tag_for_keyword(m["kw"])
            if tag is None:
                if repeater_has_keyword(name):
                    raise ValueError(f"{name!r} is in a repeating group (overlay/curve data), which rules do not see")
                close = difflib.get_close_matches(name, [*keyword_dict, *DERIVED_FACTS], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"unknown DICOM keyword {name!r}{hint}; keys of 'when' are DICOM keywords "
                    f"(e.g. Modality), tags (gggg,eeee), paths (Sequence.Keyword) or derived facts "
                    f"({', '.join(sorted(DERIVED_FACTS))})"
                )
        else:
            tag = int(m["group"] + m["elem"], 16)
            name = keyword_for_tag(tag) if tag >> 16 & 1 == 0 else ""
            if not name:
                if tag >> 16 & 1 == 0:
                    raise ValueError(f"{part} is not a public DICOM tag that pydicom knows; use a known tag")
                name = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"  # private: as stored in summaries
        if tag >> 16 in (0x0000, 0x0002):
            raise ValueError(f"{name!r} is a command or file meta element, which rules do not see")
        if tag >> 16 & 1 == 0:
            vr = dictionary_VR(tag)
            is_sequence = vr == "SQ"
            if not last and not is_sequence:
                raise ValueError(f"{key!r}: {name} has VR {vr}, not a sequence; only sequences can have a '.' after them")
            if last and is_sequence:
                raise ValueError(
                    f"{name!r} has VR SQ; rules can only test attributes with text or numeric values: "
                    f"name one inside it, e.g. {name}.SOMEKEYWORD"
                )
            if last and any(v in _BINARY_VRS for v in vr.split(" or ")):
                raise ValueError(f"{name!r} has VR {vr}; rules can only test attributes with text or numeric values")
        if index is not None and last:
            raise ValueError(f"{key!r}: an item index [n] may only follow a sequence")
        steps.append(Step(name, index))
    return tuple(steps)


def resolve(attributes: dict[str, Any], steps: tuple[Step, ...]) -> Any:
    """The value at ``steps`` in a summary's attributes, ``None`` when absent.

    Through a sequence without an index, the values of every item are
    collected: one value comes back as itself, several as a flat list (so a
    condition holds when ANY of them matches, or for min/max when EVERY one
    is within bounds).

    Parameters
    ----------
    attributes:
        :attr:`~dicom_node.domain.SeriesSummary.attributes` (sequences are
        lists of such mappings).
    steps:
        From :func:`parse_key`.

    Returns
    -------
    Any
        The value, a list of values, or ``None``.
    """
    current: list[Any] = [attributes]
    for i, step in enumerate(steps):
        found: list[Any] = []
        for item in current:
            if not isinstance(item, dict) or step.name not in item:
                continue
            value = item[step.name]
            if i == len(steps) - 1:
                found.append(value)
                continue
            items = [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []
            if step.index is not None:
                items = items[step.index:step.index + 1]
            found.extend(items)
        current = found
    if not current:
        return None
    if len(current) == 1:
        return current[0]
    flat: list[Any] = []
    for value in current:
        if isinstance(value, list):
            flat.extend(value)
        elif value is not None:
            flat.append(value)
    return flat
