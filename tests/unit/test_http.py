"""HTTP: token handling, routes, the status page (no PHI unless configured) and overlay thumbnails."""

from __future__ import annotations

import base64
import io
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_node.domain import JobKind
from dicom_node.http.metrics import Metrics
from dicom_node.http.server import HttpServer, token_matches
from dicom_node.http.status import render_status
from dicom_node.http.thumbnail import get_thumbnail, thumbnail_path
from dicom_node.scheduler.pipeline import InferTask, run_infer
from dicom_node.settings import load_settings_text
from dicom_node.spool import Spool
from dicom_node.store import Database, JobStore, ReceivedInstance, SeriesStore
from inference.registry import ModelRegistry
from tests.phantoms import make_chest_phantom, write_ct_series

TOKEN = "s3cret-token-0123456789"

MODEL_PY = """
import numpy as np

def segment(array, geometry):
    labels = np.zeros(array.shape, dtype=np.uint8)
    labels[array < -500] = 1          # air and lung
    labels[:, :, : array.shape[2] // 2] *= 2  # right half: label 2
    labels[labels == 0] = 0
    return labels
"""


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


@pytest.fixture()
def server() -> Iterator[str]:
    http = HttpServer("127.0.0.1", 0, Metrics(), lambda: (False, {"spool": "not writable: incoming"}),
                      lambda: None, status_page=lambda: b"<html>page</html>",
                      thumbnail=lambda series, model: b"\x89PNG" + series.encode(), token=TOKEN)
    http.start()
    host, port = http.address
    yield f"http://{host}:{port}"
    http.stop()


def test_token_guards_everything_but_healthz(server: str) -> None:
    assert _get(server + "/healthz")[0] == 200
    for path in ("/readyz", "/metrics", "/status", "/", "/thumbnails/1.2.3/lungs.png"):
        code, _, _ = _get(server + path)
        assert code == 401, path
        assert _get(server + path, {"Authorization": "Bearer wrong-token-000000000"})[0] == 401
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    code, body, _ = _get(server + "/readyz", bearer)
    assert code == 503 and b"not writable" in body
    code, body, ctype = _get(server + "/metrics", bearer)
    assert code == 200 and b"dicomnode_instances_received" in body and ctype.startswith("text/plain")
    basic = {"Authorization": "Basic " + base64.b64encode(f"admin:{TOKEN}".encode()).decode()}
    code, body, ctype = _get(server + "/status", basic)
    assert code == 200 and body == b"<html>page</html>" and ctype.startswith("text/html")


def test_thumbnail_urls_accept_only_uid_shaped_paths(server: str) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    code, body, ctype = _get(server + "/thumbnails/1.2.3/lungs-ct.png", auth)
    assert code == 200 and body == b"\x89PNG1.2.3" and ctype == "image/png"
    for bad in ("/thumbnails/../../etc/passwd.png", "/thumbnails/1.2.3/..%2F..%2Fx.png",
                "/thumbnails/1.2.3/.hidden.png", "/thumbnails/abc/lungs.png"):
        assert _get(server + bad, auth)[0] == 404, bad


def test_token_matches() -> None:
    assert token_matches(f"Bearer {TOKEN}", TOKEN)
    assert token_matches("basic " + base64.b64encode(f"x:{TOKEN}".encode()).decode(), TOKEN)
    assert not token_matches(None, TOKEN)
    assert not token_matches(TOKEN, TOKEN)
    assert not token_matches("Basic !!!notbase64", TOKEN)


@pytest.fixture()
def processed(tmp_path: Path) -> tuple[Database, Spool, str, str]:
    """A phantom series received, a python model run on it for real, its results recorded."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "air_model.py").write_text(MODEL_PY)
    settings = load_settings_text(f"""
storage: {{path: {tmp_path / 'state'}}}
models:
  air:
    type: python
    callable: "air_model:segment"
    path: {tmp_path / 'models'}
    labels:
      - {{value: 1, name: Left air, snomed: {{value: "39607008", meaning: Lung}}, color: [0, 255, 0]}}
      - {{value: 2, name: Right air, snomed: {{value: "39607008", meaning: Lung}}, color: [255, 0, 255]}}
