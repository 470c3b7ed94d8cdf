"""Hostile input on the HTTP port and in the configuration: real sockets, the real CLI.

- A slowloris client (headers trickling in) is cut at ``http.request_timeout_s``.
- Past ``http.max_connections`` a connection is closed at once, and the
  endpoints answer again as soon as the idle ones reach their deadline.
- YAML booleans are never numbers (``port: yes``, ``min_free_mb: no``): exit 2.
- An alias bomb is refused in well under a second, before anything walks it.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.errors import ConfigError
from dicom_node.http.metrics import Metrics
from dicom_node.http.server import HttpServer
from dicom_node.settings import load_settings_text
from tests.integration.conftest import REPO
from tests.tools import closed_within, trickle_until_closed

pytestmark = pytest.mark.integration

DEADLINE_S = 1.0


@pytest.fixture()
def http() -> Iterator[HttpServer]:
    server = HttpServer("127.0.0.1", 0, Metrics(), lambda: (True, {}), lambda: None,
                        request_timeout_s=DEADLINE_S, max_connections=4)
    server.start()
    yield server
    server.stop()


def _healthz(server: HttpServer) -> int:
    with urllib.request.urlopen(f"http://{server.address[0]}:{server.address[1]}/healthz", timeout=5) as r:
        return int(r.status)


def test_slowloris_is_cut_at_the_request_deadline(http: HttpServer) -> None:
    with socket.create_connection(http.address) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        # one header byte every 0.2 s: each read is quick, the request never ends
        closed, elapsed = trickle_until_closed(sock, [b"X"] * 20, 0.2)
    assert closed, "a trickling client was never cut"
    assert DEADLINE_S * 0.8 <= elapsed <= DEADLINE_S + 1.0, elapsed
    assert _healthz(http) == 200


def test_connections_past_the_cap_are_closed_and_the_server_recovers(http: HttpServer) -> None:
    idle = [socket.create_connection(http.address) for _ in range(4)]
    time.sleep(0.1)  # let the server take the four (each one holds a thread until its deadline)
    try:
        with socket.create_connection(http.address) as extra:
            assert closed_within(extra, 0.5) < 0.5, "the fifth connection was not closed at once"
        for sock in idle:
            assert closed_within(sock, DEADLINE_S + 1.0) <= DEADLINE_S + 1.0
    finally:
        for sock in idle:
            sock.close()
    assert _healthz(http) == 200


@pytest.mark.parametrize(("yaml_text", "key"), [
    ("node: {port: yes}\n", "node.port"),
    ("storage: {min_free_mb: no}\n", "storage.min_free_mb"),
    ("http: {enabled: 1}\n", "http.enabled"),
    ("completion: {quiet_seconds: '30'}\n", "completion.quiet_seconds"),
    ("send: {max_attempts: on}\n", "send.max_attempts"),
])
def test_check_config_refuses_booleans_as_numbers_and_the_reverse(tmp_path: Path, yaml_text: str, key: str) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(yaml_text)
    run = subprocess.run([str(REPO / ".venv/bin/dicom-node"), "check-config", str(path)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert run.returncode == 2, run.stdout + run.stderr
    (line,) = run.stderr.splitlines()
    assert line.startswith(f"configuration error: {path}:1: {key}: expected "), line


def test_an_alias_bomb_is_refused_in_well_under_a_second() -> None:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi"):  # 9^9 = 387,420,489 leaves once expanded
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"expands to more than 100000 values through YAML aliases"):
        load_settings_text("\n".join(lines) + "\n", "bomb.yaml")
    assert time.monotonic() - start < 1.0


def test_an_oversized_configuration_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"at most 1048576 are read"):
        load_settings_text("# " + "x" * (1024 * 1024) + "\n", "huge.yaml")


def test_a_few_aliases_are_still_fine() -> None:
    text = ("destinations:\n  pacs: &pacs {ae_title: PACS, host: 127.0.0.1, port: 4242}\n"
            "  backup: *pacs\n")
    settings = load_settings_text(text, "aliases.yaml")
    assert settings.destinations["backup"] == settings.destinations["pacs"]
