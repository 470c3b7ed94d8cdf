"""STOW-RS client against a small local HTTP server: answers, auth headers, secrets, health probe."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_node.errors import SendError
from dicom_node.send.dicomweb import http_probe, stow_files
from dicom_node.settings import DicomwebDestination


class _Service(ThreadingHTTPServer):
    """Answers every request with ``status`` and ``body``; records method, path, headers and body size."""

    status = 200
    body: dict[str, Any] | None = None
    requests: list[tuple[str, str, dict[str, str], int]]


class _Handler(BaseHTTPRequestHandler):
    server: _Service

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length", 0) or 0)
        if self.headers.get("Transfer-Encoding", "") == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                data += self.rfile.read(size)
                self.rfile.readline()
            length = len(data)
        else:
            self.rfile.read(length)
        self.server.requests.append((self.command, self.path, dict(self.headers.items()), length))
        payload = json.dumps(self.server.body).encode() if self.server.body is not None else b""
        self.send_response(self.server.status)
        if payload:
            self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_POST = _answer
    do_GET = _answer

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass


@pytest.fixture()
def service() -> Iterator[_Service]:
    server = _Service(("127.0.0.1", 0), _Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture()
def ct_file(tmp_path: Path) -> Path:
    src = get_testdata_file("CT_small.dcm")
    assert src is not None
    return Path(shutil.copy(src, tmp_path / "ct.dcm"))


def _dest(service: _Service, **kw: Any) -> DicomwebDestination:
    host, port = service.server_address[:2]
    return DicomwebDestination.model_validate({"type": "dicomweb", "url": f"http://{host}:{port}/dicom-web/",
                                               "timeout_s": 10, **kw})


def _sop_item(uid: str, **extra: Any) -> dict[str, Any]:
    item = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
            "00081155": {"vr": "UI", "Value": [uid]}}
    item.update(extra)
    return item


def test_stored_objects_are_counted_and_posted_to_their_study(service: _Service, ct_file: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ds = pydicom.dcmread(ct_file)
    monkeypatch.setenv("TEST_STOW_TOKEN", "s3cret-token\n")
    service.body = {"00081199": {"vr": "SQ", "Value": [_sop_item(ds.SOPInstanceUID)]}}
    report = stow_files([ct_file], _dest(service, auth={"type": "bearer", "token_env": "TEST_STOW_TOKEN"}))
    assert report.sent == 1 and report.warnings == ()
    method, path, headers, size = service.requests[0]
    assert method == "POST" and path == f"/dicom-web/studies/{ds.StudyInstanceUID}"
    assert headers["Authorization"] == "Bearer s3cret-token"
    assert headers["Content-Type"].startswith("multipart/related") and size > ct_file.stat().st_size


def test_basic_auth_password_from_a_file(service: _Service, ct_file: Path, tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("pa55word\n")
    auth = {"type": "basic", "username": "node", "password_file": str(tmp_path / "pw")}
    stow_files([ct_file], _dest(service, auth=auth))
    expected = base64.b64encode(b"node:pa55word").decode()
    assert service.requests[0][2]["Authorization"] == f"Basic {expected}"


def test_missing_secret_is_permanent_and_names_the_variable_not_the_secret(
        service: _Service, ct_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_STOW_TOKEN", raising=False)
    with pytest.raises(SendError) as info:
        stow_files([ct_file], _dest(service, auth={"type": "bearer", "token_env": "TEST_STOW_TOKEN"}))
    assert not info.value.retryable and "TEST_STOW_TOKEN is not set" in str(info.value)
    assert service.requests == []


def test_warning_reason_is_reported(service: _Service, ct_file: Path) -> None:
    uid = pydicom.dcmread(ct_file).SOPInstanceUID
    service.body = {"00081199": {"vr": "SQ", "Value": [_sop_item(uid, **{"00081196": {"vr": "US",
                                                                                      "Value": [0xB000]}})]}}
    assert stow_files([ct_file], _dest(service)).warnings == ("0xB000",)


@pytest.mark.parametrize(("status", "reason", "retryable", "words"), [
    (409, 0xC000, False, "0xC000"),
    (202, 0xC000, False, "refused 1 object(s)"),
    (202, 0xA700, True, "0xA700"),
    (503, None, True, "HTTP 503"),
    (500, None, True, "HTTP 500"),
    (429, None, True, "HTTP 429"),
    (400, None, False, "HTTP 400"),
    (401, None, False, "not authorised"),
    (403, None, False, "not authorised"),
])
def test_answers_map_to_retry_or_dead_letter(service: _Service, ct_file: Path, status: int, reason: int | None,
                                             retryable: bool, words: str) -> None:
    service.status = status
    if reason is not None:
        uid = pydicom.dcmread(ct_file).SOPInstanceUID
        service.body = {"00081198": {"vr": "SQ", "Value": [_sop_item(uid, **{"00081197": {"vr": "US",
                                                                                          "Value": [reason]}})]}}
    with pytest.raises(SendError) as info:
        stow_files([ct_file], _dest(service))
    assert info.value.retryable is retryable
    assert words in str(info.value)


def test_unreachable_service_is_retryable_and_probe_says_why(ct_file: Path, service: _Service) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = DicomwebDestination(type="dicomweb", url=f"http://127.0.0.1:{port}/dicom-web", timeout_s=5)
    with pytest.raises(SendError) as info:
        stow_files([ct_file], dead)
    assert info.value.retryable and "unreachable" in str(info.value)
    assert http_probe(dead) == "ConnectionError"
    service.status = 404  # a base URL that is no resource still proves the service is up
    assert http_probe(_dest(service)) == ""
    service.status = 503
    assert http_probe(_dest(service)) == "HTTP 503"
    assert [r[0] for r in service.requests] == ["GET", "GET"]
