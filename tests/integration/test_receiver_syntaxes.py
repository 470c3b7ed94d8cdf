"""Every transfer syntax over real associations: stored bit for bit, decoded to the same pixels.

Data from the package registries: a real 1024x1024 MR of pydicom-data stacked into a
series and transcoded here (deflate, HTJ2K, RLE, JPEG-LS near-lossless, JPEG 2000
lossy), pydicom's ``MR_small`` family (one image in big endian and other syntaxes),
pydicom-data's files encoded by other toolkits (JPEG 2000 from GDCM, JPEG-LS, JPEG
lossless, big endian) and its Enhanced CT.  With ``../shared/testdata`` next to the
clone (skipped without it), also its 4-slice MR of dicom2nifti in six syntaxes and
its Enhanced MR.
"""

from __future__ import annotations

import copy
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom import uid as tsuid
from pydicom.encaps import encapsulate
from pynetdicom import AE

from dicom_node.imaging import load_series
from tests.integration.conftest import require_tool
from tests.integration.test_receiver_inprocess import Running
from tests.realdata import real_mr_slices, registry_file, shared_files, write

pytestmark = pytest.mark.integration

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"


@pytest.fixture()
def receiver(tmp_path: Path) -> Iterator[Callable[[], Running]]:
    started: list[Running] = []

    def factory() -> Running:
        r = Running(tmp_path / f"r{len(started)}")
        started.append(r)
        return r

    yield factory
    for r in started:
        r.stop()


def _groups() -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for f in shared_files("mr_4slices_by_transfer_syntax"):
        parts = f.name.split("__")  # dicom2nifti__tests__data__generic__<group>__<series>__IM-....dcm
        groups.setdefault(f"{parts[4]}/{parts[5]}", []).append(f)
    assert len(groups) == 7, sorted(groups)
    return groups


def _dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file, after its file meta group."""
    meta = pydicom.filereader.read_file_meta_info(path)
    with open(path, "rb") as f:
        data = f.read()
    assert data[128:132] == b"DICM"
    return data[132 + 12 + int(meta.FileMetaInformationGroupLength):]


def _send(r: Running, files: list[Path]) -> list[Path]:
    """C-STORE files (raw, in their own transfer syntax) to the receiver; returns the spooled files."""
    ae = AE(ae_title="MODALITY")
    for sop_class, syntax in {(pydicom.filereader.read_file_meta_info(f).MediaStorageSOPClassUID,
                               pydicom.filereader.read_file_meta_info(f).TransferSyntaxUID) for f in files}:
        ae.add_requested_context(sop_class, [syntax])  # only this syntax: the node must take it as is
    assoc = ae.associate("127.0.0.1", r.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        for f in files:
            rsp = assoc.send_c_store(f)
            assert rsp.Status == 0x0000, (f.name, hex(rsp.Status))
    finally:
        assoc.release()
    spooled = []
    for f in files:
        meta = pydicom.filereader.read_file_meta_info(f)
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        p = r.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        # Stored exactly as received, in the syntax it was sent in.
        assert _dataset_bytes(p) == _dataset_bytes(f), f.name
        assert pydicom.filereader.read_file_meta_info(p).TransferSyntaxUID == meta.TransferSyntaxUID
        spooled.append(p)
    rows = r.db.query("SELECT DISTINCT transfer_syntax FROM instances")
    assert {row["transfer_syntax"] for row in rows} == {
        str(pydicom.filereader.read_file_meta_info(f).TransferSyntaxUID) for f in files}
    return spooled


def _volume(paths: list[Path]) -> np.ndarray:
    return load_series(paths).volume.array


def test_shared_mr_in_every_syntax_decodes_to_identical_pixels(receiver: Callable[[], Running]) -> None:
    groups = _groups()
    received = {name: _volume(_send(receiver(), files)) for name, files in groups.items()}
    # The compressed* groups are one series (same SOP Instance UIDs) in five syntaxes.
    compressed = [name for name in groups if name.startswith("compressed")]
    syntaxes = {str(pydicom.filereader.read_file_meta_info(groups[n][0]).TransferSyntaxUID) for n in compressed}
    assert {tsuid.JPEGLosslessSV1, tsuid.JPEG2000Lossless, tsuid.JPEGLSLossless, tsuid.RLELossless} <= syntaxes
    reference = received["compressed_rle/001"]
    assert reference.shape == (4, 256, 256) and reference.max() > 0
    for name in compressed:
        np.testing.assert_array_equal(received[name], reference, err_msg=name)
    # The explicit and implicit VR groups are other series: they decode as their originals do.
    for name in ("anatomical/001", "anatomical/001_implicit"):
        np.testing.assert_array_equal(received[name], _volume(groups[name]), err_msg=name)


def _transcode(files: list[Path], out: Path, syntax: str, **encode: Any) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        ds = pydicom.dcmread(f)
        if syntax == tsuid.DeflatedExplicitVRLittleEndian:
            ds = copy.deepcopy(ds)
            ds.file_meta.TransferSyntaxUID = syntax
        elif syntax == tsuid.HTJ2KLossless:
            ds = _htj2k(ds, out)
        else:
            ds.compress(syntax, **encode)
        path = out / f.name
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def _htj2k(ds: pydicom.Dataset, work: Path) -> pydicom.Dataset:
    """Encode with OpenJPH's ``ojph_compress`` (reversible HTJ2K); pydicom has no HTJ2K encoder."""
    exe = require_tool("ojph_compress")
    pixels = ds.pixel_array
    assert ds.SamplesPerPixel == 1 and ds.PixelRepresentation == 0 and pixels.dtype.itemsize == 2
    pgm, j2c = work / "frame.pgm", work / "frame.j2c"
    pgm.write_bytes(f"P5\n{ds.Columns} {ds.Rows}\n{(1 << ds.BitsStored) - 1}\n".encode()
                    + pixels.astype(">u2").tobytes())
    subprocess.run([exe, "-i", str(pgm), "-o", str(j2c), "-reversible", "true"], check=True,
                   capture_output=True, timeout=60)
    out = copy.deepcopy(ds)
    out.PixelData = encapsulate([j2c.read_bytes()])
    out["PixelData"].VR = "OB"
    out.file_meta.TransferSyntaxUID = tsuid.HTJ2KLossless
    return out


@pytest.mark.parametrize("syntax,encode,max_error,mean_error", [
    (tsuid.DeflatedExplicitVRLittleEndian, {}, 0, 0),
    (tsuid.HTJ2KLossless, {}, 0, 0),
    (tsuid.RLELossless, {}, 0, 0),
    (tsuid.JPEGLSNearLossless, {"jls_error": 2}, 2, 2),
    (tsuid.JPEG2000, {"j2k_psnr": [60]}, None, 5),
], ids=["deflate", "htj2k", "rle", "jpegls-near", "j2k-lossy"])
def test_transcoded_mr_is_received_and_decoded(receiver: Callable[[], Running], tmp_path: Path, syntax: str,
                                               encode: dict[str, Any], max_error: int | None,
                                               mean_error: float) -> None:
    source = write(real_mr_slices(3), tmp_path / "source")  # real 1024x1024 MR, unsigned 12 bit
    files = _transcode(source, tmp_path / "sent", syntax, **encode)
    assert pydicom.filereader.read_file_meta_info(files[0]).TransferSyntaxUID == syntax
    received = _volume(_send(receiver(), files))
    # The node decodes exactly what the sender's files decode to...
    np.testing.assert_array_equal(received, _volume(files))
    # ...which is the original image, exactly or within the lossy codec's error (in stored values).
    slope = float(pydicom.dcmread(source[0], stop_before_pixels=True).get("RescaleSlope", 1))
    error = np.abs(received - _volume(source)) / slope
    if max_error is not None:
        assert error.max() <= max_error + 1e-3  # float32 rounding of slope x stored value
    assert error.mean() <= mean_error


def test_pydicom_mr_small_family_including_big_endian(receiver: Callable[[], Running]) -> None:
    names = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
             "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
    reference = pydicom.dcmread(PYDICOM_FILES / names[0]).pixel_array
    for name in names:
        spooled = _send(receiver(), [PYDICOM_FILES / name])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom notes the odd VRs of these old test files
            np.testing.assert_array_equal(pydicom.dcmread(spooled[0]).pixel_array, reference, err_msg=name)


def test_enhanced_multiframe_mr_is_received_whole(receiver: Callable[[], Running]) -> None:
    for f in shared_files("enhanced_mr_8frames"):  # explicit and implicit VR copies of one object: one receiver each
        spooled = _send(receiver(), [f])
        volume = _volume(spooled)
        np.testing.assert_array_equal(volume, _volume([f]))
        assert volume.shape[0] == 8


def test_real_enhanced_ct_is_received_whole(receiver: Callable[[], Running]) -> None:
    source = registry_file("eCT_Supplemental.dcm")
    spooled = _send(receiver(), [source])
    volume = _volume(spooled)
    assert volume.shape == (2, 512, 512)
    np.testing.assert_array_equal(volume, _volume([source]))


@pytest.mark.parametrize("name", ["MR2_J2KR.dcm", "MR2_J2KI.dcm", "emri_small_jpeg_ls_lossless.dcm",
                                  "emri_small_big_endian.dcm", "JPEG-LL.dcm"])
def test_real_registry_files_are_stored_in_their_own_syntax(receiver: Callable[[], Running], name: str) -> None:
    # JPEG 2000 reversible and irreversible (GDCM), JPEG-LS, big endian, JPEG lossless (process 14).
    source = registry_file(name)
    spooled = _send(receiver(), [source])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(pydicom.dcmread(spooled[0]).pixel_array, pydicom.dcmread(source).pixel_array)
