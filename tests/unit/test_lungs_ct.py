"""Tests of the built-in ``lungs-ct`` model and of the chest phantom utilities.

The phantom's truth comes from its own lung masks; the model must find each
lung's volume within 3 %, %LAA-950 within 1 percentage point, and put the
right lung (patient right, smaller LPS x) under label 1 whatever the image
orientation.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes

from inference.models.builtin import (
    LAA950_PERCENT,
    LEFT_LUNG,
    NO_LUNGS_FOUND,
    RIGHT_LUNG,
    LungsCT,
    load_builtin,
)
from inference.types import (
    SCT_MEAN,
    SCT_VOLUME,
    UCUM_HU,
    UCUM_ML,
    UCUM_PERCENT,
    Measurement,
    Prediction,
    Volume,
)
from tests.phantoms import make_chest_phantom, write_ct_series
from tests.realdata import real_ct_slices, shared, write
from tests.tools import require_tool

SPACING = (2.5, 2.0, 2.0)
# Rows: LPS unit vectors of the array axes z, y, x for ImageOrientationPatient [1,0,0,0,1,0].
AXIAL = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def _origin(shape: tuple[int, ...], spacing: tuple[float, float, float]) -> tuple[float, float, float]:
    """Patient position of voxel [0, 0, 0] in the phantom's convention (see tests.phantoms)."""
    return (-(shape[2] - 1) / 2.0 * spacing[2], -(shape[1] - 1) / 2.0 * spacing[1], 0.0)


def _values(prediction: Prediction, label: int) -> dict[str, float]:
    """Volume, mean and %LAA-950 of one label, checking the concepts and units on the way."""
    ms: tuple[Measurement, ...] = prediction.measurements[label]
    by_concept = {(m.concept, m.unit): m.value for m in ms}
    assert set(by_concept) == {(SCT_VOLUME, UCUM_ML), (SCT_MEAN, UCUM_HU), (LAA950_PERCENT, UCUM_PERCENT)}
    return {
        "ml": by_concept[(SCT_VOLUME, UCUM_ML)],
        "mean": by_concept[(SCT_MEAN, UCUM_HU)],
        "laa": by_concept[(LAA950_PERCENT, UCUM_PERCENT)],
    }


def _assert_matches_truth(prediction: Prediction, truth: dict[str, float], volume_factor: float = 1.0) -> None:
    right = _values(prediction, RIGHT_LUNG)
    left = _values(prediction, LEFT_LUNG)
    for side, got in (("right", right), ("left", left)):
        expected = truth[f"{side}_ml"] * volume_factor
        assert got["ml"] == pytest.approx(expected, rel=0.03), f"{side} lung volume"
        assert got["laa"] == pytest.approx(truth[f"{side}_laa950_pct"], abs=1.0), f"{side} lung %LAA-950"
        assert got["mean"] == pytest.approx(truth[f"{side}_mean_hu"], abs=10.0), f"{side} lung mean HU"
    assert prediction.findings == ()


def _read_series(folder: Path) -> Volume:
    """Read a CT series with SimpleITK into a Volume (HU, z/y/x, LPS geometry)."""
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder))
    assert files, f"no DICOM series in {folder}"
    reader.SetFileNames(files)
    image = reader.Execute()
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    # SimpleITK's direction columns are the x, y, z index axes; ours are rows in z, y, x order.
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3).T[::-1]
    return Volume(array, tuple(image.GetSpacing()[::-1]), tuple(image.GetOrigin()), direction, "CT")


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, dict[str, float]]:
    return make_chest_phantom()


@pytest.fixture(scope="module")
def phantom_prediction(phantom: tuple[np.ndarray, dict[str, float]]) -> Prediction:
    hu, _ = phantom
    volume = Volume(hu.astype(np.float32), SPACING, _origin(hu.shape, SPACING), AXIAL, "CT")
    return LungsCT().predict(volume)


# -- model card ----------------------------------------------------------------------------


