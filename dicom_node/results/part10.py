"""A result object's Part 10 file, the bytes pydicom writes, written in a fraction of its time.

A job's SEG is a data set of a few thousand small elements: a per-frame
functional groups item of seven nested data sets for each of its frames.
pydicom writes each element through a general writer (a buffer, an
encoding lookup, the ambiguous-VR pass over every nested data set, a seek
back per item): 0.23-0.25 s for a 200-slice CT's two-segment SEG (320
frames, 7,000 elements, 3,000 data sets), on the path from the model's end
to the result in the PACS, beside 0.25 s for highdicom to build it.

:func:`part10_bytes` returns exactly the bytes of
``dataset.save_as(buffer, enforce_file_format=True)`` for an Explicit VR
Little Endian data set.  The File Meta Information, the preamble and the
checks are pydicom's own (:func:`pydicom.filewriter.write_file_meta_info`,
``validate_file_meta``); the data set is walked once, each element encoded
with ``struct`` where its value is one of the common plain forms, and handed
to pydicom's own element writer (:func:`pydicom.filewriter.write_data_element`)
otherwise: dates and times, person names, tags, non-ASCII text, buffered or
encapsulated values, a value too long for its VR's length field.  A nested
data set that was read from an Explicit VR Little Endian file is written by
pydicom's :func:`~pydicom.filewriter.write_dataset` (its raw elements are
copied as read); ambiguous VRs are resolved by pydicom's
``correct_ambiguous_vr_element`` with the ancestors pydicom's own pass
would give it.  Any other transfer syntax, and anything the walk does not
expect, is written by ``save_as``.  ``tests/unit/test_part10.py`` compares
the bytes with ``save_as``'s for every kind of result object and for the
data sets of pydicom's test files.
"""

from __future__ import annotations

import struct
from copy import deepcopy
from io import BytesIO
from operator import itemgetter
from typing import Any, cast

import numpy as np
from pydicom import Dataset
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import (
    correct_ambiguous_vr,
    correct_ambiguous_vr_element,
    write_data_element,
    write_dataset,
    write_file_meta_info,
)
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import AMBIGUOUS_VR, EXPLICIT_VR_LENGTH_32

_SHORT = struct.Struct("<HH2sH")  # tag, VR, 16-bit length
_LONG = struct.Struct("<HH2sHI")  # tag, VR, reserved, 32-bit length
_ITEM = struct.Struct("<HHI")  # (FFFE,E000) and its length
_UNDEFINED = 0xFFFFFFFF
_ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_EXPLICIT_LE = (False, True)

#: pydicom's writer per VR: a plain string (padded with a space; UI with NUL), a string in the data set's
#: character set, a number string, binary numbers, bytes.
_STRINGS = {"AE": b" ", "AS": b" ", "CS": b" ", "UR": b" ", "UI": b"\x00"}
_TEXTS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
_NUMBER_STRINGS = frozenset({"DS", "IS"})
_NUMBERS = {"FD": "d", "FL": "f", "SL": "l", "SS": "h", "SV": "q", "UL": "L", "US": "H", "UV": "Q"}
_BYTES = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
#: Python codecs under which ASCII text is its own encoding (a single character set, no ISO 2022 switching).
_ASCII_CODECS = frozenset(convert_encodings(None) + convert_encodings("ISO_IR 100") + convert_encodings("ISO_IR 192"))
#: LUT Descriptor elements: pydicom writes their first value as US whatever their VR.
_LUT_DESCRIPTORS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})


