"""A synthetic CT series on disk: the worker's warm-up (:mod:`dicom_node.scheduler.warmup`) and the tests.

The images are plain CT Image Storage instances (explicit VR little endian,
unsigned 12-bit stored values, ``RescaleIntercept`` :data:`RESCALE_INTERCEPT`)
of a made-up patient; nothing here reads or writes a real patient's data.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

logger = logging.getLogger(__name__)

#: RescaleIntercept used by :func:`write_ct_series` (stored value = HU + 1024).
RESCALE_INTERCEPT = -1024


def write_ct_series(
    hu: np.ndarray,
    spacing: Sequence[float],
    out_dir: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_id: str = "PHANTOM001",
    patient_name: str = "Phantom^Chest",
    body_part: str = "CHEST",
    series_description: str = "Phantom chest CT",
    series_number: int = 1,
    slice_thickness: float | None = None,
    origin: Sequence[float] | None = None,
    orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
) -> list[Path]:
    """Write a HU volume as a CT Image Storage series, one file per slice.

    Parameters
    ----------
    hu:
        Array ``(z, y, x)`` in HU; values are rounded and clipped to
        ``[-1024, 3071]`` (stored unsigned 12-bit, RescaleIntercept -1024).
    spacing:
        ``(dz, dy, dx)`` in mm; slice ``k`` is at ``origin + k * dz * normal``.
    out_dir:
        Folder to write into (created if missing); files are ``CT0001.dcm``...
    study_uid, series_uid, frame_of_reference_uid:
        UIDs to use; new ones from :func:`pydicom.uid.generate_uid` if ``None``.
    patient_id, patient_name, body_part, series_description, series_number:
        Values of the Patient and General Series modules.
    slice_thickness:
        SliceThickness (0018,0050); ``dz`` if ``None``.
    origin:
        ImagePositionPatient of the first slice (LPS mm); by default the
        volume is centred on the patient origin: ``(-(nx-1)/2*dx,
        -(ny-1)/2*dy, -(nz-1)/2*dz)``.
    orientation:
        ImageOrientationPatient (row direction, then column direction).

    Returns
    -------
    list of Path
        The written files, sorted by InstanceNumber (ascending slice position
        along the normal ``row x column``).

    Raises
    ------
    ValueError
        If ``hu`` is not 3D or ``spacing`` is not three positive numbers.
    """
    arr = np.asarray(hu)
    if arr.ndim != 3:
        raise ValueError(f"hu must be a 3D array (z, y, x), got shape {arr.shape}")
    if len(spacing) != 3 or any(float(s) <= 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers (dz, dy, dx), got {spacing}")
    dz, dy, dx = (float(s) for s in spacing)
    nz, ny, nx = arr.shape
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row, col)
    if origin is None:
        origin = (-(nx - 1) / 2.0 * dx, -(ny - 1) / 2.0 * dy, -(nz - 1) / 2.0 * dz)
    first = np.asarray(origin, dtype=np.float64)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    thickness = dz if slice_thickness is None else float(slice_thickness)
    stored = (np.clip(np.rint(arr.astype(np.float64)), -1024, 3071) - RESCALE_INTERCEPT).astype(np.uint16)
    now = datetime.datetime(2024, 1, 15, 10, 30, 0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    paths: list[Path] = []
    for k in range(nz):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.SeriesDate = ds.StudyDate
        ds.ContentDate = ds.StudyDate
        ds.StudyTime = now.strftime("%H%M%S")
        ds.SeriesTime = ds.StudyTime
        ds.ContentTime = ds.StudyTime
        ds.AccessionNumber = "ACC0001"
        ds.Modality = "CT"
        ds.Manufacturer = "dicom-node synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Phantom study"
        ds.SeriesDescription = series_description
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = body_part
        ds.SliceThickness = f"{thickness:.6g}"
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = int(series_number)
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        position = first + k * dz * normal
        ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{float(position @ normal):.6g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1500"
        ds.RescaleIntercept = str(RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()

        path = out_dir / f"CT{k + 1:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    logger.debug("Wrote %d CT slices to %s", nz, out_dir)
    return paths


__all__ = ["RESCALE_INTERCEPT", "write_ct_series"]
