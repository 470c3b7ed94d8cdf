"""HTTP endpoints: ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus text format)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dicom_node.http.metrics import Metrics

logger = logging.getLogger(__name__)


class HttpServer:
    """A small threaded HTTP server bound to ``http.host:http.port`` (localhost by default).

    Parameters
    ----------
    readiness:
        Returns ``(ready, checks)``: whether the node can take work, and per check a short text.
    refresh:
        Called before ``/metrics`` is rendered (updates gauges from the database).
    """

    def __init__(self, host: str, port: int, metrics: Metrics,
                 readiness: Callable[[], tuple[bool, dict[str, str]]],
                 refresh: Callable[[], None]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("http: " + format, *args)

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif path == "/readyz":
                    ready, checks = outer.readiness()
                    self._send(200 if ready else 503, json.dumps({"ready": ready, "checks": checks}).encode(),
                               "application/json")
                elif path == "/metrics":
                    outer.refresh()
                    self._send(200, generate_latest(outer.metrics.registry), CONTENT_TYPE_LATEST)
                else:
                    self._send(404, b"not found\n", "text/plain")

        self.metrics = metrics
        self.readiness = readiness
        self.refresh = refresh
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()
        logger.info("HTTP on http://%s:%d (/healthz /readyz /metrics)", *self.address)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