def test_card_identifies_model_and_segments() -> None:
    card = LungsCT().card
    assert (card.name, card.version, card.modality) == ("lungs-ct", "1.0.0", "CT")
    assert card.family == codes.cid7162.MorphologicalOperations.meaning
    by_label = {s.label: s for s in card.segments}
    assert by_label[RIGHT_LUNG].type.value == "3341006"
    assert by_label[LEFT_LUNG].type.value == "44029006"
    assert by_label[RIGHT_LUNG].category.value == "123037004"
    assert by_label[RIGHT_LUNG].color != by_label[LEFT_LUNG].color


def test_load_builtin_by_name() -> None:
    assert isinstance(load_builtin("lungs-ct"), LungsCT)
    with pytest.raises(ValueError, match="lungs-ct"):
        load_builtin("no-such-model")


# -- the phantom ---------------------------------------------------------------------------


def test_phantom_truth_and_layout(phantom: tuple[np.ndarray, dict[str, float]]) -> None:
    hu, truth = phantom
    assert hu.dtype == np.int16 and hu.shape == (60, 128, 128)
    assert hu[0, 0, 0] < -900  # air outside the body
    # Right lung (patient right) is the larger one and lies at small column index.
    assert truth["right_ml"] > truth["left_ml"] * 1.05
    z = hu.shape[0] // 2
    row = hu[z, hu.shape[1] // 2]
    assert row[: hu.shape[2] // 2].min() < -700 and row[hu.shape[2] // 2 :].min() < -700
    assert truth["left_laa950_pct"] > 1.5 and truth["right_laa950_pct"] < 0.1
    again, truth_again = make_chest_phantom()
    assert np.array_equal(hu, again) and truth == truth_again


# -- segmentation and measurements ---------------------------------------------------------


def test_phantom_volumes_laa_and_sides(
    phantom: tuple[np.ndarray, dict[str, float]], phantom_prediction: Prediction
) -> None:
    hu, truth = phantom
    labelmap = phantom_prediction.labelmap
    assert labelmap is not None
    assert labelmap.shape == hu.shape and labelmap.dtype == np.uint8
    assert set(np.unique(labelmap).tolist()) == {0, RIGHT_LUNG, LEFT_LUNG}
    _assert_matches_truth(phantom_prediction, truth)
    # Label 1 sits at small column indices: patient right with IOP [1,0,0,0,1,0].
    right_cols = np.nonzero(labelmap == RIGHT_LUNG)[2].mean()
    left_cols = np.nonzero(labelmap == LEFT_LUNG)[2].mean()
    assert right_cols < hu.shape[2] / 2 < left_cols
    # The trachea (top slice, midline) is not lung.
    assert not labelmap[-1].any()


def test_sides_follow_patient_coordinates_not_image_orientation(
    phantom: tuple[np.ndarray, dict[str, float]], phantom_prediction: Prediction
) -> None:
    hu, truth = phantom
    flipped = np.ascontiguousarray(hu[:, :, ::-1]).astype(np.float32)
    direction = AXIAL.copy()
    direction[2] = (-1.0, 0.0, 0.0)  # columns now run to patient right
    origin = _origin(hu.shape, SPACING)
    volume = Volume(flipped, SPACING, (-origin[0], origin[1], origin[2]), direction, "CT")
    prediction = LungsCT().predict(volume)
    _assert_matches_truth(prediction, truth)
    assert prediction.labelmap is not None and phantom_prediction.labelmap is not None
    assert np.array_equal(prediction.labelmap[:, :, ::-1], phantom_prediction.labelmap)

    # Same pixels flipped but geometry left unchanged: the patient's sides swap.
    mirrored = LungsCT().predict(Volume(flipped, SPACING, origin, AXIAL, "CT"))
    assert _values(mirrored, RIGHT_LUNG)["ml"] == pytest.approx(truth["left_ml"], rel=0.03)
    assert _values(mirrored, LEFT_LUNG)["ml"] == pytest.approx(truth["right_ml"], rel=0.03)


def test_axis_order_is_taken_from_direction(
    phantom: tuple[np.ndarray, dict[str, float]], phantom_prediction: Prediction
) -> None:
    hu, truth = phantom
    # Same anatomy stored with the array axes reversed (x, y, z order).
    array = np.ascontiguousarray(hu.transpose(2, 1, 0)).astype(np.float32)
    volume = Volume(array, SPACING[::-1], _origin(hu.shape, SPACING), AXIAL[::-1].copy(), "CT")
    prediction = LungsCT().predict(volume)
    _assert_matches_truth(prediction, truth)
    assert prediction.labelmap is not None and phantom_prediction.labelmap is not None
    assert np.array_equal(prediction.labelmap.transpose(2, 1, 0), phantom_prediction.labelmap)


def test_lungs_joined_by_a_bridge_are_separated() -> None:
    hu, truth = make_chest_phantom(lung_bridge=True)
    volume = Volume(hu.astype(np.float32), SPACING, _origin(hu.shape, SPACING), AXIAL, "CT")
    prediction = LungsCT().predict(volume)
    _assert_matches_truth(prediction, truth)


def test_sheared_grid_uses_true_voxel_volume(phantom: tuple[np.ndarray, dict[str, float]]) -> None:
    hu, truth = phantom
    tilt = math.radians(20.0)
    direction = AXIAL.copy()
    direction[0] = (0.0, math.sin(tilt), math.cos(tilt))  # slices stacked along a tilted axis
    volume = Volume(hu.astype(np.float32), SPACING, _origin(hu.shape, SPACING), direction, "CT")
    prediction = LungsCT().predict(volume)
    _assert_matches_truth(prediction, truth, volume_factor=math.cos(tilt))


def test_single_lung_is_reported_on_its_side(
    phantom: tuple[np.ndarray, dict[str, float]], phantom_prediction: Prediction
) -> None:
    hu, truth = phantom
    assert phantom_prediction.labelmap is not None
    without_left = hu.astype(np.float32)
    without_left[phantom_prediction.labelmap == LEFT_LUNG] = 40.0  # left lung collapsed / resected
    volume = Volume(without_left, SPACING, _origin(hu.shape, SPACING), AXIAL, "CT")
    prediction = LungsCT().predict(volume)
    assert set(prediction.measurements) == {RIGHT_LUNG}
    assert _values(prediction, RIGHT_LUNG)["ml"] == pytest.approx(truth["right_ml"], rel=0.03)
    assert prediction.findings == ("left lung not found",)


# -- no lungs, wrong input -----------------------------------------------------------------


def _assert_no_lungs(prediction: Prediction, shape: tuple[int, ...]) -> None:
    assert prediction.findings == (NO_LUNGS_FOUND,)
    assert prediction.labelmap is not None and prediction.labelmap.shape == shape
    assert not prediction.labelmap.any()
    assert prediction.measurements == {}
    assert prediction.present_segments() == ()


def test_water_cylinder_has_no_lungs() -> None:
    shape = (20, 64, 64)
    yy, xx = np.mgrid[:64, :64]
    cylinder = (yy - 31.5) ** 2 + (xx - 31.5) ** 2 <= 25**2
    array = np.where(cylinder, 0.0, -1000.0).astype(np.float32)
    array = np.broadcast_to(array, shape).copy()
    array += np.random.default_rng(1).normal(0.0, 10.0, size=shape).astype(np.float32)
    prediction = LungsCT().predict(Volume(array, (5.0, 1.0, 1.0), (0.0, 0.0, 0.0), AXIAL, "CT"))
    _assert_no_lungs(prediction, shape)


def test_real_registry_head_ct_has_no_lungs(tmp_path: Path) -> None:
    # The CQ500 head CT slice of pydicom-data (512x512, real noise and table) as an 8-slice series.
    write(real_ct_slices(8, spacing_mm=5.0), tmp_path)
    volume = _read_series(tmp_path)
    assert volume.array.shape == (8, 512, 512)
    prediction = LungsCT().predict(volume)
    _assert_no_lungs(prediction, volume.array.shape)


def test_real_head_ct_has_no_lungs() -> None:
    volume = _read_series(shared("ct_head_5mm_philips"))
    assert volume.array.shape == (28, 512, 512)
    prediction = LungsCT().predict(volume)
    _assert_no_lungs(prediction, volume.array.shape)


def test_real_ct_slab_lungs_beside_the_liver() -> None:
    """Real scanner data (table, FOV padding, real noise): lung bases beside a reference liver SEG.

    The three real 1.25 mm slices are each repeated 20 times to make a 60 mm slab.
    """
    folder = shared("ct3slice_with_liver_seg")
    slices = sorted(
        (pydicom.dcmread(p) for p in folder.glob("*ct-3slice*")),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    assert len(slices) == 3, f"expected 3 CT slices in {folder}"
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(next(folder.glob("*liver.dcm"))))
    liver = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in slices],
        segment_numbers=[1],
        combine_segments=False,
        ignore_spatial_locations=True,
    )[..., 0].astype(bool)
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])
    repeat = 20
    array = np.repeat(hu, repeat, axis=0).astype(np.float32)
    liver = np.repeat(liver, repeat, axis=0)
    iop = np.array([float(v) for v in slices[0].ImageOrientationPatient])
    direction = np.stack([np.cross(iop[:3], iop[3:]), iop[3:], iop[:3]])
    dy, dx = (float(v) for v in slices[0].PixelSpacing)
    origin = tuple(float(v) for v in slices[0].ImagePositionPatient)
    volume = Volume(array, (1.0, dy, dx), origin, direction, "CT")

    prediction = LungsCT().predict(volume)
    assert prediction.labelmap is not None
    assert set(prediction.measurements) == {RIGHT_LUNG, LEFT_LUNG}, prediction.findings
    labelmap = prediction.labelmap
    overlap = np.count_nonzero((labelmap > 0) & liver)
    assert overlap <= 0.005 * np.count_nonzero(liver), f"{overlap} lung voxels inside the liver"

    def patient_x(mask: np.ndarray) -> float:
        _, y, x = (idx.mean() for idx in np.nonzero(mask))
        return float(origin[0] + y * dy * direction[1][0] + x * dx * direction[2][0])

    # The liver is in the patient's right: the right lung is on its side of the body.
    assert patient_x(labelmap == RIGHT_LUNG) < patient_x(labelmap == LEFT_LUNG)
    assert patient_x(liver) < patient_x(labelmap == LEFT_LUNG)
    for label in (RIGHT_LUNG, LEFT_LUNG):
        values = _values(prediction, label)
        assert -900.0 < values["mean"] < -600.0
        assert values["ml"] > 50.0


