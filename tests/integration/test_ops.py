"""Operations with a real node process: metrics, readiness, status page in Chromium, audit, SIGHUP, lifecycle.

The node runs as ``dicom-node serve`` in a subprocess; DCMTK ``storescu`` is the modality.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import REPO, node_config, require_tool, storescu, wait_until
from tests.phantoms import make_chest_phantom, write_ct_series

pytestmark = pytest.mark.integration

OUTPUT = REPO / "test-output"

SLOW_MODEL = """
import time
import numpy as np

def segment(array, geometry):
    time.sleep({sleep})
    labels = np.zeros(array.shape, dtype=np.uint8)
    labels[array < -500] = 1
    return labels
"""


def _http(node: Any, path: str) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{node.config['http']['port']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _samples(node: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, body = _http(node, "/metrics")
    assert code == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _metric(node: Any, name: str, **labels: str) -> float:
    return _samples(node).get((name, tuple(sorted(labels.items()))), 0.0)


def _audit(node: Any, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run([str(REPO / ".venv/bin/dicom-node"), "audit", "--config", str(node.config_path), "--json",
                          *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _phantom(tmp: Path, name: str, **kw: Any) -> tuple[list[Path], str, str]:
    hu, _ = make_chest_phantom(shape=(24, 64, 64), spacing=(4.0, 5.0, 5.0))
    files = write_ct_series(hu, (4.0, 5.0, 5.0), tmp / name, **kw)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return files, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _series(node: Any, uid: str) -> dict[str, Any] | None:
    return next((s for s in node.status_json() if s["series_uid"] == uid), None)


def test_metrics_status_page_audit_readiness_and_reload(tmp_path: Path, node_factory: Any) -> None:
    chromium = require_tool("chromium")
    storescu_ok = require_tool("storescu")
    assert storescu_ok
    config = node_config(tmp_path, quiet_seconds=1.0)
    node = node_factory(config)
    files, study_uid, series_uid = _phantom(tmp_path, "ct", patient_name="Doe^Jane", patient_id="PID-4711")

    before = _metric(node, "dicomnode_instances_received_total", outcome="new")
    accepted = _metric(node, "dicomnode_associations_total", outcome="accepted")
    sent = storescu(node.port, files, aec="DICOMNODE")
    assert sent.returncode == 0, sent.stderr
    # Receivers are separate processes: their counts reach the main process's metrics a moment later.
    wait_until(lambda: _metric(node, "dicomnode_instances_received_total", outcome="new") == before + len(files),
               30, "every instance counted")
    wait_until(lambda: _metric(node, "dicomnode_associations_total", outcome="accepted") == accepted + 1,
               30, "the association counted")
    assert _metric(node, "dicomnode_bytes_received_total") >= sum(f.stat().st_size for f in files) * 0.9

    refused = storescu(node.port, files[:1], aec="SOMEONE-ELSE")
    assert refused.returncode != 0
    wait_until(lambda: _metric(node, "dicomnode_associations_total", outcome="refused") == 1, 30,
               "the refused association counted")

    wait_until(lambda: (_series(node, series_uid) or {}).get("state") == "done", 240, "the series to be done")
    samples = _samples(node)
    assert samples[("dicomnode_series_completed_total", ())] == 1
    assert samples[("dicomnode_rule_matches_total", (("rule", "chest-ct"),))] == 1
    assert samples[("dicomnode_inference_seconds_count", (("model", "lungs"),))] == 1
    assert samples[("dicomnode_jobs", (("kind", "infer"), ("state", "done")))] == 1
    assert samples[("dicomnode_queue_depth", (("kind", "infer"),))] == 0
    assert samples[("dicomnode_series", (("state", "done"),))] == 1

    # The status page: study, series, job, result with its thumbnail; no patient data by default.
    code, page = _http(node, "/status")
    html = page.decode()
    assert code == 200 and study_uid in html and series_uid in html
    assert "Doe" not in html and "PID-4711" not in html
    thumb = f"/thumbnails/{series_uid}/lungs.png"
    assert thumb in html
    code, png = _http(node, thumb)
    assert code == 200 and png.startswith(b"\x89PNG")
    assert (node.state / "spool" / "results" / series_uid / "lungs" / "thumbnail.png").read_bytes() == png
    assert _http(node, "/thumbnails/1.2.3/../../x.png")[0] == 404

    OUTPUT.mkdir(exist_ok=True)
    shot = OUTPUT / "status-page.png"
    shot.unlink(missing_ok=True)
    profile = tmp_path / "chromium-profile"
    run = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1280,900",
                          f"http://127.0.0.1:{config['http']['port']}/status"],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    image = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    assert image.size == (1280, 900)
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 50, "the screenshot is (nearly) blank"
    # The thumbnail was fetched by the browser: the access shows in the cache-hit path (same bytes).
    assert shot.stat().st_size > 20_000

    # The audit trail, through the CLI.
    events = [e["event"] for e in _audit(node, "--series", series_uid)]
    for expected in ("series_received", "series_completed", "rule_matched", "model_run", "objects_produced"):
        assert expected in events, (expected, events)
    run_row = _audit(node, "--event", "model_run")[0]
    assert run_row["detail"]["model"] == "lungs" and run_row["detail"]["version"]
    produced = _audit(node, "--event", "objects_produced")[0]["detail"]["objects"]
    assert {o["kind"] for o in produced} == {"seg", "sr"}
    assoc = _audit(node, "--since", "1h", "--event", "association_refused")
    assert assoc and assoc[0]["peer_ae"] == "STORESCU" and assoc[0]["peer_host"] == "127.0.0.1"
    text = subprocess.run([str(REPO / ".venv/bin/dicom-node"), "audit", "--config", str(node.config_path)],
                          capture_output=True, text=True, check=True).stdout
    assert "association_accepted" in text and series_uid in text
    assert "Doe" not in node.log() and "PID-4711" not in node.log()

    # SIGHUP: new rules without a restart (the model is unchanged).  The node also notices the
    # changed file by itself: one reload for that, one for the signal.
    config["rules"][0]["when"] = {"Modality": "MR"}
    node.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    node.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: node.log().count("Rules reload: 1 rule(s) loaded") >= 2, 30, "the rules to be reloaded")
    files2, _, series2 = _phantom(tmp_path, "ct2")
    assert storescu(node.port, files2, aec="DICOMNODE").returncode == 0
    row = wait_until(lambda: (_series(node, series2) or {}).get("state") == "ignored" and _series(node, series2),
                     60, "the second series to be ignored under the new rules")
    assert row["reason"] == "no rule matched"

    # Readiness: the spool's incoming folder replaced by a file fails even for root.
    assert _http(node, "/readyz")[0] == 200
    incoming = node.state / "spool" / "incoming"
    moved = node.state / "spool" / "incoming.moved"
    incoming.rename(moved)
    incoming.write_bytes(b"not a folder")
    try:
        code, body = _http(node, "/readyz")
        assert code == 503
        assert json.loads(body)["checks"]["spool"].startswith("not writable")
    finally:
        incoming.unlink()
        moved.rename(incoming)
    assert _http(node, "/readyz")[0] == 200
    assert node.stop() == 0


class NotifySocket:
    """systemd's side of ``NOTIFY_SOCKET``: a datagram socket read by a thread, as the manager does."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except OSError:
                return

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


