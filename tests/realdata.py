"""Real DICOM for the tests: from the package registries first, ``../shared/testdata`` second.

- pydicom's own test files (in its wheel) and the ``pydicom-data`` package
  (``make test`` installs it) are always there after ``make test``.  Cases the
  registries have no file for (a 3-slice 512x512 CT, a tilted stack, a series
  at one position) are built here from a real file by editing its header, so
  the pixels, the modules and the odd values stay those of a real scanner.
- ``../shared/testdata`` (next to the clone; other projects' files that may not
  be committed here) is used by :func:`shared` only: a missing folder is a skip
  with its reason, and a failure under ``CI=true`` (see :func:`tests.tools.unavailable`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
from pydicom.dataset import Dataset

from tests.tools import unavailable

SHARED_TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"
_DICOMDIR_TESTS = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests"


def shared(name: str) -> Path:
    """A folder of ``../shared/testdata``; skips (fails under ``CI=true``) when it is not there."""
    folder = SHARED_TESTDATA / name
    if not folder.is_dir():
        unavailable(f"../shared/testdata/{name} is not next to this clone (other projects' files, "
                    "never committed here)")
    return folder


def shared_files(name: str) -> list[Path]:
    """The files of a :func:`shared` folder, sorted by name."""
    return sorted(p for p in shared(name).iterdir() if p.is_file())


def registry_file(name: str) -> Path:
    """A file of pydicom's test files or of the ``pydicom-data`` package, by file name."""
    path = pydicom.data.get_testdata_file(name)
    if path is None:
        unavailable(f"{name} not found: install pydicom-data (make test does)")
    return Path(str(path))


def dicomdir_series(folder: str) -> list[Path]:
    """One series of pydicom's ``dicomdirtests`` (real CT/MR, pixels downsampled to 16x16), by folder.

    ``98892001/CT5N``: 5 axial CT slices 2.5 mm apart; ``77654033/CT2``: 4 CT
    slices of which the first is 202.5 mm from the rest (a real gap);
    ``98892003/MR700``: 7 MR slices of a radial scan, each in its own orientation.
    """
    path = _DICOMDIR_TESTS / folder
    if not path.is_dir():
        unavailable(f"pydicom's test files have no {folder} (pydicom {pydicom.__version__})")
    return sorted(p for p in path.iterdir() if p.is_file())


def real_ct_slices(count: int = 3, spacing_mm: float | None = None) -> list[Dataset]:
    """``count`` slices of one axial CT series made from the real 512x512 slice ``693_UNCR.dcm``.

    A CQ500 head CT (anonymised, signed 16-bit); the anonymisation removed the
    Frame of Reference UID, which SEG needs: the series gets one.  See
    :func:`stack_from_one_slice`; ``spacing_mm`` defaults to the header's
    Spacing Between Slices (20 mm).
    """
    return stack_from_one_slice("693_UNCR.dcm", count, spacing_mm)


def real_mr_slices(count: int = 3, spacing_mm: float | None = None) -> list[Dataset]:
    """``count`` slices of one oblique MR series made from the real 1024x1024 slice ``MR2_UNCR.dcm``.

    Unsigned 12-bit in 16, oblique orientation; see :func:`stack_from_one_slice`
    (``spacing_mm`` defaults to its Spacing Between Slices, 6.6 mm).
    """
    return stack_from_one_slice("MR2_UNCR.dcm", count, spacing_mm)


def stack_from_one_slice(name: str, count: int, spacing_mm: float | None = None) -> list[Dataset]:
    """A series of ``count`` copies of one real registry slice, stacked along its slice normal.

    The header and pixels are the scanner's; each copy gets its own SOP
    Instance UID, instance number and a position ``spacing_mm`` further along
    the normal, and a missing Frame of Reference UID is added.  UIDs are
    derived from the source's, so every call returns the same series.
    """
    source = pydicom.dcmread(registry_file(name))
    if not source.get("FrameOfReferenceUID"):
        source.FrameOfReferenceUID = pydicom.uid.generate_uid(entropy_srcs=[str(source.SeriesInstanceUID), "for"])
    origin = np.asarray([float(v) for v in source.ImagePositionPatient])
    iop = np.asarray([float(v) for v in source.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    step = float(source.get("SpacingBetweenSlices") or source.SliceThickness) if spacing_mm is None else spacing_mm
    slices = []
    for index in range(count):
        ds = copy.deepcopy(source)
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(source.SOPInstanceUID), str(index)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = index + 1
        position = origin + index * step * normal
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.SliceLocation = round(float(position @ normal), 4)
        slices.append(ds)
    return slices


def write(datasets: list[Dataset], folder: Path, prefix: str = "im") -> list[Path]:
    """Write data sets as files ``<prefix>NNN.dcm`` under ``folder`` (created); returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(datasets):
        path = folder / f"{prefix}{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def read(paths: list[Path]) -> list[Dataset]:
    """The data sets of ``paths``, in that order."""
    return [pydicom.dcmread(p) for p in paths]
