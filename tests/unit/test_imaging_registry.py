"""``dicom_node.imaging`` on real files from the package registries (pydicom, pydicom-data).

The geometry cases a clone must test without ``../shared/testdata``: a clean
CT stack, a real slice gap, a real radial MR (one orientation per slice), a
real Enhanced CT, SEG and SR objects that are not images; and, built from the
real CT stack by editing only what the case is about, a gantry tilt, two
orientations, one position for every slice, and the stack in five transfer
syntaxes written by the registries' own encoders.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from dicom_node.errors import ImagingError
from dicom_node.imaging import load_series
from tests.realdata import dicomdir_series, read, real_ct_slices, registry_file, write

CT5N = "98892001/CT5N"  # 5 axial CT slices, 2.5 mm apart, 16x16 pixels


def _ipp(ds: Dataset) -> np.ndarray:
    return np.asarray([float(v) for v in ds.ImagePositionPatient])


def _normal(ds: Dataset) -> np.ndarray:
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    return np.cross(iop[:3], iop[3:])


def _edited_ct5n(tmp_path: Path, name: str) -> list[Dataset]:
    """The real CT5N slices as a new series (its own UIDs), ready to be edited and written."""
    datasets = read(dicomdir_series(CT5N))
    series = generate_uid(entropy_srcs=[name, "series"])
    for ds in datasets:
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[name, str(ds.SOPInstanceUID)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return datasets


def test_real_ct_stack_is_sorted_along_the_normal_in_hounsfield_units() -> None:
    series = load_series(dicomdir_series(CT5N))

    volume = series.volume
    assert volume.array.shape == (5, 16, 16)
    assert volume.spacing == pytest.approx((2.5, 0.488281, 0.488281))
    assert volume.modality == "CT"
    assert series.notes == ()
    along = [float(_ipp(ds) @ _normal(ds)) for ds in series.sources]
    assert along == sorted(along) and len(set(along)) == 5
    assert np.allclose(volume.origin, _ipp(series.sources[0]))
    for z, ds in enumerate(series.sources):
        expected = pixel_array(ds).astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(
            ds.get("RescaleIntercept", 0))
        assert np.array_equal(volume.array[z], expected)


def test_real_slice_gap_is_refused_never_averaged() -> None:
    with pytest.raises(ImagingError, match=r"gap: spacings 202\.5, 1\.25, 1\.25 mm.*a slice is missing"):
        load_series(dicomdir_series("77654033/CT2"))


def test_real_radial_mr_with_one_orientation_per_slice_is_refused() -> None:
    with pytest.raises(ImagingError, match=r"7 different orientations; split the series"):
        load_series(dicomdir_series("98892003/MR700"))


def test_a_missing_middle_slice_of_the_real_stack_is_a_gap(tmp_path: Path) -> None:
    paths = dicomdir_series(CT5N)
    datasets = read(paths)
    middle = sorted(range(5), key=lambda i: float(_ipp(datasets[i]) @ _normal(datasets[i])))[2]
    with pytest.raises(ImagingError, match=r"gap: spacings 2\.5, 5\.0, 2\.5 mm"):
        load_series([p for i, p in enumerate(paths) if i != middle])


def test_every_slice_at_one_position_is_not_a_volume(tmp_path: Path) -> None:
    datasets = _edited_ct5n(tmp_path, "samepos")
    for ds in datasets:
        ds.ImagePositionPatient = datasets[0].ImagePositionPatient
    with pytest.raises(ImagingError, match=r"5 instances share position"):
        load_series(write(datasets, tmp_path))


def test_two_orientations_in_one_series_are_refused(tmp_path: Path) -> None:
    datasets = _edited_ct5n(tmp_path, "twoorient")
    for ds in datasets[:2]:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    with pytest.raises(ImagingError, match=r"2 different orientations; split the series"):
        load_series(write(datasets, tmp_path))


def test_gantry_tilt_of_the_real_stack_is_a_sheared_grid_on_its_pixels(tmp_path: Path) -> None:
    datasets = _edited_ct5n(tmp_path, "tilt")
    tilt = 14.0
    base = min(float(_ipp(ds) @ _normal(ds)) for ds in datasets)
    for ds in datasets:
        offset = float(_ipp(ds) @ _normal(ds)) - base
        position = _ipp(ds) + np.asarray([0.0, offset * np.tan(np.radians(tilt)), 0.0])
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
        ds.GantryDetectorTilt = tilt
    series = load_series(write(datasets, tmp_path))

    notes = [n for n in series.notes if "tilt" in n]
    assert len(notes) == 1
    angle = float(re.search(r"tilt (\d+(?:\.\d+)?) deg", notes[0]).group(1))  # type: ignore[union-attr]
    assert angle == pytest.approx(tilt, abs=0.1)
    direction = np.asarray(series.volume.direction)
    for z, ds in enumerate(series.sources):
        corner = np.asarray(series.volume.origin) + z * series.volume.spacing[0] * direction[0]
        assert np.allclose(corner, _ipp(ds), atol=1e-3)
    assert float(direction[0] @ _normal(series.sources[0])) == pytest.approx(np.cos(np.radians(tilt)), abs=1e-3)


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, RLELossless, JPEGLSLossless],
                         ids=lambda s: s.name)
def test_the_real_stack_in_every_lossless_syntax_decodes_to_the_same_volume(tmp_path: Path, syntax: str) -> None:
    reference = load_series(dicomdir_series(CT5N)).volume
    datasets = read(dicomdir_series(CT5N))
    for ds in datasets:
        if syntax == ImplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            ds.compress(syntax)  # the registry's own encoder (pydicom RLE, pyjpegls, openjpeg)
    paths = write(datasets, tmp_path)
    assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in paths} == {syntax}

    volume = load_series(paths).volume

    assert np.array_equal(volume.array, reference.array)
    assert volume.spacing == pytest.approx(reference.spacing)
    assert np.allclose(volume.origin, reference.origin)
    assert ExplicitVRLittleEndian != syntax


@pytest.mark.parametrize("name", ["693", "MR2"])
def test_real_jpeg2000_files_decode_to_the_pixels_of_their_uncompressed_twins(name: str) -> None:
    # pydicom-data holds each of these images uncompressed and as reversible JPEG 2000 (GDCM-encoded).
    j2k = load_series([registry_file(f"{name}_J2KR.dcm")]).volume
    raw = load_series([registry_file(f"{name}_UNCR.dcm")]).volume
    assert j2k.array.shape == raw.array.shape and j2k.array.shape[0] == 1
    assert np.array_equal(j2k.array, raw.array)


def test_a_real_512_ct_stack_compressed_to_jpeg2000_decodes_to_the_same_volume(tmp_path: Path) -> None:
    reference_paths = write(real_ct_slices(3), tmp_path / "raw")
    reference = load_series(reference_paths).volume
    datasets = read(reference_paths)
    for ds in datasets:
        ds.compress(JPEG2000Lossless)  # openjpeg (pylibjpeg-openjpeg)
    volume = load_series(write(datasets, tmp_path / "j2k")).volume
    assert volume.array.shape == (3, 512, 512)
    assert np.array_equal(volume.array, reference.array)


def test_real_enhanced_ct_frames_are_the_slices() -> None:
    path = registry_file("eCT_Supplemental.dcm")
    series = load_series([path])
    assert series.volume.array.shape == (2, 512, 512)
    assert series.volume.spacing == pytest.approx((10.0, 0.388672, 0.388672), abs=1e-5)
    assert sorted(frame for _, frame in series.frame_of_source) == [1, 2]


def test_enhanced_ct_frames_are_sorted_by_position_not_by_frame_number(tmp_path: Path) -> None:
    path = registry_file("eCT_Supplemental.dcm")
    reference = load_series([path])
    ds = pydicom.dcmread(path)
    frames = pixel_array(ds)
    items = list(ds.PerFrameFunctionalGroupsSequence)
    ds.PerFrameFunctionalGroupsSequence = [items[1], items[0]]
    ds.PixelData = np.ascontiguousarray(frames[[1, 0]]).astype(frames.dtype.newbyteorder("<")).tobytes()
    shuffled = load_series(write([ds], tmp_path))
    assert np.array_equal(shuffled.volume.array, reference.volume.array)
    assert np.allclose(shuffled.volume.origin, reference.volume.origin)


def test_enhanced_ct_without_functional_groups_is_refused(tmp_path: Path) -> None:
    ds = pydicom.dcmread(registry_file("eCT_Supplemental.dcm"))
    del ds.PerFrameFunctionalGroupsSequence
    with pytest.raises(ImagingError, match=r"without Per-frame Functional Groups"):
        load_series(write([ds], tmp_path))


def test_a_real_multiframe_mr_without_positions_is_refused() -> None:
    with pytest.raises(ImagingError, match=r"without Per-frame Functional Groups"):
        load_series([registry_file("emri_small.dcm")])


def test_a_real_segmentation_is_not_an_image() -> None:
    with pytest.raises(ImagingError, match=r"Segmentation Storage"):
        load_series([registry_file("liver.dcm")])


def test_a_real_structured_report_is_not_an_image() -> None:
    with pytest.raises(ImagingError, match=r"not an image"):
        load_series([registry_file("test-SR.dcm")])


def test_a_segmentation_among_the_images_is_never_processed() -> None:
    with pytest.raises(ImagingError, match=r"never processed|different series"):
        load_series([*dicomdir_series(CT5N), registry_file("liver.dcm")])
