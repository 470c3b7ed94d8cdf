"""What a job holds in the worker's memory beyond its volume.

A series' datasets keep their headers only: the pixel bytes stay in the file
(pydicom's deferred read) once decoded into the volume, and come back from
the file for the overlay series and the PDF; the read-ahead buffer of a
growing series is reserved once, never copied into a larger one; a job of a
numpy-only model does not import torch (~170 MB per worker).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement

from dicom_node.imaging import load_series
from dicom_node.imaging.prefetch import Prefetch
from dicom_node.imaging.synthetic import write_ct_series

REPO = Path(__file__).resolve().parents[2]
PIXEL_DATA = 0x7FE00010


def _pixels_in_file(ds: pydicom.Dataset) -> bool:
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    return isinstance(raw, RawDataElement) and raw.value is None


def _series(folder: Path, slices: int = 6) -> tuple[np.ndarray, list[Path]]:
    rng = np.random.default_rng(3)
    hu = rng.integers(-1000, 2000, (slices, 200, 200)).astype(np.int16)  # 80 KB of pixels a slice: deferred
    return hu, write_ct_series(hu, (2.0, 0.8, 0.8), folder)


def test_a_loaded_series_keeps_no_pixel_bytes_and_reads_them_again_when_asked(tmp_path: Path) -> None:
    hu, files = _series(tmp_path / "ct")
    sv = load_series(files)
    assert all(_pixels_in_file(ds) for ds in sv.sources)  # decoded into the volume, let go
    np.testing.assert_array_equal(sv.volume.array, hu.astype(np.float32))
    first = sv.sources[0]
    stored = first.pixel_array  # what the overlay series draws: read again from the file, same values
    z = int(np.argmin([float(ds.ImagePositionPatient[2]) for ds in sv.sources]))
    expected = (hu[z].astype(np.float64) - float(first.RescaleIntercept)) / float(first.RescaleSlope)
    np.testing.assert_array_equal(stored, expected.astype(stored.dtype))


def test_read_ahead_keeps_no_pixel_bytes_and_never_copies_a_growing_series(tmp_path: Path) -> None:
    _, files = _series(tmp_path / "ct", slices=40)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    prefetch = Prefetch(64 * 2**20)
    prefetch.hint(uid, [str(f) for f in files[:1]])
    assert prefetch.step()
    buffer = prefetch._series[uid].buffer
    assert buffer is not None and buffer.shape[0] >= 40  # the budget's room, reserved (not resident) once
    prefetch.hint(uid, [str(f) for f in files])
    while prefetch.step():
        pass
    assert prefetch._series[uid].buffer is buffer  # 40 slices later: the same buffer, nothing copied
    assert prefetch._used_bytes() == 40 * 200 * 200 * 4  # the budget counts the slices held, not the room
    assert all(_pixels_in_file(prefetch.dataset(f)) for f in files)  # type: ignore[arg-type]
    sv = load_series(files, prefetch)
    assert sv.volume.array.base is buffer or sv.volume.array is buffer  # the buffer became the volume


def test_a_numpy_model_job_does_not_import_torch(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import numpy as np, pydicom
        sys.path.insert(0, {str(REPO)!r})
        from dicom_node.scheduler.pipeline import InferTask, run_infer
        from dicom_node.settings import Settings
        from dicom_node.spool import Spool
        from dicom_node.imaging.synthetic import write_ct_series
        from inference.registry import ModelRegistry
        tmp = Path({str(tmp_path)!r})
        spool = Spool(tmp / "state")
        hu = np.full((4, 32, 32), -1000, np.int16); hu[:, 8:24, 8:24] = 40
        files = write_ct_series(hu, (2.0, 1.0, 1.0), spool.incoming / "s")
        settings = Settings.model_validate({{"storage": {{"path": str(tmp / "state")}},
            "models": {{"lungs": {{"type": "builtin", "name": "lungs-ct"}}}},
            "rules": [{{"name": "all", "when": {{"Modality": "CT"}}, "run": ["lungs"]}}]}})
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        task = InferTask(1, uid, "lungs", tuple(spool.relative(f) for f in files), ("seg", "sr"))
        out = run_infer(task, ModelRegistry(settings.models), spool, settings.outputs)
        assert out.ok, out.error
        print("torch" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False", "a numpy-only model's job imported torch"
