"""Dispatch back to the PACS with real parts: outbox retries, restarts, dead letters, STOW-RS.

The node runs as a separate process (so it can be SIGKILLed for real); the phantom
goes straight to the node with DCMTK ``storescu``; the PACS is Orthanc (Debian
package, with its DICOMweb plugin for STOW-RS) or a pynetdicom SCP in the test
whose answer the test chooses.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from tests.integration.conftest import (
    REPO,
    ROUTE_CT_LUA,
    NodeProcess,
    free_port,
    node_config,
    require_tool,
    storescu,
    wait_until,
)
from tests.phantoms import make_chest_phantom, write_ct_series
from tests.tools import unavailable

pytestmark = pytest.mark.integration

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _phantom(tmp_path: Path) -> tuple[list[Path], str]:
    spacing = (2.5, 2.0, 2.0)
    hu, _ = make_chest_phantom(spacing=spacing)
    files = write_ct_series(hu, spacing, tmp_path / "phantom")
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _to_node(node: NodeProcess, files: list[Path]) -> None:
    sent = storescu(node.port, files, aec="DICOMNODE")
    assert sent.returncode == 0, sent.stderr


def _send_jobs(node: NodeProcess) -> list[dict[str, Any]]:
    return [j for s in node.status_json() for j in s["jobs"] if j["kind"] == "send"]


def _results_once(orthanc: Any, study_uid: str) -> dict[str, int] | None:
    """Instances per result modality in the study, once SEG and SR are both there."""
    counts: dict[str, int] = {}
    for series in orthanc.series_of_study(study_uid):
        modality = series["MainDicomTags"].get("Modality")
        counts[modality] = counts.get(modality, 0) + len(series["Instances"])
    return counts if {"SEG", "SR"} <= counts.keys() else None


def _dicom_node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / ".venv/bin/dicom-node"), *args], capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------- 1. PACS down, then back


def test_results_wait_for_a_stopped_pacs_and_arrive_once_when_it_returns(
        tmp_path: Path, orthanc_factory: Any, node_factory: Any) -> None:
    pacs_port = free_port()
    # Backoff of 10 minutes: only the destination health check (every second) can deliver within the test.
    config = node_config(tmp_path, destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                                           "port": pacs_port}},
                         send={"max_attempts": 5, "backoff_initial_s": 600, "backoff_max_s": 600,
                               "health_check_s": 1})
    node = node_factory(config)
    pacs = orthanc_factory(node.port, dicom_port=pacs_port)
    pacs.stop()  # maintenance window
    files, study_uid = _phantom(tmp_path)
    _to_node(node, files)

    jobs = wait_until(lambda: [j for j in _send_jobs(node) if j["state"] == "retrying"], 180,
                      "the SEND job to wait for the PACS")
    assert jobs[0]["label"] == "failed-retrying" and "unreachable" in jobs[0]["reason"]
    status = _dicom_node("status", "--config", str(node.config_path)).stdout
    assert "failed-retrying" in status and "next try" in status

    pacs = orthanc_factory(node.port, dicom_port=pacs_port, http_port=pacs.http_port)  # back, same ports
    counts = wait_until(lambda: _results_once(pacs, study_uid), 90, "SEG and SR after the PACS returned")
    assert counts == {"SEG": 1, "SR": 1}
    done = wait_until(lambda: [j for j in _send_jobs(node) if j["state"] == "done"], 30, "the SEND job done")
    assert done[0]["label"] == "sent" and done[0]["attempts"] == 2
    assert "answers again" in node.log()
    assert _results_once(pacs, study_uid) == {"SEG": 1, "SR": 1}


# --------------------------------------------------------------------------- 2. node killed while sending


class StallingProxy:
    """TCP proxy to a DICOM peer that, while ``hold`` is set, passes the association accept
    but swallows every later answer: the peer stores what it gets, the sender never hears back."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.hold = threading.Event()
        self.holding = threading.Event()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._sockets += [client, upstream]
            hold = self.hold.is_set()
            for args in ((client, upstream, False), (upstream, client, hold)):
                t = threading.Thread(target=self._pump, args=args, daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, hold: bool) -> None:
        pending, passed = b"", False
        try:
            while data := src.recv(65536):
                if not hold:
                    dst.sendall(data)
                elif not passed:
                    pending += data
                    size = 6 + int.from_bytes(pending[2:6], "big") if len(pending) >= 6 else None
                    if size is not None and len(pending) >= size:
                        dst.sendall(pending[:size])  # the A-ASSOCIATE-AC; nothing after it
                        passed = True
                        self.holding.set()
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self._threads:
            t.join(10)
        for s in self._sockets:
            s.close()
        self._listener.close()


@pytest.fixture()
def proxy_factory() -> Iterator[Any]:
    proxies: list[StallingProxy] = []

    def factory(upstream_port: int) -> StallingProxy:
        proxies.append(StallingProxy(upstream_port))
        return proxies[-1]

    yield factory
    for p in proxies:
        p.close()


