"""Receive speed: 200 CT slices of 512x512 sent to the node, Orthanc and DCMTK storescp, side by side.

``python -m bench receive [--slices N] [--rounds R] [--keep]``

The sender is DCMTK ``storescu`` (``TCP_NODELAY=1``), once over one association
(all slices) and once over 4 concurrent associations (a quarter each), against:

* the node: ``dicom-node serve`` with no rules (so only receiving is measured);
  every instance is fsynced and committed (SQLite ``synchronous=FULL``) before
  its 0x0000, as in production;
* Orthanc (Debian package), no Lua, storage uncompressed;
* DCMTK ``storescp --fork`` writing into a temporary folder.

Each run sends a fresh series (new UIDs), so no target sees duplicates.  Prints
seconds, instances/s and MB/s per run, the ratios node/Orthanc and
node/storescp (time; <= 1.0 means the node is as fast or faster) and the
4-association speed-up over one association of each target.  Targets: node/Orthanc
<= 1.0 and node/storescp <= 3 over one association; 4 associations >= 1.5x one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SystemExit(f"{name} not found: install the Debian packages orthanc and dcmtk")
    return path


def make_series(work: Path, count: int, runs: int) -> list[list[Path]]:
    """``runs`` CT series of ``count`` 512x512 slices each (same pixels, fresh UIDs per series)."""
    from tests.phantoms import write_ct_series

    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:count, 0:512, 0:512].astype(np.float32)
    body = ((y - 256) ** 2 / 200**2 + (x - 256) ** 2 / 230**2) < 1
    hu = np.where(body, 40.0 + 30.0 * np.sin(z / 9.0), -1000.0)
    hu = (hu + rng.normal(0, 15, hu.shape)).astype(np.int16)
    series = []
    for i in range(runs):
        series.append(write_ct_series(hu, (1.0, 0.7, 0.7), work / f"series{i}", series_number=i + 1,
                                      patient_id="BENCH", patient_name="Bench^Receive"))
    return series


class Target:
    """A receiver under test: start, its port and AE title, stop."""

    name = ""
    ae_title = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """How this target is configured, as its own users would run it (printed with the figures)."""
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _spawn(self, argv: list[str], **kw: Any) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.work / "log.txt", "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        _wait_port(self.port, self.proc, self.name)


class Node(Target):
    name, ae_title = "node", "DICOMNODE"

    def start(self) -> None:
        config = {
            "node": {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port, "max_associations": 16},
            "storage": {"path": str(self.work / "state"), "min_free_mb": 1},
            "http": {"enabled": False},
            "logging": {"level": "WARNING"},
            "rules": [],
        }
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "node.yaml").write_text(yaml.safe_dump(config))
        self._spawn([str(REPO / ".venv/bin/dicom-node"), "serve", "--config", str(self.work / "node.yaml")],
                    cwd=self.work)

    def describe(self) -> str:
        return ("dicom-node serve, embedded defaults but no rules: node.receivers auto, max PDU 128 kB, every "
                "instance appended to the intake journal and fdatasynced before 0x0000 (files fsynced and rows "
                "committed to SQLite, rollback journal, synchronous=FULL, in batches behind)")


class Orthanc(Target):
    name, ae_title = "Orthanc", "ORTHANC"

    def start(self) -> None:
        import json

        config = {
            "Name": "bench", "StorageDirectory": str(self.work / "storage"),
            "IndexDirectory": str(self.work / "storage"), "HttpPort": _free_port(), "DicomPort": self.port,
            "DicomAet": self.ae_title, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False, "Plugins": [], "LuaScripts": [],
            "StorageCompression": False, "DicomThreadsCount": 4,
        }
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "orthanc.json").write_text(json.dumps(config))
        # Orthanc's DICOM layer is DCMTK: without TCP_NODELAY every C-STORE response waits ~40 ms on
        # delayed ACK. Orthanc's users set it (its documentation and packagers do); so does this bench.
        self._spawn([_tool("Orthanc"), str(self.work / "orthanc.json")], env={**os.environ, "TCP_NODELAY": "1"})

    def describe(self) -> str:
        return ("Debian Orthanc, TCP_NODELAY=1, SQLite index, no compression, 4 DICOM threads, no plugins, "
                "MaximumPduLength default (16 kB) (its own durability: no fsync per instance)")


class StoreScp(Target):
    name, ae_title = "storescp", "STORESCP"

    def start(self) -> None:
        out = self.work / "out"
        out.mkdir(parents=True, exist_ok=True)
        self._spawn([_tool("storescp"), "--fork", "-aet", self.ae_title, "-od", str(out), str(self.port)],
                    env={**os.environ, "TCP_NODELAY": "1"})

    def describe(self) -> str:
        return ("DCMTK storescp --fork, TCP_NODELAY=1, max PDU default (16 kB), files written without fsync, "
                "no database")


def send(target: Target, files: list[Path], associations: int) -> float:
    """Seconds to C-STORE ``files`` over ``associations`` concurrent storescu processes."""
    exe = _tool("storescu")
    chunks = [files[i::associations] for i in range(associations)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([exe, "-aet", "BENCHSCU", "-aec", target.ae_title, "127.0.0.1", str(target.port),
                               *map(str, chunk)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
             for chunk in chunks]
    outputs = [p.communicate()[0] for p in procs]
    seconds = time.perf_counter() - t0
    for p, out in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {target.name} failed ({p.returncode}): {out.decode()[-800:]}")
    return seconds


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench receive", description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200, help="slices per series (default 200)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat each measurement; median reported")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    targets: list[Target] = [Node(work / "node"), Orthanc(work / "orthanc"), StoreScp(work / "storescp")]
    try:
        t0 = time.perf_counter()
        series = make_series(work / "data", args.slices, 2 * args.rounds * len(targets) + len(targets))
        size_mb = sum(f.stat().st_size for f in series[0]) / 1e6
        print(f"data: {len(series)} series of {args.slices} CT slices 512x512 ({size_mb:.0f} MB each), "
              f"made in {time.perf_counter() - t0:.0f} s; sender: DCMTK storescu, TCP_NODELAY=1")
        for t in targets:
            t.start()
            print(f"{t.name}: {t.describe()}")
        results: dict[tuple[str, int], list[float]] = {}
        fresh = iter(series)
        for t in targets:  # warm-up, not timed: every target's first association (imports, caches, files)
            send(t, next(fresh)[:20], 4)
        for _ in range(args.rounds):
            for assocs in (1, 4):
                for t in targets:  # interleaved, so a busy moment of the machine hits every target
                    results.setdefault((t.name, assocs), []).append(send(t, next(fresh), assocs))
        median: Callable[[str, int], float] = lambda name, a: statistics.median(results[(name, a)])
        print(f"{'target':<10}{'assocs':>7}{'seconds':>9}{'inst/s':>9}{'MB/s':>8}   range (median of {args.rounds})")
        for assocs in (1, 4):
            for t in targets:
                s = median(t.name, assocs)
                runs = results[(t.name, assocs)]
                print(f"{t.name:<10}{assocs:>7}{s:>9.2f}{args.slices / s:>9.1f}{size_mb / s:>8.1f}   "
                      f"{min(runs):.2f}-{max(runs):.2f} s")
        for assocs in (1, 4):
            node = median("node", assocs)
            print(f"{assocs} assoc: node/Orthanc = {node / median('Orthanc', assocs):.2f}   "
                  f"node/storescp = {node / median('storescp', assocs):.2f}   (time ratio; <= 1.0: node as fast)")
        for t in targets:
            print(f"{t.name}: 4 associations are {median(t.name, 1) / median(t.name, 4):.2f}x one association")
        ok1 = median("node", 1) <= median("Orthanc", 1)
        ok3 = median("node", 1) <= 3 * median("storescp", 1)
        ok4 = median("node", 1) / median("node", 4) >= 1.5
        print(f"targets: node/Orthanc <= 1.0 single association: {'met' if ok1 else 'MISSED'}; "
              f"node/storescp <= 3 single association: {'met' if ok3 else 'MISSED'}; "
              f"4-association speed-up >= 1.5x: {'met' if ok4 else 'MISSED'}")
    finally:
        for t in targets:
            t.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0
