"""HTTP endpoints: health, readiness, Prometheus metrics, the status page and its thumbnails.

=====================================  ==================================================
``/healthz``                           200 while the process runs (never needs the token)
``/readyz``                            200 or 503 with the checks as JSON
``/metrics``                           Prometheus text format
``/`` and ``/status``                  the status page (HTML)
``/thumbnails/<series-uid>/<model>.png``  overlay thumbnail of one result
=====================================  ==================================================

With ``http.token`` set, every endpoint but ``/healthz`` needs
``Authorization: Bearer <token>`` (Prometheus' ``authorization`` setting) or
HTTP Basic with the token as password (what a browser prompts for).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dicom_node.errors import InvalidUIDError
from dicom_node.http.metrics import Metrics
from dicom_node.http.thumbnail import ThumbnailError

logger = logging.getLogger(__name__)

# Only the shape is matched here; the UID and the model name are validated again where paths are built.
_THUMB_RE = re.compile(r"^/thumbnails/([0-9.]{1,64})/([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\.png$")


def token_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (Bearer, or Basic password), in constant time."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.encode(), token.encode())
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(decoded.partition(":")[2].encode(), token.encode())
    return False


class _BoundedServer(ThreadingHTTPServer):
    """A threading HTTP server that serves at most ``max_connections`` connections at once.

    A connection beyond the cap is closed at once (logged, at most once a
    minute), so a flood of idle or slow clients costs no thread and cannot
    starve ``/healthz``, ``/readyz`` or ``/metrics`` past its request deadline.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int) -> None:
        self.max_connections = max_connections
        self._active = 0
        self._active_lock = threading.Lock()
        self._last_refusal_log = 0.0
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            full = self._active >= self.max_connections
            if not full:
                self._active += 1
        if full:
            now = time.monotonic()
            if now - self._last_refusal_log > 60.0:
                self._last_refusal_log = now
                logger.warning("Audit: HTTP connection from %s closed: %d connections open (http.max_connections)",
                               client_address[0], self.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._active_lock:
            self._active -= 1


class HttpServer:
    """A small threaded HTTP server bound to ``http.host:http.port`` (localhost by default).

    Parameters
    ----------
    readiness:
        Returns ``(ready, checks)``: whether the node can take work, and per check a short text.
    refresh:
        Called before ``/metrics`` is rendered (updates gauges from the database).
    status_page:
        Renders the status page (HTML bytes); ``None`` disables it.
    thumbnail:
        ``(series_uid, model) -> PNG bytes``; raises :class:`ThumbnailError` or
        :class:`~dicom_node.errors.InvalidUIDError`.
    token:
        ``http.token``: required on every endpoint but ``/healthz`` when set.
    request_timeout_s:
        ``http.request_timeout_s``: a client has this long from connecting to
        the end of its request headers, and each read or write of the socket
        may take this long; then the connection is closed (slowloris).
    max_connections:
        ``http.max_connections``: connections served at once; more are closed.
    """

    def __init__(self, host: str, port: int, metrics: Metrics,
                 readiness: Callable[[], tuple[bool, dict[str, str]]],
                 refresh: Callable[[], None],
                 status_page: Callable[[], bytes] | None = None,
                 thumbnail: Callable[[str, str], bytes] | None = None,
                 token: str | None = None, request_timeout_s: float = 10.0, max_connections: int = 64) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "dicom-node"
            timeout = request_timeout_s  # every recv/send of the socket (StreamRequestHandler.setup)

            def handle(self) -> None:
                # One deadline for the request line and headers, however slowly they trickle in.
                deadline = threading.Timer(request_timeout_s, self._cut)
                deadline.daemon = True
                deadline.start()
                self._deadline = deadline
                try:
                    super().handle()
                except OSError:
                    logger.debug("HTTP connection from %s closed at its deadline", self.client_address[0])
                finally:
                    deadline.cancel()

            def parse_request(self) -> bool:
                parsed = super().parse_request()
                self._deadline.cancel()  # headers complete: the per-read timeout covers the rest
                return parsed

            def _cut(self) -> None:
                logger.info("HTTP client %s: no complete request within %.0f s (http.request_timeout_s); "
                            "connection closed", self.client_address[0], request_timeout_s)
                try:
                    self.request.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already gone

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("http: " + format, *args)

            def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self) -> None:  # noqa: N802 (http.server API)
                self.do_GET()

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                try:
                    self._route(self.path.split("?", 1)[0])
                except Exception:
                    logger.exception("HTTP %s failed", self.path.split("?", 1)[0][:100])
                    self._send(500, b"internal error (see the node's log)\n", "text/plain")

            def _route(self, path: str) -> None:
                if path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                    return
                if outer.token is not None and not token_matches(self.headers.get("Authorization"), outer.token):
                    self._send(401, b"token required\n", "text/plain",
                               {"WWW-Authenticate": 'Basic realm="dicom-node", charset="UTF-8"'})
                    return
                if path == "/readyz":
                    ready, checks = outer.readiness()
                    self._send(200 if ready else 503, json.dumps({"ready": ready, "checks": checks}).encode(),
                               "application/json")
                elif path == "/metrics":
                    outer.refresh()
                    self._send(200, generate_latest(outer.metrics.registry), CONTENT_TYPE_LATEST)
                elif path in ("/", "/status") and outer.status_page is not None:
                    self._send(200, outer.status_page(), "text/html; charset=utf-8")
                elif (m := _THUMB_RE.match(path)) and outer.thumbnail is not None:
                    try:
                        png = outer.thumbnail(m.group(1), m.group(2))
                    except InvalidUIDError as exc:
                        self._send(400, f"{exc}\n".encode(), "text/plain")
                        return
                    except ThumbnailError as exc:
                        logger.info("Thumbnail: %s", exc)
                        self._send(404, f"{exc}\n".encode(), "text/plain")
                        return
                    self._send(200, png, "image/png")
                else:
                    self._send(404, b"not found\n", "text/plain")

        self.metrics = metrics
        self.readiness = readiness
        self.refresh = refresh
        self.status_page = status_page
        self.thumbnail = thumbnail
        self.token = token
        self.httpd = _BoundedServer((host, port), Handler, max_connections)
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()
        logger.info("HTTP on http://%s:%d (/healthz /readyz /metrics /status)%s", *self.address,
                    "; token required" if self.token else "")

    def stop(self) -> None:
        """Stop serving (if started) and close the listening socket."""
        if self._thread.is_alive():
            self.httpd.shutdown()  # waits for serve_forever to return: only once it runs
        self.httpd.server_close()
