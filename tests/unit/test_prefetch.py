"""Read-ahead: instances read and decoded while a series arrives give the job the same volume, sooner.

The volume built from what was read ahead must equal, value for value and in
the same order, the one built from the files; a file changed since, one that
cannot be read, a full budget and an expired series all fall back to the files.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from dicom_node.errors import ImagingError
from dicom_node.imaging import load_series
from dicom_node.imaging.prefetch import EXPIRY_S, Prefetch
from dicom_node.imaging.synthetic import write_ct_series
from dicom_node.scheduler.pipeline import InferTask
from dicom_node.scheduler.worker import WorkerProcess
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from tests.tools import wait_until

SHAPE = (12, 24, 20)


def _series(folder: Path, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, 1500, SHAPE).astype(np.int16)
    return write_ct_series(hu, (2.5, 0.8, 0.8), folder)


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def _read_all(prefetch: Prefetch, uid: str, files: list[Path]) -> None:
    prefetch.hint(uid, [str(f) for f in files])
    while prefetch.step():
        pass
    assert not prefetch.busy


def _same(a: Any, b: Any) -> None:
    assert a.volume.array.dtype == b.volume.array.dtype == np.float32
    np.testing.assert_array_equal(a.volume.array, b.volume.array)
    assert (a.volume.spacing, a.volume.origin) == (b.volume.spacing, b.volume.origin)
    np.testing.assert_array_equal(a.volume.direction, b.volume.direction)
    assert [s.SOPInstanceUID for s in a.sources] == [s.SOPInstanceUID for s in b.sources]
    assert a.notes == b.notes


@pytest.mark.parametrize("order", ["z", "reversed", "shuffled"])
def test_read_ahead_gives_the_volume_of_the_files(tmp_path: Path, order: str) -> None:
    files = _series(tmp_path / "ct")
    arrival = {"z": files, "reversed": files[::-1], "shuffled": random.Random(3).sample(files, len(files))}[order]
    cold = load_series(arrival)
    prefetch = Prefetch(64 * 2**20)
    _read_all(prefetch, _uid(files[0]), arrival)
    assert prefetch.held() == {_uid(files[0]): len(files)}

    warm = load_series(arrival, prefetch)
    _same(warm, cold)
    # Its datasets are the ones read ahead (not read again), and one job's: taken, then dropped.
    assert all(prefetch.dataset(f) is not None for f in files)
    assert prefetch.taken(arrival) == len(files)
    assert prefetch.held() == {} and prefetch.dataset(files[0]) is None


def test_read_ahead_leaves_the_jobs_load_no_header_element_to_convert(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The header elements the load reads are converted from their raw bytes while the series arrives."""
    from pydicom.dataelem import RawDataElement

    from dicom_node.imaging.series import LOAD_KEYWORDS

    files = _series(tmp_path / "ct")
    prefetch = Prefetch(1 << 30)
    _read_all(prefetch, _uid(files[0]), files)
    ds = prefetch.dataset(files[3])
    assert ds is not None
    raw = [k for k in LOAD_KEYWORDS if k in ds and isinstance(ds.get_item(k), RawDataElement)]
    assert raw == [], f"left for the job's load to convert: {raw}"
    converted: list[str] = []
    real = pydicom.dataelem.convert_raw_data_element

    def counting(raw_elem: Any, *args: Any, **kwargs: Any) -> Any:
        converted.append(str(raw_elem.tag))
        return real(raw_elem, *args, **kwargs)

    monkeypatch.setattr(pydicom.dataset, "convert_raw_data_element", counting)
    sv = load_series(files, prefetch)
    assert sv.volume.array.shape[0] == len(files)
    assert converted == [], "the load converted header elements the read-ahead could have"


