"""``part10_bytes``: the bytes of pydicom's ``save_as``, for every result object and for real files."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from copy import deepcopy

import numpy as np
import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from dicom_node.results import part10
from dicom_node.results.part10 import part10_bytes
from dicom_node.results.pdf import build_pdf
from dicom_node.results.sc import iter_overlays
from dicom_node.results.seg import build_seg
from dicom_node.results.sr import build_sr
from tests.realdata import real_ct_slices
from tests.unit.test_results import _ct_prediction, _identity, _slice_position


def _saved(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _same_as_save_as(make: Callable[[], Dataset]) -> bytes:
    """Both writers on two equal data sets (writing may convert raw elements in place); returns the bytes."""
    expected = _saved(make())
    got = part10_bytes(make())
    assert got == expected, _first_difference(expected, got)
    return got


def _first_difference(a: bytes, b: bytes) -> str:
    at = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
    return f"{len(a)} vs {len(b)} bytes, first difference at {at}: {a[at - 24:at + 24]!r} vs {b[at - 24:at + 24]!r}"


@pytest.fixture(scope="module")
def ct_slices() -> list[Dataset]:
    return sorted(real_ct_slices(3), key=_slice_position)


@pytest.fixture
def no_save_as(monkeypatch: pytest.MonkeyPatch) -> None:
    """The result objects take the node's own path: ``save_as`` is not called for them."""
    def refuse(ds: Dataset) -> bytes:
        raise AssertionError("part10_bytes fell back to save_as")
    monkeypatch.setattr(part10, "_saved", refuse)


# ------------------------------------------------------------------------------------------ result objects

@pytest.mark.parametrize("segmentation_type", ["BINARY", "LABELMAP"])
def test_every_seg_is_written_as_save_as_writes_it(ct_slices: list[Dataset], segmentation_type: str) -> None:
    seg = build_seg(_ct_prediction(), ct_slices, _identity(ct_slices, "seg", number=900),
                    segmentation_type=segmentation_type).dataset
    expected = _saved(deepcopy(seg))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(part10, "_saved", lambda ds: pytest.fail("fell back to save_as"))
        got = part10_bytes(seg)
    assert got == expected, _first_difference(expected, got)
    assert pydicom.dcmread(io.BytesIO(got)).NumberOfFrames == seg.NumberOfFrames


def test_a_clearing_seg_sr_forms_overlays_and_pdf_are_written_as_save_as_writes_them(
        ct_slices: list[Dataset], no_save_as: None) -> None:
    prediction = _ct_prediction()
    seg = build_seg(prediction, ct_slices, _identity(ct_slices, "seg", number=900))
    objects = [build_seg(prediction, ct_slices, _identity(ct_slices, "seg", number=900), clearing=True).dataset]
    for form in ("viewer", "measurements"):
        objects.append(build_sr(prediction, ct_slices, _identity(ct_slices, "sr", number=901), seg=seg.dataset,
                                segment_numbers=seg.segment_numbers, form=form))
    objects.append(build_sr(prediction, ct_slices, _identity(ct_slices, "sr", number=901), seg=None,
                            segment_numbers=None))
    objects.extend(iter_overlays(prediction, ct_slices, _identity(ct_slices, "sc", number=903)))
    objects.append(build_pdf(prediction, ct_slices, _identity(ct_slices, "pdf", number=904)))
    assert len(objects) >= 8
    for ds in objects:
        expected = _saved(deepcopy(ds))
        got = part10_bytes(ds)
        assert got == expected, f"{ds.Modality}: {_first_difference(expected, got)}"


# ------------------------------------------------------------------------------------------ real files

def _real_files() -> list[str]:
    return sorted(set(get_testdata_files("*") + get_charset_files("*")))