def _slow_node(tmp_path: Path, node_factory: Any, sleep: float, **kw: Any) -> tuple[Any, str]:
    models = tmp_path / "models"
    models.mkdir()
    (models / "slow_model.py").write_text(SLOW_MODEL.format(sleep=sleep))
    config = node_config(tmp_path, quiet_seconds=1.0, **kw)
    config["models"] = {"slow": {"type": "python", "callable": "slow_model:segment", "path": str(models),
                                 "labels": [{"value": 1, "name": "Air",
                                             "snomed": {"value": "39607008", "meaning": "Lung"}}]}}
    config["rules"][0]["run"] = ["slow"]
    node = node_factory(config)
    files, _, series_uid = _phantom(tmp_path, "ct")
    assert storescu(node.port, files, aec="DICOMNODE").returncode == 0

    def infer_running() -> bool:
        row = _series(node, series_uid)
        return bool(row) and any(j["kind"] == "infer" and j["state"] == "running" for j in row["jobs"])

    wait_until(infer_running, 120, "the INFER job to run")
    return node, series_uid


def test_first_sigterm_lets_the_running_job_finish(tmp_path: Path, node_factory: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("storescu")
    sock = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    try:
        # 15 s: seen running by `dicom-node status` (seconds each on a busy CI) and still running at the stop.
        node, series_uid = _slow_node(tmp_path, node_factory, sleep=15)
        # A connection that never associates (a port probe) is open at the stop: closed, not "aborted".
        with socket.create_connection(("127.0.0.1", node.port)):
            time.sleep(1)  # handed to a receiver process
            node.proc.send_signal(signal.SIGTERM)
            assert node.proc.wait(120) == 0
        log = node.log()
        assert "Traceback" not in log and "Invalid event" not in log, log[-3000:]
        assert log.index("Stopping: DICOM listener closed") < log.index("Job 1: model slow produced")
        row = _series(node, series_uid)
        assert row is not None
        infer = [j for j in row["jobs"] if j["kind"] == "infer"][0]
        assert infer["state"] == "done" and infer["payload"]["seconds"]["model"] >= 15
        assert (node.state / "spool" / "results" / series_uid / "slow" / "seg.dcm").is_file()
        messages = list(sock.messages)
        assert messages[0].startswith("READY=1")
        assert "WATCHDOG=1" in messages and "STOPPING=1" in messages
    finally:
        sock.close()


def test_second_sigterm_forces_the_stop(tmp_path: Path, node_factory: Any) -> None:
    require_tool("storescu")
    node, series_uid = _slow_node(tmp_path, node_factory, sleep=600, workers={"shutdown_grace_s": 900})
    node.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "Stopping: DICOM listener closed" in node.log(), 30, "the graceful stop to begin")
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(60) == 1
    assert "forcing stop" in node.log()
    # The interrupted job stays 'running' in the database; the next start queues it again.
    row = _series(node, series_uid)
    assert row is not None and [j["state"] for j in row["jobs"] if j["kind"] == "infer"] == ["running"]


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    unit = (REPO / "systemd" / "dicom-node.service").read_text()
    assert "Type=notify" in unit and "KillMode=mixed" in unit
    # verify checks that ExecStart exists: point it at this checkout's entry point.
    unit = unit.replace("ExecStart=/opt/dicom-node/.venv/bin/dicom-node", f"ExecStart={REPO}/.venv/bin/dicom-node")
    (tmp_path / "dicom-node.service").write_text(unit)
    out = subprocess.run([analyze, "verify", str(tmp_path / "dicom-node.service")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "dicom-node.service" not in out.stdout + out.stderr, out.stdout + out.stderr
    sysusers = require_tool("systemd-sysusers")  # the service's user, created in a scratch root
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    out = subprocess.run([sysusers, f"--root={root}", str(REPO / "systemd" / "dicom-node.sysusers.conf")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "dicom-node:" in (root / "etc" / "passwd").read_text()
    assert os.access(REPO / ".venv/bin/dicom-node", os.X_OK)