def test_node_killed_while_sending_delivers_once_after_restart(
        tmp_path: Path, orthanc_factory: Any, node_factory: Any, proxy_factory: Any) -> None:
    node_port = free_port()
    pacs = orthanc_factory(node_port)
    proxy = proxy_factory(pacs.dicom_port)
    proxy.hold.set()
    config = node_config(tmp_path, port=node_port, destinations={
        "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": proxy.port, "timeout_s": 120}})
    node = node_factory(config)
    files, study_uid = _phantom(tmp_path)
    _to_node(node, files)

    # The PACS has stored the first object; its answer never reaches the node, which waits for it.
    wait_until(lambda: pacs.series_of_study(study_uid), 180, "the first result object on the PACS")
    assert proxy.holding.is_set()
    assert [j["state"] for j in _send_jobs(node)] == ["running"]
    assert node.stop(signal.SIGKILL) == -signal.SIGKILL

    proxy.hold.clear()
    node = node_factory(config, name="node-restarted")
    counts = wait_until(lambda: _results_once(pacs, study_uid), 90, "SEG and SR after the restart")
    done = wait_until(lambda: [j for j in _send_jobs(node) if j["state"] == "done"], 30, "the SEND job done")
    assert len(_send_jobs(node)) == 1 and done[0]["attempts"] == 2, "the interrupted send was sent again"
    assert counts == {"SEG": 1, "SR": 1}, "a repeated C-STORE overwrites, never duplicates"
    assert "Recovered 1 job(s)" in node.log()


# --------------------------------------------------------------------------- 3. refused, dead, retried


class ScriptedStoreScp:
    """A storage SCP answering every C-STORE with ``status``; records what it stored with success."""

    def __init__(self) -> None:
        self.status = 0xC000
        self.stored: dict[str, str] = {}
        ae = AE(ae_title="STRICTPACS")
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(Verification)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        if self.status == 0x0000:
            self.stored[str(ds.SOPInstanceUID)] = str(ds.Modality)
        return self.status


def test_refusing_destination_ends_dead_with_reason_and_jobs_retry_delivers(
        tmp_path: Path, node_factory: Any) -> None:
    scp = ScriptedStoreScp()
    try:
        config = node_config(tmp_path, destinations={"strict": {"ae_title": "STRICTPACS", "host": "127.0.0.1",
                                                                "port": scp.port}})
        node = node_factory(config)
        files, _ = _phantom(tmp_path)
        _to_node(node, files)
        dead = wait_until(lambda: [j for j in _send_jobs(node) if j["state"] == "dead"], 180, "a dead SEND job")
        assert dead[0]["attempts"] == 1, "a refusal is not retried"
        status = _dicom_node("status", "--config", str(node.config_path))
        assert status.returncode == 0
        assert "dead" in status.stdout and "status 0xC000" in status.stdout, status.stdout
        assert "dicom-node jobs retry --dead" in status.stdout
        assert scp.stored == {}

        scp.status = 0x0000  # the PACS administrator fixed it
        retried = _dicom_node("jobs", "retry", "--dead", "--config", str(node.config_path))
        assert retried.returncode == 0 and "1 job(s) queued again" in retried.stdout
        wait_until(lambda: [j for j in _send_jobs(node) if j["state"] == "done"], 60, "the retried job sent")
        assert sorted(scp.stored.values()) == ["SEG", "SR"]
        assert "status 0xC000" not in _dicom_node("status", "--config", str(node.config_path)).stdout
    finally:
        scp.server.shutdown()


# --------------------------------------------------------------------------- 4. STOW-RS


BEARER_ONLY_FOR_DICOMWEB_LUA = ROUTE_CT_LUA + """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if string.sub(uri, 1, 11) == '/dicom-web/' then
    return httpHeaders['authorization'] == 'Bearer test-stow-token'
  end
  return true
end
"""


def test_stow_rs_to_orthanc_dicomweb_with_a_bearer_token(tmp_path: Path, orthanc_factory: Any,
                                                         node_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("Orthanc")
    if not DICOMWEB_PLUGIN.is_file():
        unavailable(f"{DICOMWEB_PLUGIN} missing: install the Debian package orthanc-dicomweb (make test does)")
    node_port = free_port()
    pacs = orthanc_factory(node_port, lua=BEARER_ONLY_FOR_DICOMWEB_LUA, extra={
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}})
    with pytest.raises(urllib.error.HTTPError) as refused:  # the token is really checked
        urllib.request.urlopen(pacs.url + "/dicom-web/studies", timeout=30)
    assert refused.value.code in (401, 403)
    refused.value.close()

    monkeypatch.setenv("DICOMNODE_TEST_STOW_TOKEN", "test-stow-token")  # inherited by the node process
    config = node_config(tmp_path, port=node_port, destinations={"web": {
        "type": "dicomweb", "url": pacs.url + "/dicom-web/",
        "auth": {"type": "bearer", "token_env": "DICOMNODE_TEST_STOW_TOKEN"}}})
    node = node_factory(config)
    files, study_uid = _phantom(tmp_path)
    _to_node(node, files)

    counts = wait_until(lambda: _results_once(pacs, study_uid), 180, "SEG and SR stored by STOW-RS")
    assert counts == {"SEG": 1, "SR": 1}
    done = wait_until(lambda: [j for j in _send_jobs(node) if j["state"] == "done"], 30, "the SEND job done")
    assert done[0]["destination"] == "web" and done[0]["attempts"] == 1
    # The same study seen through DICOMweb (QIDO-RS), with the token.
    req = urllib.request.Request(f"{pacs.url}/dicom-web/studies/{study_uid}/series",
                                 headers={"Authorization": "Bearer test-stow-token"})
    with urllib.request.urlopen(req, timeout=30) as r:
        series = json.loads(r.read())
    assert sorted(s["00080060"]["Value"][0] for s in series) == ["SEG", "SR"]
    assert "test-stow-token" not in node.log()
