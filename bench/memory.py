"""Memory: the node's peak RSS around one 300 x 512x512 CT, then its RSS under sustained intake.

``dicom-node serve`` (built-in ``lungs-ct``, results kept in the spool) runs in a
subprocess; a sampler reads ``VmRSS`` of every process of the node (main,
receivers, inference worker, and the worker's forked encoder while a job's
results are encoded) from ``/proc`` every 0.2 s.

1. One series of ``--slices`` (default 300) 512x512 CT slices is sent with DCMTK
   ``storescu`` and processed (SEG + SR).  Printed: each process's peak RSS, the
   worker's peak against the float32 volume (target: <= 3x the volume plus the
   model; the built-in model has no weights), and the whole node's peak.
2. For ``--minutes`` (default 20) series of ``--sustained-slices`` (default 100)
   slices, each with new UIDs, are sent one after another and processed.
   Printed: per minute, the largest RSS of each kind of process, and the drift
   (last minute against the second; the first holds the imports and the first
   model load).  Flat = the drift stays within a few per cent.

Usage: ``python -m bench memory [--slices 300] [--minutes 20] [--sustained-slices 100]``
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            out.extend(int(c) for c in text)
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (the process's resident high-water mark, since it started)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _pss_mb(pid: int) -> float:
    """Proportional set size: shared pages (a forked child's, copy-on-write) counted once over the processes."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _kind(pid: int, root: int, workers: set[int] | None = None) -> str:
    """main, receiver (holds an intake journal open), other (multiprocessing's resource tracker), worker,
    or encoder (a worker's forked child encoding results beside it, ``workers.parallel_encode``)."""
    if pid == root:
        return "main"
    try:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        parent = 0
    if workers and parent in workers:
        return "encoder"
    links = []
    try:
        for f in Path(f"/proc/{pid}/fd").iterdir():
            try:
                links.append(os.readlink(f))
            except OSError:
                continue
        if any("/intake/" in link for link in links):
            return "receiver"
        if b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return "other"
        return "worker"
    except OSError:
        return "other"


class Sampler(threading.Thread):
    """RSS of the node's processes every ``interval`` seconds: (time, {kind: max MB}, total MB).

    The total is the sum of the processes' RSS; ``pss_peak`` is the largest
    sum of their PSS (shared pages counted once: a worker's forked encoder
    shares most of the worker's memory).
    """

    def __init__(self, root: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.samples: list[tuple[float, dict[str, float], float]] = []
        self.pss: list[tuple[float, float]] = []
        self.hwm: dict[int, tuple[str, float]] = {}  # pid -> (kind, VmHWM MB): a peak between samples too
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            by_kind: dict[str, float] = {}
            total = pss = 0.0
            workers: set[int] = set()
            for pid in _tree(self.root):  # parents before their children
                mb = _rss_mb(pid)
                total += mb
                pss += _pss_mb(pid)
                kind = _kind(pid, self.root, workers)
                if kind == "worker":
                    workers.add(pid)
                by_kind[kind] = max(by_kind.get(kind, 0.0), mb)
                hwm = _rss_mb(pid, "VmHWM")
                if hwm:
                    self.hwm[pid] = (kind, max(hwm, self.hwm.get(pid, ("", 0.0))[1]))
            now = time.monotonic()
            self.samples.append((now, by_kind, total))
            self.pss.append((now, pss))
            self.stop.wait(self.interval)

    def high_water(self, exclude: set[int] = frozenset()) -> dict[str, float]:
        """The largest ``VmHWM`` per kind (pids in ``exclude`` left out: processes seen idle before)."""
        kinds: dict[str, float] = {}
        for pid, (kind, mb) in self.hwm.items():
            if pid not in exclude:
                kinds[kind] = max(kinds.get(kind, 0.0), mb)
        return kinds

    def pss_peak(self, since: float = 0.0) -> float:
        return max((p for t, p in self.pss if t >= since), default=0.0)

    def peak(self, since: float = 0.0) -> tuple[dict[str, float], float]:
        kinds: dict[str, float] = {}
        total = 0.0
        for t, by_kind, tot in self.samples:
            if t < since:
                continue
            total = max(total, tot)
            for k, v in by_kind.items():
                kinds[k] = max(kinds.get(k, 0.0), v)
        return kinds, total


def _done(state: Path, series_uid: str) -> bool:
    with sqlite3.connect(f"file:{state / 'dicom-node.sqlite3'}?mode=ro", uri=True, timeout=30) as conn:
        rows = conn.execute("SELECT kind, state FROM jobs WHERE series_uid=?", (series_uid,)).fetchall()
    if any(s in ("failed", "dead") for _, s in rows):
        raise RuntimeError(f"a job failed for {series_uid}: {rows}")
    return bool(rows) and all(s == "done" for _, s in rows)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--sustained-slices", type=int, default=100)
    args = parser.parse_args(argv)

    from tests.integration.conftest import node_config, start_node, storescu, wait_until
    from tests.phantoms import make_chest_phantom, write_ct_series

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp_name:
        tmp = Path(tmp_name)
        spacing = (1.0, 0.7, 0.7)
        hu, _ = make_chest_phantom(shape=(args.slices, 512, 512), spacing=spacing)
        files = write_ct_series(hu, spacing, tmp / "ct")
        volume_mb = args.slices * 512 * 512 * 4 / 2**20
        del hu
        config = node_config(tmp, quiet_seconds=1.0)
        config["logging"] = {"level": "WARNING"}
        config["storage"]["min_free_mb"] = 100
        node = start_node(tmp / "node", config)
        sampler = Sampler(node.proc.pid)
        sampler.start()
        try:
            time.sleep(2)
            idle, idle_total = sampler.peak()
            series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            started = time.monotonic()
            sent = storescu(node.port, files, aec="DICOMNODE")
            if sent.returncode != 0:
                print(f"storescu failed: {sent.stderr[-500:]}")
                return 1
            wait_until(lambda: _done(node.state, series_uid), 900, "the series processed", interval=0.5)
            peak, total = sampler.peak(started)
            print(f"one series: {args.slices} x 512x512 CT (float32 volume {volume_mb:.0f} MB), processed in "
                  f"{time.monotonic() - started:.1f} s with the built-in lungs-ct (no weights)")
            print(f"  idle before: {', '.join(f'{k} {v:.0f} MB' for k, v in sorted(idle.items()))}; "
                  f"node total {idle_total:.0f} MB")
            print(f"  peak: {', '.join(f'{k} {v:.0f} MB' for k, v in sorted(peak.items()))}; "
                  f"node total {total:.0f} MB")
            hwm = sampler.high_water()
            print(f"  high-water marks (VmHWM, between samples too): "
                  f"{', '.join(f'{k} {v:.0f} MB' for k, v in sorted(hwm.items()))}")
            worker = max(peak.get("worker", 0.0), hwm.get("worker", 0.0))
            print(f"  worker peak (VmHWM) / float32 volume = {worker / volume_mb:.2f} (target <= 3.0 plus the "
                  f"model; {worker - idle.get('worker', 0.0):.0f} MB above its idle size; largest 0.2 s sample "
                  f"{peak.get('worker', 0.0) / volume_mb:.2f})")
            print(f"  whole node peak / float32 volume = {total / volume_mb:.2f} (sum of RSS; sum of PSS, shared "
                  f"pages once: {sampler.pss_peak(started):.0f} MB)")
            if args.minutes <= 0:
                return 0

            # Sustained intake: new series one after another, each processed, for the given time.
            base_hu, _ = make_chest_phantom(shape=(args.sustained_slices, 512, 512), spacing=spacing, seed=1)
            t_end = time.monotonic() + args.minutes * 60
            t0 = time.monotonic()
            count = 0
            while time.monotonic() < t_end:
                out = tmp / f"s{count}"
                batch = write_ct_series(base_hu, spacing, out, study_uid=generate_uid(), series_uid=generate_uid())
                uid = str(pydicom.dcmread(batch[0], stop_before_pixels=True).SeriesInstanceUID)
                if storescu(node.port, batch, aec="DICOMNODE").returncode != 0:
                    print("storescu failed during sustained intake")
                    return 1
                wait_until(lambda: _done(node.state, uid), 900, "a sustained series processed", interval=0.5)
                for f in batch:
                    f.unlink()
                count += 1
            minutes: dict[int, dict[str, float]] = {}
            for t, by_kind, tot in sampler.samples:
                if t < t0:
                    continue
                m = int((t - t0) // 60)
                row = minutes.setdefault(m, {})
                for k, v in {**by_kind, "total": tot}.items():
                    row[k] = max(row.get(k, 0.0), v)
            print(f"sustained intake: {count} series of {args.sustained_slices} slices in {args.minutes:g} min "
                  f"({count * args.sustained_slices / (time.monotonic() - t0):.1f} instances/s, each processed)")
            kinds = sorted({k for row in minutes.values() for k in row})
            print("  minute  " + "  ".join(f"{k:>9}" for k in kinds) + "   (largest RSS in the minute, MB)")
            for m, row in sorted(minutes.items()):
                print(f"  {m + 1:>6}  " + "  ".join(f"{row.get(k, 0.0):>9.0f}" for k in kinds))
            ordered = [row for _, row in sorted(minutes.items())]
            if len(ordered) >= 3:
                second, last = ordered[1], ordered[-1]
                drift = {k: (last.get(k, 0.0) - second.get(k, 0.0)) for k in kinds}
                print("  drift, last minute against the second: " + ", ".join(
                    f"{k} {v:+.0f} MB ({100 * v / max(second.get(k, 1.0), 1.0):+.1f} %)" for k, v in drift.items()))
                median_total = statistics.median(row["total"] for row in ordered[1:])
                print(f"  node total: median {median_total:.0f} MB over minutes 2-{len(ordered)}")
        finally:
            sampler.stop.set()
            node.stop()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