def test_slices_arriving_in_volume_order_become_the_volume_without_a_copy(tmp_path: Path) -> None:
    files = _series(tmp_path / "ct")
    cold = load_series(files)
    order = [f.SOPInstanceUID for f in cold.sources]
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    in_z = [by_uid[str(u)] for u in order]
    prefetch = Prefetch(64 * 2**20)
    _read_all(prefetch, _uid(files[0]), in_z)
    buffer = prefetch._series[_uid(files[0])].buffer
    assert buffer is not None and buffer.shape[0] > len(files)  # grown in steps, not to the exact count

    array, planes = prefetch.volume([(f, prefetch.dataset(f)) for f in in_z])  # type: ignore[misc]
    assert array is not None and planes == []
    assert array.shape == (len(files), *SHAPE[1:])  # trimmed to the volume
    np.testing.assert_array_equal(array, cold.volume.array)
    # Any other order of arrival: put in volume order inside the same buffer.
    for arrival in (in_z[::-1], random.Random(5).sample(in_z, len(in_z))):
        prefetch = Prefetch(64 * 2**20)
        _read_all(prefetch, _uid(files[0]), arrival)
        buffer = prefetch._series[_uid(files[0])].buffer
        array, planes = prefetch.volume([(f, prefetch.dataset(f)) for f in in_z])  # type: ignore[misc]
        assert array is buffer and planes == []
        np.testing.assert_array_equal(array, cold.volume.array)
    # Part of the volume read ahead (a budget, a late reader): views of the buffer, in the order asked.
    prefetch = Prefetch(64 * 2**20)
    _read_all(prefetch, _uid(files[0]), in_z[:7])
    array, planes = prefetch.volume([(f, prefetch.dataset(f)) for f in in_z])  # type: ignore[misc]
    assert array is None and len(planes) == len(files) and planes[7:] == [None] * (len(files) - 7)
    np.testing.assert_array_equal(np.stack(planes[:7]), cold.volume.array[:7])  # type: ignore[arg-type]


def test_a_job_that_comes_before_the_last_instances_are_read_ahead_reads_them_into_the_buffer(
        tmp_path: Path) -> None:
    files = _series(tmp_path / "ct")
    cold = load_series(files)
    uid = _uid(files[0])
    prefetch = Prefetch(64 * 2**20)
    _read_all(prefetch, uid, files[:9])
    prefetch.hint(uid, [str(f) for f in files])  # the last three arrived; the job comes before they are read
    buffer = prefetch._series[uid].buffer
    warm = load_series(files, prefetch)
    _same(warm, cold)
    assert buffer is not None and np.shares_memory(warm.volume.array, buffer), "handed over, not copied out"
    assert not prefetch.busy, "nothing of the series is read twice"
    assert prefetch.taken(files) == 9, "the three read by the load are not counted as read ahead"


def test_a_file_changed_after_its_read_is_read_again(tmp_path: Path) -> None:
    files = _series(tmp_path / "ct")
    prefetch = Prefetch(64 * 2**20)
    _read_all(prefetch, _uid(files[0]), files)
    # The sender sends one instance again with other pixels: the spool replaces the file.
    ds = pydicom.dcmread(files[4])
    pixels = ds.pixel_array.copy()
    pixels[:] = 1234
    ds.PixelData = pixels.tobytes()
    tmp = files[4].with_suffix(".tmp")
    ds.save_as(tmp)
    os.replace(tmp, files[4])
    assert prefetch.dataset(files[4]) is None

    warm = load_series(files, prefetch)
    _same(warm, load_series(files))
    assert (warm.volume.array == 1234 - 1024).any()  # the new pixels (RescaleIntercept -1024)


def test_a_budget_smaller_than_the_series_reads_the_rest_at_load(tmp_path: Path) -> None:
    files = _series(tmp_path / "ct")
    slice_bytes = SHAPE[1] * SHAPE[2] * 4
    prefetch = Prefetch(5 * slice_bytes)
    prefetch.hint(_uid(files[0]), [str(f) for f in files])
    while prefetch.step():
        pass
    assert prefetch.busy  # full: the rest waits for room (a job taking a series, an expiry)
    held = prefetch.held()[_uid(files[0])]
    assert held == 5 and prefetch._series[_uid(files[0])].nbytes <= 5 * slice_bytes
    _same(load_series(files, prefetch), load_series(files))

    assert Prefetch(0).busy is False
    off = Prefetch(0)
    off.hint(_uid(files[0]), [str(f) for f in files])
    assert not off.step() and off.held() == {}