def test_non_ct_volume_is_refused() -> None:
    volume = Volume(np.zeros((4, 8, 8), dtype=np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), AXIAL, "MR")
    with pytest.raises(ValueError, match="CT"):
        LungsCT().predict(volume)


# -- the series writer ---------------------------------------------------------------------


def test_written_series_reads_back_with_phantom_geometry(
    tmp_path: Path, phantom: tuple[np.ndarray, dict[str, float]]
) -> None:
    hu, truth = phantom
    paths = write_ct_series(hu, SPACING, tmp_path, study_uid="1.2.826.0.1.3680043.8.498.1")
    assert len(paths) == hu.shape[0]
    datasets = [pydicom.dcmread(p) for p in paths]
    assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, hu.shape[0] + 1))
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert np.allclose(np.diff(z), SPACING[0])
    assert {ds.StudyInstanceUID for ds in datasets} == {"1.2.826.0.1.3680043.8.498.1"}
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    first = datasets[0]
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (first.Modality, first.BodyPartExamined, first.PatientID) == ("CT", "CHEST", "PHANTOM001")
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]

    volume = _read_series(tmp_path)
    assert np.array_equal(volume.array, hu.astype(np.float32))
    assert np.allclose(volume.spacing, SPACING)
    assert np.allclose(volume.direction, AXIAL)
    # End to end: geometry from the DICOM headers gives the right sides.
    _assert_matches_truth(LungsCT().predict(volume), truth)


def test_written_slice_passes_dciodvfy(tmp_path: Path) -> None:
    dciodvfy = require_tool("dciodvfy")
    hu, _ = make_chest_phantom(shape=(16, 64, 64))
    paths = write_ct_series(hu, SPACING, tmp_path)
    result = subprocess.run([dciodvfy, str(paths[len(paths) // 2])], capture_output=True, text=True, check=False)
    report = result.stdout + result.stderr
    assert "CTImage" in report, report
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert errors == [], report
