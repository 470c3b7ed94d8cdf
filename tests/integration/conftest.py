"""Real parts for integration tests: Orthanc (Debian package), DCMTK, dciodvfy, the node itself.

Every server listens on a free loopback port.  Under ``CI=true`` a missing
tool is a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tools import free_port, require_tool, wait_until  # noqa: F401  (tests import them from here)

REPO = Path(__file__).resolve().parents[2]


ROUTE_CT_LUA = """
function OnStableSeries(seriesId, tags, metadata)
  local series = ParseJson(RestApiGet('/series/' .. seriesId))
  if series['MainDicomTags']['Modality'] == 'CT' then
    RestApiPost('/modalities/dicomnode/store', seriesId)
  end
end
"""


@dataclass
class Orthanc:
    """A running Orthanc with REST on ``http_port`` and DICOM on ``dicom_port`` (AE ORTHANC)."""

    http_port: int
    dicom_port: int
    proc: subprocess.Popen[bytes]
    workdir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return r.read()

    def post(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read() or b"null")

    def study_id(self, study_uid: str) -> str | None:
        found = self.post("/tools/lookup", study_uid.encode())
        return next((f["ID"] for f in found if f["Type"] == "Study"), None)

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        sid = self.study_id(study_uid)
        return self.get(f"/studies/{sid}/series") if sid else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_orthanc(workdir: Path, node_port: int, *, lua: str = ROUTE_CT_LUA, stable_age: int = 2,
                  http_port: int | None = None, dicom_port: int | None = None,
                  extra: dict[str, Any] | None = None) -> Orthanc:
    """Start Orthanc with a routing rule sending stable series to the node (AE DICOMNODE)."""
    exe = require_tool("Orthanc")
    workdir.mkdir(parents=True, exist_ok=True)
    http_port = http_port or free_port()
    dicom_port = dicom_port or free_port()
    (workdir / "route.lua").write_text(lua)
    config = {
        "Name": "test-pacs",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomModalities": {"dicomnode": ["DICOMNODE", "127.0.0.1", node_port]},
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "StableAge": stable_age,
        "LuaScripts": [str(workdir / "route.lua")],
        "Plugins": [],
        "StorageCompression": False,
        "OverwriteInstances": True,
    }
    config = {k: v for k, v in config.items() if v is not None}
    config.update(extra or {})
    (workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
    with open(workdir / "orthanc.log", "wb") as log:  # the child keeps its own descriptor
        # Orthanc's DICOM layer is DCMTK: without TCP_NODELAY each C-STORE it answers or sends waits ~40 ms on
        # delayed ACK. Its users set it; so do the tests and the benches that use this PACS.
        proc = subprocess.Popen([exe, str(workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, "TCP_NODELAY": "1"})
    orthanc = Orthanc(http_port, dicom_port, proc, workdir)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"Orthanc exited: {(workdir / 'orthanc.log').read_text()[-2000:]}")
        try:
            orthanc.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    wait_until(up, 60, "Orthanc to start")
    return orthanc


@dataclass
class NodeProcess:
    """``dicom-node serve`` as a separate process (so it can be SIGKILLed for real)."""

    config_path: Path
    config: dict[str, Any]
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def port(self) -> int:
        return int(self.config["node"]["port"])

    @property
    def state(self) -> Path:
        return Path(self.config["storage"]["path"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status_json(self) -> list[dict[str, Any]]:
        out = subprocess.run([str(REPO / ".venv/bin/dicom-node"), "status", "--json", "--config",
                              str(self.config_path)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def node_config(tmp: Path, *, port: int | None = None, destinations: dict[str, Any] | None = None,
                quiet_seconds: float = 2.0, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port or free_port()},
        "storage": {"path": str(tmp / "state"), "min_free_mb": 10},
        "completion": {"quiet_seconds": quiet_seconds, "tick_seconds": 0.5},
        "destinations": destinations or {},
        "models": {"lungs": {"type": "builtin", "name": "lungs-ct"}},
        "rules": [{"name": "chest-ct", "when": {"Modality": "CT"}, "run": ["lungs"],
                   "outputs": ["seg", "sr"], "send_to": list((destinations or {}).keys())}],
        "http": {"enabled": True, "host": "127.0.0.1", "port": free_port()},
        "send": {"max_attempts": 5, "backoff_initial_s": 1, "backoff_max_s": 5},
    }
    for key, value in overrides.items():
        config[key] = value
    return config


def start_node(tmp: Path, config: dict[str, Any]) -> NodeProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "node.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = tmp / "node.log"
    with open(log_path, "ab") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([str(REPO / ".venv/bin/dicom-node"), "serve", "--config", str(path)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp)
    node = NodeProcess(path, config, proc, log_path)
    port = node.port

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"dicom-node exited with {proc.returncode}:\n{node.log()[-3000:]}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(up, 120, "dicom-node to listen")
    return node


def storescu(port: int, files: list[Path], aec: str, aet: str = "STORESCU") -> subprocess.CompletedProcess[str]:
    exe = require_tool("storescu")
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run([exe, "-aet", aet, "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, env=env, timeout=300)


def dciodvfy_errors(path: Path) -> list[str]:
    exe = require_tool("dciodvfy")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture()
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    started: list[Orthanc] = []

    def factory(node_port: int, **kw: Any) -> Orthanc:
        o = start_orthanc(tmp_path / f"orthanc{len(started)}", node_port, **kw)
        started.append(o)
        return o

    yield factory
    for o in started:
        o.stop()


@pytest.fixture()
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    started: list[NodeProcess] = []

    def factory(config: dict[str, Any], name: str = "node") -> NodeProcess:
        n = start_node(tmp_path / name, config)
        started.append(n)
        return n

    yield factory
    for n in started:
        n.stop()


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable
