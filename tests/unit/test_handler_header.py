"""The C-STORE handler's header read: only as far as Series Instance UID, the whole data set when it must."""

from __future__ import annotations

from io import BytesIO
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom.dsutils import decode

from dicom_node.receive import handlers
from dicom_node.receive.handlers import header_elements


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "CT", "Header^Read", "HR1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.InstanceNumber, ds.ImagePositionPatient = 3, [0.0, 0.0, 4.5]
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(128)
    return ds


def _encoded(ds: Dataset, syntax: str) -> bytes:
    fp = pydicom.filebase.DicomBytesIO()
    uid = pydicom.uid.UID(syntax)
    fp.is_little_endian, fp.is_implicit_VR = uid.is_little_endian, uid.is_implicit_VR
    write_dataset(fp, ds)
    return fp.getvalue()


class _Event:
    """What the handler reads of pynetdicom's ``Event``: the context's syntax, the bytes, the whole decode."""

    def __init__(self, data: bytes, syntax: str) -> None:
        self.context = SimpleNamespace(transfer_syntax=pydicom.uid.UID(syntax))
        self._data = data
        self.full_decodes = 0
        self.copies = 0  # pynetdicom copies its buffer at each call

    def encoded_dataset(self, include_meta: bool = True) -> bytes:
        assert not include_meta
        self.copies += 1
        return self._data

    @property
    def dataset(self) -> Dataset:
        self.full_decodes += 1
        uid = self.context.transfer_syntax
        return decode(BytesIO(self._data), uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated)


KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality")


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_the_uids_and_modality_are_read_and_nothing_past_series_uid(syntax: str) -> None:
    ds = _dataset()
    event = _Event(_encoded(ds, syntax), syntax)
    header = header_elements(event)  # type: ignore[arg-type]
    assert {k: str(header.get(k)) for k in KEYWORDS} == {k: str(ds.get(k)) for k in KEYWORDS}
    assert event.full_decodes == 0
    assert max(header.keys()) == 0x0020000E  # Instance Number, the geometry, the pixels: not parsed
    assert "PixelData" not in header and "InstanceNumber" not in header
    assert event.copies == 1
    again = header_elements(event, event._data)  # type: ignore[arg-type]  # the bytes the handler journals
    assert event.copies == 1 and {k: str(again.get(k)) for k in KEYWORDS} == {k: str(ds.get(k)) for k in KEYWORDS}


def test_uids_out_of_their_place_are_found_by_the_whole_decode() -> None:
    # An encoder that wrote Series Instance UID after the pixel data: the stop finds no such UID, and the
    # whole decode (as before) reads it where it is.
    ds = _dataset()
    body = _encoded(ds, ExplicitVRLittleEndian)
    series = ds.SeriesInstanceUID
    del ds.SeriesInstanceUID
    moved = Dataset()
    moved.add_new(0x7FE10010, "LO", "after the pixels")
    tail = _encoded(moved, ExplicitVRLittleEndian)
    element = body[body.index(series.encode()) - 8:body.index(series.encode()) + len(series) + len(series) % 2]
    event = _Event(body.replace(element, b"") + tail + element, ExplicitVRLittleEndian)
    header = header_elements(event)  # type: ignore[arg-type]
    assert event.full_decodes == 1 and str(header.SeriesInstanceUID) == series


def test_a_deflated_data_set_is_decoded_whole() -> None:
    ds = _dataset()
    event = _Event(b"", DeflatedExplicitVRLittleEndian)
    calls: list[Any] = []
    event.__class__ = type("Deflated", (_Event,), {"dataset": property(lambda self: calls.append(1) or ds)})
    assert header_elements(event) is ds and calls == [1]  # type: ignore[arg-type]


@pytest.mark.parametrize("keep", [50, -40])
def test_a_data_set_cut_short_gets_the_whole_decode_and_lacks_the_uids(keep: int) -> None:
    # What pydicom can read of it, as before: the handler then refuses it (0xC001, a UID missing).
    body = _encoded(_dataset(), ExplicitVRLittleEndian)
    cut = body[:keep] if keep > 0 else body[:body.index(b"CT") + 1][:keep]
    event = _Event(cut, ExplicitVRLittleEndian)
    header = header_elements(event)  # type: ignore[arg-type]
    assert event.full_decodes == 1
    assert "StudyInstanceUID" not in header and "SeriesInstanceUID" not in header


def test_the_stop_is_after_series_uid() -> None:
    assert handlers._past_last_read(0x0020000E, "UI", 64) is False
    assert handlers._past_last_read(0x00200010, "SH", 4) is True
