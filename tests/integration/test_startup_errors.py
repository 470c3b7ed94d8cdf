"""Every start-up failure ends in one line naming the key to change, with exit code 2.

Each test starts the real ``dicom-node serve`` (or ``check-config``) as a new
user would, with a real fault: a port held by another socket, a port the
user may not bind, a state directory under a file or not writable, a state
directory another node holds, TLS files that cannot be read.  Faults that
need an unprivileged user (root may bind any port and write anywhere) run
the node as ``nobody`` through util-linux's ``setpriv`` when the suite runs as root.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import REPO, free_port
from tests.tools import unavailable

NOBODY = 65534


def _config(tmp_path: Path, **sections: Any) -> Path:
    config: dict[str, Any] = {
        "node": {"host": "127.0.0.1", "port": free_port(), "receivers": 1},
        "storage": {"path": str(tmp_path / "state"), "min_free_mb": 0},
        "http": {"host": "127.0.0.1", "port": free_port()},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o644)
    return path


def _as_nobody() -> list[str]:
    """A command prefix that drops root to ``nobody`` (empty when not root)."""
    if os.getuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        unavailable("setpriv not found: install the Debian package util-linux")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]


def _run(args: list[str], prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [*(prefix or []), str(REPO / ".venv/bin/dicom-node"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          cwd="/", check=False)


def _one_line(run: subprocess.CompletedProcess[str], start: str) -> str:
    """The single line the failed start printed on stderr; it must begin with ``start``."""
    assert run.returncode == 2, f"exit {run.returncode}, stderr:\n{run.stderr}"
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{run.stderr}"
    assert "Traceback" not in run.stderr
    assert lines[0].startswith(start), lines[0]
    return lines[0]


def _open_for_nobody(tmp_path: Path) -> None:
    """Let ``nobody`` reach the test's files (pytest's tmp dirs are private to root)."""
    for folder in [tmp_path, *tmp_path.parents]:
        if folder == Path("/"):
            break
        folder.chmod(folder.stat().st_mode | 0o711)


@pytest.mark.parametrize("receivers", [1, 2])
def test_dicom_port_in_use(tmp_path: Path, receivers: int) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = _config(tmp_path, node={"port": port, "receivers": receivers})
        line = _one_line(_run(["serve", "--config", str(config)]), "cannot start: node.port: ")
    assert f"127.0.0.1:{port} is already in use by another process" in line
    assert "choose another node.port" in line


def test_http_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        line = _one_line(_run(["serve", "--config", str(_config(tmp_path, http={"port": port}))]),
                         "cannot start: http.port: ")
    assert "already in use" in line and "choose another http.port" in line


def test_dicom_port_not_permitted(tmp_path: Path) -> None:
    _open_for_nobody(tmp_path)
    config = _config(tmp_path, node={"port": 104}, storage={"path": str(tmp_path / "open")})
    (tmp_path / "open").mkdir(mode=0o777)
    (tmp_path / "open").chmod(0o777)
    line = _one_line(_run(["serve", "--config", str(config)], _as_nobody()), "cannot start: node.port: ")
    assert "not permitted to listen on port 104" in line and "CAP_NET_BIND_SERVICE" in line


def test_dicom_host_not_of_this_machine(tmp_path: Path) -> None:
    config = _config(tmp_path, node={"host": "192.0.2.1"})  # TEST-NET-1: never a local address
    line = _one_line(_run(["serve", "--config", str(config)]), "cannot start: node.host: ")
    assert "192.0.2.1 is not an address of this machine" in line


def test_storage_path_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a directory")
    config = _config(tmp_path, storage={"path": str(tmp_path / "afile" / "state")})
    line = _one_line(_run(["serve", "--config", str(config)]), "cannot start: storage.path: ")
    assert "which is a file, not a directory" in line
    check = _run(["check-config", str(config)])
    assert check.returncode == 2 and "storage.path:" in check.stderr and "is a file" in check.stderr
    same = _run(["check-config", "--config", str(config)])  # as serve, status and rules take it
    assert same.returncode == 2 and same.stderr == check.stderr


def test_storage_path_not_writable(tmp_path: Path) -> None:
    _open_for_nobody(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)
    config = _config(tmp_path, storage={"path": str(locked / "state")})
    line = _one_line(_run(["serve", "--config", str(config)], _as_nobody()), "cannot start: storage.path: ")
    assert "not writable by this user" in line
    check = _run(["check-config", str(config)], _as_nobody())
    assert check.returncode == 2, check.stdout + check.stderr
    assert check.stderr.count("\n") == 1 and "storage.path:" in check.stderr and "not writable" in check.stderr


def test_state_directory_held_by_another_node(tmp_path: Path) -> None:
    config = _config(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    with open(state / "node.lock", "w") as lock:  # what a running node holds (store/layout.py)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("4242\n")
        lock.flush()
        line = _one_line(_run(["serve", "--config", str(config)]), "cannot start: storage.path: ")
    assert "another dicom-node (pid 4242) is running on" in line


def test_tls_certificate_unreadable(tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    config = _config(tmp_path, node={"tls": {"certificate": str(tmp_path / "missing.crt"), "private_key": str(key)}})
    line = _one_line(_run(["serve", "--config", str(config)]), "cannot start: node.tls.certificate: ")
    assert "missing.crt" in line and "No such file" in line


def test_tls_certificate_unreadable_with_receiver_processes(tmp_path: Path) -> None:
    config = _config(tmp_path, node={"receivers": 2, "tls": {"certificate": str(tmp_path / "missing.crt"),
                                                             "private_key": str(tmp_path / "missing.key")}})
    _one_line(_run(["serve", "--config", str(config)]), "cannot start: node.tls.certificate: ")