""")
    db, spool = Database(tmp_path / "state.sqlite3"), Spool(tmp_path / "state")
    hu, _ = make_chest_phantom(shape=(16, 64, 64), spacing=(5.0, 5.0, 5.0))
    files = write_ct_series(hu, (5.0, 5.0, 5.0), tmp_path / "ct", patient_name="Doe^Jane", patient_id="PID-4711")
    series = SeriesStore(db)
    for f in files:
        ds = pydicom.dcmread(f)
        dest = spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        spool.write_atomic(dest, f.read_bytes())
        series.record_instance(ReceivedInstance(
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID),
            "1.2.840.10008.1.2.1", "CT", spool.relative(dest), 1, str(ds.SOPInstanceUID), "MODALITY", "NODE",
            "127.0.0.1"), 100.0)
    series_uid, study_uid = str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)
    series.complete_quiet(200.0, 30)
    jobs = JobStore(db)
    job = jobs.enqueue(JobKind.INFER, series_uid, 200.0, rule="r", model="air")
    jobs.claim(JobKind.INFER, 200.0)
    outcome = run_infer(InferTask(job, series_uid, "air", tuple(series.instance_paths(series_uid)), ("seg", "sr")),
                        ModelRegistry(settings.models), spool, settings.outputs)
    assert outcome.ok, outcome.error
    with db.transaction() as c:
        for o in outcome.objects:
            c.execute("INSERT INTO results VALUES (?,?,?,?,?,?,?)",
                      (o.sop_uid, series_uid, "air", o.kind, o.series_uid, o.path, 201.0))
    jobs.complete(job, 205.0, payload={"seconds": outcome.seconds, "findings": ["air found"],
                                       "model_version": outcome.model_version})
    return db, spool, study_uid, series_uid


def test_status_page_lists_study_series_jobs_results_without_phi(processed: tuple[Database, Spool, str, str]) -> None:
    db, spool, study_uid, series_uid = processed
    page = render_status(db, spool, studies=10, show_phi=False, node_title="NODE").decode()
    assert study_uid in page and series_uid in page
    assert "air found" in page and f"/thumbnails/{series_uid}/air.png" in page and "SEG" in page
    assert "model" in page and "done" in page
    assert "Doe" not in page and "PID-4711" not in page and "Phantom chest CT" not in page
    page = render_status(db, spool, studies=10, show_phi=True, node_title="NODE").decode()
    assert "Doe^Jane" in page and "PID-4711" in page and "Phantom chest CT" in page


def test_status_page_escapes_what_it_shows(processed: tuple[Database, Spool, str, str]) -> None:
    db, spool, _, series_uid = processed
    with db.transaction() as c:
        c.execute("UPDATE series SET reason=? WHERE series_uid=?", ("<script>alert(1)</script>", series_uid))
    page = render_status(db, spool, studies=10, show_phi=False, node_title="NODE").decode()
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_thumbnail_shows_the_mask_in_segment_colours_and_is_cached(
        processed: tuple[Database, Spool, str, str]) -> None:
    db, spool, _, series_uid = processed
    png = get_thumbnail(db, spool, series_uid, "air")
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert image.shape[:2] == (64, 64)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    assert np.count_nonzero((g > r + 60) & (g > b + 60)) > 20       # left: green
    assert np.count_nonzero((r > g + 60) & (b > g + 60)) > 20       # right: magenta
    cached = thumbnail_path(spool, series_uid, "air")
    assert cached.read_bytes() == png
    cached.write_bytes(b"cached")
    assert get_thumbnail(db, spool, series_uid, "air") == b"cached"


def test_thumbnail_of_unknown_result_or_bad_names(processed: tuple[Database, Spool, str, str]) -> None:
    from dicom_node.errors import InvalidUIDError
    from dicom_node.http.thumbnail import ThumbnailError

    db, spool, _, series_uid = processed
    with pytest.raises(ThumbnailError):
        get_thumbnail(db, spool, series_uid, "other")
    with pytest.raises(InvalidUIDError):
        get_thumbnail(db, spool, "1.2.3/../..", "air")
    with pytest.raises(InvalidUIDError):
        get_thumbnail(db, spool, series_uid, "..")
