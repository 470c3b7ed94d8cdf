"""The OHIF viewer in the tests: its prebuilt dist, Orthanc's DICOMweb behind one origin, Debian's chromium.

``make test`` unpacks npm's ``@ohif/app`` dist under ``.cache/ohif-<version>/dist``.
:class:`ViewerServer` serves it and forwards ``/dicom-web/`` and ``/wado`` to
Orthanc's DICOMweb plugin on the same origin, passing the Host header on so that
the bulk-data URLs Orthanc writes point at this origin (the browser refuses
others).  :func:`browser` drives chromium headless through playwright
(``executable_path``: no browser download); OHIF exposes ``window.services``.
"""

from __future__ import annotations

import http.client
import json
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.tools import unavailable

REPO = Path(__file__).resolve().parents[1]
OHIF_VERSION = "3.13.2"
DIST = REPO / ".cache" / f"ohif-{OHIF_VERSION}" / "dist"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

#: Orthanc configuration for its DICOMweb plugin (merged into the test Orthanc's).
ORTHANC_DICOMWEB = {
    "Plugins": [DICOMWEB_PLUGIN],
    "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                 "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
}

_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: false,
  strictZSpacingForVolumeViewport: true,
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (test PACS)', name: 'orthanc',
      wadoUriRoot: '%(origin)s/wado', qidoRoot: '%(origin)s/dicom-web', wadoRoot: '%(origin)s/dicom-web',
      qidoSupportsIncludeField: false, imageRendering: 'wadors', thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true, supportsFuzzyMatching: false, supportsWildcard: true,
      singlepart: 'bulkdata,video', bulkDataURI: {enabled: true}, omitQuotationForMultipartRequest: true,
    },
  }],
};
"""


def require_viewer() -> tuple[Path, str]:
    """The OHIF dist and the chromium binary (fails under ``CI=true``, skips elsewhere, when missing)."""
    if not (DIST / "index.html").is_file():
        unavailable(f"the OHIF viewer is not unpacked in {DIST.parent}: run make ohif (make test does)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        unavailable("chromium not found: install the Debian package chromium (make test does, as root)")
    if not Path(DICOMWEB_PLUGIN).is_file():
        unavailable(f"{DICOMWEB_PLUGIN} not found: install the Debian package orthanc-dicomweb")
    try:
        import playwright  # noqa: F401
    except ImportError:
        unavailable("playwright (Python) is not installed: make test installs it")
    return DIST, chromium


class ViewerServer:
    """OHIF's dist and Orthanc's DICOMweb on one loopback origin."""

    def __init__(self, dist: Path, orthanc_http_port: int) -> None:
        self.dist, self.orthanc = dist.resolve(), orthanc_http_port
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.startswith(("/dicom-web/", "/wado")):
                    server._forward(self)
                else:
                    server._static(self)

            do_HEAD = do_GET

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.origin = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="ohif-server")
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _forward(self, request: BaseHTTPRequestHandler) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.orthanc, timeout=120)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("connection", "keep-alive")}
        conn.request(request.command, request.path, headers=headers)  # Host passes on: URLs name this origin
        answer = conn.getresponse()
        body = answer.read()
        request.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "keep-alive"):
                request.send_header(key, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(body)
        conn.close()

    def _static(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.split("?", 1)[0]
        if path == "/app-config.js":
            body, kind = (_CONFIG % {"origin": self.origin}).encode(), "application/javascript"
        else:
            target = (self.dist / path.lstrip("/")).resolve()
            if not target.is_file() or self.dist not in target.parents:
                target = self.dist / "index.html"  # the viewer's own routes (/viewer?...)
            body = target.read_bytes()
            kind = {".js": "application/javascript", ".css": "text/css", ".wasm": "application/wasm",
                    ".html": "text/html", ".json": "application/json", ".svg": "image/svg+xml",
                    ".png": "image/png", ".ico": "image/x-icon"}.get(target.suffix, "application/octet-stream")
        request.send_response(200)
        request.send_header("Content-Type", kind)
        request.send_header("Content-Length", str(len(body)))
        request.send_header("Cross-Origin-Opener-Policy", "same-origin")
        request.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(body)


@contextmanager
def browser(chromium: str) -> Iterator[Any]:
    """A headless chromium page (1280x900) that records console errors and page errors on ``page.errors``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"])
        try:
            page = launched.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
            page.errors = errors  # type: ignore[attr-defined]
            yield page
        finally:
            launched.close()


def wait_for_services(page: Any, timeout_ms: int = 120_000) -> None:
    page.wait_for_function("() => window.services && window.services.displaySetService", timeout=timeout_ms)


def display_sets(page: Any) -> list[dict[str, Any]]:
    """The viewer's display sets: modality, series UID, instance count, display set UID."""
    return json.loads(page.evaluate("""() => JSON.stringify(window.services.displaySetService.getActiveDisplaySets()
        .map(d => ({Modality: d.Modality, SeriesInstanceUID: d.SeriesInstanceUID, uid: d.displaySetInstanceUID,
                    count: (d.instances || []).length, isLoaded: !!d.isLoaded})))"""))
