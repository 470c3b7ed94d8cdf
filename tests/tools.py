"""External tools the tests run (Orthanc, DCMTK, dciodvfy...): fail under ``CI=true``, skip elsewhere."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest


def unavailable(reason: str) -> NoReturn:
    """A test cannot run here: a failure under ``CI=true`` (CI must test everything), a skip elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


#: The node's command line as ``make test`` installs it.
NODE_CLI = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "dicom-node"


def node_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``dicom-node ARGS`` as a user runs it (no PYTHONPATH from the test run, no standard input)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(NODE_CLI), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def require_node_cli() -> Path:
    """The installed ``dicom-node`` (fails under ``CI=true``, skips elsewhere, when ``make test`` has not run)."""
    if not NODE_CLI.exists():
        unavailable(f"{NODE_CLI} not found: run make test (it installs the node into .venv)")
    return NODE_CLI


def require_tool(name: str) -> str:
    """Path of an external tool on ``PATH`` (see :func:`unavailable` when it is missing)."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not found: install the Debian packages orthanc, dcmtk, dicom3tools (make test does)")
    return path


def closed_within(sock: socket.socket, limit_s: float) -> float:
    """Seconds until the peer closes ``sock`` (read to EOF or reset); fails the test past ``limit_s``."""
    start = time.monotonic()
    sock.settimeout(limit_s)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        pytest.fail(f"the connection was kept open for more than {limit_s:.1f} s")
    return time.monotonic() - start


def trickle_until_closed(sock: socket.socket, chunks: list[bytes], pause_s: float) -> tuple[bool, float]:
    """Send ``chunks`` one at a time, waiting up to ``pause_s`` for an answer after each (a slow client).

    Returns whether the peer closed the connection before the chunks ran out, and the seconds it took.
    """
    start = time.monotonic()
    sock.settimeout(pause_s)
    for chunk in chunks:
        try:
            sock.sendall(chunk)
            if sock.recv(1) == b"":
                return True, time.monotonic() - start
        except TimeoutError:
            continue
        except OSError:  # reset or broken pipe: closed
            return True, time.monotonic() - start
    return False, time.monotonic() - start


#: Ports :func:`free_port` handed out in this process: the kernel may give a just-closed port again.
_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, never one already handed out in this test process."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll an external process's state (a server starting, a PACS receiving) until true."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