def test_a_series_no_job_takes_expires(tmp_path: Path) -> None:
    files = _series(tmp_path / "ct")
    now = [1000.0]
    prefetch = Prefetch(64 * 2**20, clock=lambda: now[0])
    _read_all(prefetch, _uid(files[0]), files)
    now[0] += EXPIRY_S - 1
    prefetch.expire()
    assert prefetch.held()
    now[0] += 2
    prefetch.expire()
    assert prefetch.held() == {} and prefetch.dataset(files[0]) is None


def test_an_unreadable_instance_fails_the_load_as_without_read_ahead(tmp_path: Path) -> None:
    files = _series(tmp_path / "ct")
    files[3].write_bytes(b"not DICOM at all")
    prefetch = Prefetch(64 * 2**20)
    _read_all(prefetch, _uid(files[0]), files)
    assert prefetch.held()[_uid(files[0])] == len(files) - 1
    with pytest.raises(ImagingError) as cold:
        load_series(files)
    with pytest.raises(ImagingError) as warm:
        load_series(files, prefetch)
    assert str(warm.value) == str(cold.value)


def test_an_idle_worker_reads_a_receiving_series_and_its_job_takes_it(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "bright_model.py").write_text(
        "import numpy as np\n\ndef bright(array, geometry):\n    return (array > 500).astype(np.uint8)\n")
    spool = Spool(tmp_path / "state")
    files = _series(spool.incoming / "study" / "series")
    settings = Settings.model_validate({
        "storage": {"path": str(tmp_path / "state")},
        "workers": {"infer": 1},
        "models": {"bright": {"type": "python", "callable": "bright_model:bright", "path": str(code),
                              "labels": [{"value": 1, "name": "Bright", "color": [255, 0, 0],
                                          "snomed": {"value": "10200004", "meaning": "Liver"}}]}},
    })
    paths = tuple(spool.relative(f) for f in files)
    task = InferTask(1, _uid(files[0]), "bright", paths, ("seg", "sr"))
    worker = WorkerProcess(settings)
    worker.start()
    try:
        assert worker.prefetch(task.series_uid, list(paths[:6]))  # half the series has arrived
        assert worker.prefetch(task.series_uid, list(paths))  # then all of it
        assert worker.prefetch(task.series_uid, list(paths))  # known: not sent again
        wait_until(lambda: worker.read_ahead() == {task.series_uid: len(files)}, 120,
                   "the worker to read the series ahead (after its warm-up)")
        outcome = worker.run(task, 120)
        assert outcome.ok, outcome.error
        assert outcome.prefetched == len(files)
        again = worker.run(InferTask(2, task.series_uid, "bright", paths, ("seg", "sr")), 120)
        assert again.ok and again.prefetched == 0  # taken by the first job: the second reads the files
        assert [o.sop_uid for o in again.objects] == [o.sop_uid for o in outcome.objects]
    finally:
        worker.close()


def test_series_facts_from_geometry_read_while_arriving_equal_a_full_read(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.rules import summary

    files = _series(tmp_path / "ct")
    known = summary.GeometryCache()
    for f in files[1:]:
        assert known.get(f) is not None
    reads: list[Path] = []
    dcmread = pydicom.dcmread
    monkeypatch.setattr(summary.pydicom, "dcmread", lambda p, **kw: reads.append(Path(p)) or dcmread(p, **kw))
    assert summary.read_series(files, known) == summary.read_series(files)
    assert reads.count(files[0]) == 2 and reads.count(files[1]) == 1  # with the cache: the first file only

    # An instance sent again with another position: read again, and the facts say so.
    ds = pydicom.dcmread(files[5])
    ds.ImagePositionPatient = [float(v) + 100.0 for v in ds.ImagePositionPatient]
    ds.save_as(files[5].with_suffix(".tmp"))
    os.replace(files[5].with_suffix(".tmp"), files[5])
    reads.clear()
    attributes, facts = summary.read_series(files, known)
    assert reads == [files[0], files[5]]
    assert (attributes, facts) == summary.read_series(files)