def part10_bytes(dataset: Dataset) -> bytes:
    """``dataset`` as a DICOM Part 10 file: the bytes of ``dataset.save_as(buf, enforce_file_format=True)``.

    Raises what ``save_as`` raises for a data set it cannot write.
    """
    meta = getattr(dataset, "file_meta", None)
    if (meta is None or meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian
            or dataset.original_encoding[1] is False  # save_as refuses to turn big endian into little
            or any(tag >> 16 in (0, 2) for tag in dataset.keys())):
        return _saved(dataset)
    preamble = getattr(dataset, "preamble", None)
    if preamble and len(preamble) != 128:
        return _saved(dataset)
    file_meta = deepcopy(meta)  # as save_as: the data set's own File Meta Information is left as it was
    ds_class = dataset.get("SOPClassUID", None)
    if file_meta.get("MediaStorageSOPClassUID", None) is None or (ds_class and ds_class != file_meta.get(
            "MediaStorageSOPClassUID")):
        file_meta.MediaStorageSOPClassUID = ds_class
    ds_instance = dataset.get("SOPInstanceUID", None)
    if file_meta.get("MediaStorageSOPInstanceUID", None) is None or (ds_instance and ds_instance != file_meta.get(
            "MediaStorageSOPInstanceUID")):
        file_meta.MediaStorageSOPInstanceUID = ds_instance
    validate_file_meta(file_meta, enforce_standard=True)
    if "PixelData" in dataset:
        dataset["PixelData"].is_undefined_length = False  # native pixel data: a defined length, as save_as sets
    head = DicomBytesIO()
    head.is_implicit_VR, head.is_little_endian = _EXPLICIT_LE
    head.write((preamble or b"\x00" * 128) + b"DICM")
    write_file_meta_info(head, file_meta, enforce_standard=True)
    chunks = [head.getvalue()]
    _dataset(dataset, None, default_encoding, chunks)
    return b"".join(chunks)  # the one copy of the pixel data


def _saved(dataset: Dataset) -> bytes:
    buf = BytesIO()
    dataset.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _pydicom_bytes(write: Any, *args: Any) -> bytes:
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = _EXPLICIT_LE
    write(buf, *args)
    return buf.getvalue()


def _dataset(ds: Dataset, chain: list[Dataset] | None, parent_encoding: Any, out: list[bytes]) -> None:
    """Append ``ds``'s encoding to ``out``, as pydicom's ``write_dataset(fp, ds, parent_encoding)``.

    ``chain``: the data sets above ``ds`` (nearest first) when pydicom's
    ambiguous-VR pass reaches ``ds`` from above; ``None`` when a pass starts
    at ``ds`` (the root, or an item of a sequence the pass above could not
    see into).
    """
    if ds.original_encoding == _EXPLICIT_LE:
        # Read from an Explicit VR Little Endian file: pydicom writes its raw elements as read.  The pass above
        # (if any) has corrected its ambiguous elements first, as pydicom's does on the whole tree.
        if chain is not None:
            correct_ambiguous_vr(ds, True, [ds, *chain])
        out.append(_pydicom_bytes(write_dataset, ds, parent_encoding))
        return
    ancestors = [ds] if chain is None else [ds, *chain]
    encoding = ds.get("SpecificCharacterSet", parent_encoding)
    encodings = convert_encodings(encoding or [default_encoding])
    plain_text = len(encodings) == 1 and encodings[0] in _ASCII_CODECS
    for tag, elem in sorted(ds.items(), key=itemgetter(0)):
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue  # group lengths are not written (PS3.5 7.2)
        seen_vr = elem.VR  # what pydicom's pass sees before converting a raw element
        if isinstance(elem, RawDataElement):
            elem = ds[tag]
        if seen_vr in AMBIGUOUS_VR:
            elem = correct_ambiguous_vr_element(elem, ds, True, ancestors)
        element = cast(DataElement, elem)  # converted
        vr = element.VR
        if vr == "SQ":
            _sequence(tag, element, ancestors if seen_vr == "SQ" else None, encodings, out)
            continue
        value = _value(tag, vr, element, plain_text) if vr is not None and len(vr) == 2 else None
        if value is None:  # pydicom's own element writer (and its error for a VR still ambiguous)
            out.append(_pydicom_bytes(write_data_element, element, encoding))
        elif vr in EXPLICIT_VR_LENGTH_32:
            out.append(_LONG.pack(tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)))
            out.append(value)
        else:
            out.append(_SHORT.pack(tag >> 16, tag & 0xFFFF, vr.encode(), len(value)))
            out.append(value)


def _sequence(tag: int, elem: DataElement, chain: list[Dataset] | None, encodings: list[str],
              out: list[bytes]) -> None:
    at = len(out)
    out.append(b"")  # the header, once the length is known
    size = 0
    for item in elem.value:
        head = len(out)
        out.append(b"")
        _dataset(item, chain, encodings, out)
        length = sum(len(chunk) for chunk in out[head + 1:])
        if getattr(item, "is_undefined_length_sequence_item", False):
            out[head] = _ITEM.pack(0xFFFE, 0xE000, _UNDEFINED)
            out.append(_ITEM_END)
            length += len(_ITEM_END)
        else:
            out[head] = _ITEM.pack(0xFFFE, 0xE000, length)
        size += _ITEM.size + length
    undefined = elem.is_undefined_length
    out[at] = _LONG.pack(tag >> 16, tag & 0xFFFF, b"SQ", 0, _UNDEFINED if undefined else size)
    if undefined:
        out.append(_SEQUENCE_END)


def _value(tag: int, vr: str, elem: DataElement, plain_text: bool) -> bytes | None:
    """The element's encoded value as pydicom writes it, or ``None`` to let pydicom's writer do the element."""
    if elem.is_buffered or elem.is_undefined_length:
        return None
    value = elem.value
    if elem.is_empty:
        return b""
    if isinstance(value, np.ndarray):
        return None
    encoded: bytes
    if vr in _STRINGS:
        text = _joined(value)
        if text is None:
            return None
        try:
            encoded = text.encode(default_encoding)
        except UnicodeEncodeError:
            return None
        if len(text) % 2:
            encoded += _STRINGS[vr]
    elif vr in _TEXTS:
        text = _joined(value)
        if not plain_text or text is None or not text.isascii():
            return None
        encoded = text.encode("ascii")
        if len(encoded) % 2:
            encoded += b" "
    elif vr in _NUMBER_STRINGS:
        if _multi(value):
            text = "\\".join(x.original_string if hasattr(x, "original_string") else str(x) for x in value)
        else:
            text = value.original_string if hasattr(value, "original_string") else str(value)
        if len(text) % 2:
            text += " "
        encoded = text.encode(default_encoding)
    elif vr in _NUMBERS:
        code = _NUMBERS[vr]
        try:
            if isinstance(value, list | MultiValue):
                if code == "h" and tag in _LUT_DESCRIPTORS:
                    return None
                encoded = struct.pack(f"<{len(value)}{code}", *value)
            elif type(value) in (int, float):
                encoded = struct.pack("<" + code, value)
            else:
                return None
        except (struct.error, TypeError):
            return None
    elif vr in _BYTES:
        if not isinstance(value, bytes):
            return None
        encoded = value + b"\x00" if len(value) % 2 else value
    elif vr == "UN":
        if not isinstance(value, bytes):
            return None
        encoded = value
    else:  # AT, DA, DT, TM, PN
        return None
    if len(encoded) > 0xFFFF and vr not in EXPLICIT_VR_LENGTH_32:
        return None  # pydicom writes it as UN, with a warning
    return encoded


def _multi(value: object) -> bool:
    return isinstance(value, MultiValue | list | tuple)


def _joined(value: object) -> str | None:
    """A string value, its values joined with backslashes if several; ``None`` for anything else."""
    if isinstance(value, str):
        return value
    if _multi(value) and all(isinstance(v, str) for v in value):  # type: ignore[attr-defined]
        return "\\".join(value)  # type: ignore[arg-type]
    return None


__all__ = ["part10_bytes"]