def _loaders() -> list[tuple[str, Callable[[], Dataset]]]:
    """Every uncompressed little endian file of pydicom's test data, as read and read again from an Implicit VR
    copy (so that no nested data set is written as read: every element goes through the walk)."""
    out: list[tuple[str, Callable[[], Dataset]]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in _real_files():
            try:
                ds = pydicom.dcmread(path, force=True)
                syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
                if syntax is None or syntax.is_compressed or not syntax.is_little_endian:
                    continue
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
                implicit = _saved(ds)
            except Exception:
                continue  # files pydicom cannot read or write whole (deliberately broken test files)

            def as_read(path: str = path) -> Dataset:
                ds = pydicom.dcmread(path, force=True)
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                return ds

            def via_implicit(data: bytes = implicit) -> Dataset:
                ds = pydicom.dcmread(io.BytesIO(data))
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                return ds
            out += [(path, as_read), (path, via_implicit)]
    return out


def test_pydicoms_test_files_are_written_as_save_as_writes_them() -> None:
    loaders = _loaders()
    assert len(loaders) >= 120, "pydicom's test files (pydicom, pydicom-data) are not all there"
    walked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path, load in loaders:
            try:
                expected = _saved(load())
            except Exception as exc:
                with pytest.raises(type(exc)):
                    part10_bytes(load())
                continue
            got = part10_bytes(load())
            assert got == expected, f"{path}: {_first_difference(expected, got)}"
            walked += 1
    assert walked >= 120


def test_big_endian_and_other_syntaxes_are_left_to_save_as() -> None:
    big = get_testdata_files("MR_small_bigendian.dcm")[0]
    ds = pydicom.dcmread(big)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with pytest.raises(ValueError, match="between little and big endian"):
        part10_bytes(ds)
    _same_as_save_as(lambda: pydicom.dcmread(get_testdata_files("MR_small.dcm")[0]))  # Implicit VR: save_as
    _same_as_save_as(lambda: pydicom.dcmread(get_testdata_files("JPEG2000.dcm")[0]))  # encapsulated


# ------------------------------------------------------------------------------------------ made-up elements

def _odd_dataset() -> Dataset:
    """One of each form the walk encodes itself, and of those it hands to pydicom's element writer."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4.5"  # odd length: NUL padded
    ds.add_new(0x00080000, "UL", 1234)  # a group length: not written
    item = Dataset()
    item.RealWorldValueFirstValueMapped = -1024  # 'US or SS' in an item that does not know Pixel Representation
    item.RealWorldValueLastValueMapped = 3071  # (set on the root after this sequence): the root's decides
    item.RealWorldValueSlope = 1.0
    item.RealWorldValueIntercept = -1024.0
    item.LUTExplanation = "HU"
    item.add_new(0x00400000, "UL", 8)
    ds.RealWorldValueMappingSequence = [item]
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jürgen"  # PN: pydicom's writer, in UTF-8
    ds.StudyDescription = "Thorax"  # even
    ds.SeriesDescription = "Lungenemphysem ä"  # non-ASCII text: pydicom's writer
    ds.ImageType = ["DERIVED", "SECONDARY", "AI"]  # multi-valued CS
    ds.StudyDate = "20261207"
    ds.StudyTime = "101010.5"
    ds.PixelSpacing = [0.5, 0.703125]
    ds.SliceThickness = 1.25
    ds.InstanceNumber = 7
    ds.ReferencedFrameNumber = [1, 2, 3]
    ds.Rows, ds.Columns = 2, 3
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.SmallestImagePixelValue = -5  # 'US or SS': resolved from Pixel Representation
    ds.LargestImagePixelValue = 2000
    lut = Dataset()
    lut.LUTDescriptor = [4, -2048, 12]  # the first value written as US whatever the VR
    lut.LUTData = np.arange(4, dtype=np.uint16).tobytes()  # 'US or OW': OW for a LUT of several entries
    single = Dataset()
    single.LUTDescriptor = [1, 0, 16]
    single.LUTData = 5  # US for a LUT of one entry
    ds.VOILUTSequence = [lut, single]
    ds.FrameIncrementPointer = 0x00181063  # AT
    ds.add_new(0x00091010, "LO", "private text")
    ds.add_new(0x00091011, "UN", b"\x01\x02\x03")  # odd UN: no padding
    ds.add_new(0x00091012, "OB", b"\x01\x02\x03")  # odd OB: NUL padded
    ds.add_new(0x00091013, "FD", [1.5, -2.25])
    ds.add_new(0x00091014, "FL", 0.1)
    ds.add_new(0x00091015, "SL", -7)
    ds.add_new(0x00091016, "UL", [1, 2])
    ds.add_new(0x00091017, "UT", "x" * 70001)  # long-length VR
    ds.add_new(0x00091018, "LO", "y" * 70001)  # too long for a 16-bit length: pydicom makes it UN
    ds.add_new(0x00091019, "SQ", DicomSequence([]))  # empty sequence
    ds.add_new(0x0009101A, "US", None)  # empty value
    ds.add_new(0x0009101B, "DS", ["1.50", "2"])  # the strings as given
    undefined = DicomSequence([Dataset(), Dataset()])
    undefined[0].CodeValue = "123"
    undefined[0].is_undefined_length_sequence_item = True
    undefined[1].CodeMeaning = "odd"
    ds.add_new(0x0040A168, "SQ", undefined)
    ds[0x0040A168].is_undefined_length = True
    nested = Dataset()
    nested.SpecificCharacterSet = "ISO_IR 100"
    nested.InstitutionName = "Hôpital"  # Latin-1 in the item's own character set
    ds.ReferencedStudySequence = [nested]
    ds.add_new(0x00091020, "OW", np.arange(6, dtype=np.uint16).tobytes())
    ds.PixelData = np.arange(6, dtype=np.int16).tobytes()
    ds.add_new(0x00091021, "UI", generate_uid(prefix="1.2.826.0.1.3680043.10.511.", entropy_srcs=["part10"]))
    return ds


def test_made_up_elements_of_every_form_are_written_as_save_as_writes_them() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = _same_as_save_as(_odd_dataset)
    read = pydicom.dcmread(io.BytesIO(data))
    assert read.SmallestImagePixelValue == -5
    assert read.RealWorldValueMappingSequence[0].RealWorldValueFirstValueMapped == -1024
    assert str(read.ReferencedStudySequence[0].InstitutionName) == "Hôpital"


def test_items_read_from_files_are_copied_as_read_inside_a_new_data_set() -> None:
    source = pydicom.dcmread(get_testdata_files("rtplan.dcm")[0])  # nested sequences, read as raw elements

    def make() -> Dataset:
        explicit = pydicom.dcmread(io.BytesIO(_explicit_copy(source)))
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = explicit.SOPClassUID, "1.2.3.4"
        ds.BeamSequence = explicit.BeamSequence  # items read from an Explicit VR file
        ds.FractionGroupSequence = pydicom.dcmread(get_testdata_files("rtplan.dcm")[0]).FractionGroupSequence
        return ds
    _same_as_save_as(make)


def _explicit_copy(ds: Dataset) -> bytes:
    copy = deepcopy(ds)
    copy.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return _saved(copy)
