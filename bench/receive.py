"""Receive speed: 200 CT slices of 512x512 sent to the node, Orthanc and DCMTK storescp, side by side.

``python -m bench receive [--slices N] [--rounds R] [--keep]``
``python -m bench receive --large-mb MB [--rounds R]``

The sender is DCMTK ``storescu`` (``TCP_NODELAY=1``), once over one association
(all slices) and once over 4 concurrent associations (a quarter each), against:

* the node: ``dicom-node serve`` with no rules (so only receiving is measured);
  every instance is appended to its intake journal and fdatasynced before its
  0x0000, then written to the spool and committed (SQLite ``synchronous=FULL``)
  behind, as in production;
* Orthanc (Debian package), no Lua, storage uncompressed; it fdatasyncs each stored
  file (``SyncStorageArea``, its default since 1.7.4: 20 ``fdatasync`` calls on its
  storage files for 20 instances under ``strace``), not its SQLite index (WAL, synced
  at checkpoints);
* DCMTK ``storescp --fork`` writing into a temporary folder.

Before the timed sends, every target is sent a whole series over one association and one over
four, untimed (first associations, caches; the node's intake journals reach the size they keep in
service).  Each run sends a fresh series (new UIDs), so no target sees duplicates.  Every send
starts with every target idle, the node having completed every series it was sent
(``completion.quiet_seconds`` 1 s instead of 30, so that a completion is counted in the
node's CPU and never runs during another target's send) and nothing left for the kernel
to write back (a ``sync`` first: storescp's unsynced files would otherwise be written back
during a later send of any target).  Prints seconds, instances/s and MB/s per run, each
target's CPU (user + system of its processes, counted until it is idle again, so the
node's recording behind the sends is in it) in seconds and ms per instance, a steadier
figure than the time on a shared machine, the ratios node/Orthanc and
node/storescp (time; <= 1.0 means the node is as fast or faster) and the
4-association speed-up over one association of each target, with how busy the whole
machine's CPUs were during the sends (``/proc/stat``: every process and the kernel; a
target that keeps them X busy over one association can be at most ~1/X faster over four; and four
associations that kept them Y busy for T seconds could take no less than Y x T on them: the ratio to
one association's time is a second bound), the CPU
cores its busiest process used during the send (a Python process's threads share one interpreter, so a
receiver process near 1.0 is at its limit) and the CPU seconds of the ``storescu`` senders themselves,
which share the machine's CPUs with the target.  Targets: node/Orthanc
<= 1.0 and node/storescp <= 3 over one association; 4 associations >= 1.5x one.

With ``--large-mb``, instead: one instance of that many MiB (a Multi-frame Grayscale Word
Secondary Capture of noise, as large as a whole-slide image level or a tomosynthesis) sent to
each target in turn over one association, ``--rounds`` times with a new SOP Instance UID each;
prints the seconds and the peak resident memory of each target's processes above their idle
memory (sampled every 10 ms; storescp's forked child included), against the instance's size.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import socket
import sqlite3
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

    def settle(self) -> float:
        """The target's CPU seconds once it is idle (:func:`settled_cpu`)."""
        return settled_cpu(self)

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
            # The series is completed 1 s after its last instance (default 30 s), and each send waits for it
            # (settle), so completing it is counted in the node's CPU and never lands in a later target's send.
            "completion": {"quiet_seconds": 1, "tick_seconds": 1},
        }
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "node.yaml").write_text(yaml.safe_dump(config))
        self._spawn([str(REPO / ".venv/bin/dicom-node"), "serve", "--config", str(self.work / "node.yaml")],
                    cwd=self.work)

    def settle(self) -> float:
        """Wait until every series sent is completed (no longer receiving), then until the CPU is idle."""
        database = self.work / "state" / "dicom-node.sqlite3"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)) as conn:
                    receiving = conn.execute("SELECT count(*) FROM series WHERE state = 'receiving'").fetchone()[0]
            except sqlite3.Error:  # not created yet, or busy: ask again
                receiving = 1
            if not receiving:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the node did not complete the series it was sent within 30 s")
        return settled_cpu(self)

    def describe(self) -> str:
        return ("dicom-node serve, embedded defaults but no rules and completion.quiet_seconds 1 (each send waits "
                "until the node has completed the series, counted in its CPU): node.receivers auto, max PDU 128 kB, "
                "every instance appended to the intake journal and fdatasynced before 0x0000 (behind it: each file "
                "written as it arrives, the rows of a stream committed together to SQLite, rollback journal, "
                "synchronous=FULL; the files made durable by one syncfs before the journal gives their bytes up); "
                "a data set past 32 MiB is not journaled: written to a spool file as it arrives, fdatasynced and "
                "renamed into place before 0x0000; node.max_instance_mb 4096")


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
                "MaximumPduLength default (16 kB); its own durability: each stored file fdatasynced "
                "(SyncStorageArea, on by default since Orthanc 1.7.4), its SQLite index in WAL mode "
                "synced at checkpoints, not per instance")


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


def _tree_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """``{pid: (own CPU seconds, CPU seconds of the children it has reaped)}`` of ``pid`` and its descendants.

    Read from ``/proc/<pid>/stat`` (utime + stime, cutime + cstime).
    """
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[float, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        stats[int(entry.name)] = ((int(fields[11]) + int(fields[12])) / tick,
                                  (int(fields[13]) + int(fields[14])) / tick)
    tree: dict[int, tuple[float, float]] = {}
    todo = [pid]
    while todo:
        current = todo.pop()
        if current in stats:
            tree[current] = stats[current]
        todo.extend(children.get(current, []))
    return tree


def _tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants, with the children they have reaped.

    storescp's forked children are counted once storescp has reaped them, the node's
    receiver processes while they run.
    """
    return sum(own + reaped for own, reaped in _tree_cpu(pid).values())


def _busiest_process(before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]) -> float:
    """CPU seconds of the process of a tree (:func:`_tree_cpu`) that used the most between two readings
    (its own threads only: a child reaped meanwhile is not one process)."""
    return max((own - before.get(pid, (0.0, 0.0))[0] for pid, (own, _) in after.items()), default=0.0)


def _cores(share: float) -> str:
    """A busiest-process figure as printed: ``-`` where no process of the target ran through the send (storescp's
    children each serve one association and are gone before it is read)."""
    return f"{share:.2f}" if share >= 0.005 else "-"


def _senders_cpu() -> float:
    """User + system CPU seconds of this process's reaped children so far (the ``storescu`` senders)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def settled_cpu(target: Target, flat_s: float = 0.5, limit_s: float = 15.0) -> float:
    """The target's CPU seconds once it has stopped using CPU for ``flat_s`` (work it does behind the sends too)."""
    assert target.proc is not None
    last = _tree_cpu_seconds(target.proc.pid)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(flat_s)
        now = _tree_cpu_seconds(target.proc.pid)
        if now - last < 0.02:  # a few scheduler ticks at most
            return now
        last = now
    return last


def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (``/proc/<pid>/task/*/children``, ``statm``), in bytes."""
    page = os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += int(Path(f"/proc/{current}/statm").read_text().split()[1]) * page
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(child) for child in (task / "children").read_text().split())
        except (OSError, ValueError):  # gone meanwhile
            continue
    return total


class PeakRss:
    """Samples a process tree's resident memory every ``interval_s`` in a thread; ``peak`` once stopped."""

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        import threading

        self.pid, self.interval_s = pid, interval_s
        self.idle = self.peak = _tree_rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, _tree_rss_bytes(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_rss_bytes(self.pid))


def make_large_instance(path: Path, megabytes: int) -> Path:
    """One Multi-frame Grayscale Word Secondary Capture of ``megabytes`` MiB of pixel data (a frame a MiB), as a
    whole-slide image level or a tomosynthesis is one large instance; noise, so that nothing compresses it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7.3")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "OT", "BENCH-LARGE", "Bench^Large"
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 512, 1024, megabytes, 1
    ds.PhotometricInterpretation, ds.PixelRepresentation = "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = np.random.default_rng(7).integers(0, 4096, size=512 * 1024 * megabytes, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def large_instance(targets: list[Target], work: Path, megabytes: int, rounds: int) -> None:
    """Send one ``megabytes`` MiB instance to each target in turn (``rounds`` times, a new copy each): its time and
    the peak resident memory of the target's processes above their idle memory, against the instance's size."""
    import random

    import pydicom

    source = make_large_instance(work / "large" / "large.dcm", megabytes)
    size = source.stat().st_size
    uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    prefix, last = uid.rsplit(".", 1)
    print(f"data: one Multi-frame Grayscale Word Secondary Capture of {size / 1e6:.0f} MB; sender: DCMTK storescu, "
          f"TCP_NODELAY=1; resident memory of each target's processes sampled every 10 ms")
    seconds: dict[str, list[float]] = {}
    growth: dict[str, list[int]] = {}
    for _ in range(rounds):
        for t in targets:
            t.settle()
            copy = work / "large" / f"{t.name}.dcm"
            # the same instance with a new SOP Instance UID of the same length each time: no target sees a duplicate
            new = f"{prefix}.{random.randint(1, 9)}{''.join(random.choices('0123456789', k=len(last) - 1))}"
            copy.write_bytes(source.read_bytes().replace(uid.encode(), new.encode()))
            os.sync()
            assert t.proc is not None
            with PeakRss(t.proc.pid) as rss:
                seconds.setdefault(t.name, []).append(send(t, [copy], 1))
                t.settle()
            growth.setdefault(t.name, []).append(rss.peak - rss.idle)
            copy.unlink()
    print(f"{'target':<10}{'seconds':>9}{'MB/s':>8}{'peak RSS above idle, MB':>25}{'x the instance':>16}")
    for t in targets:
        s, g = statistics.median(seconds[t.name]), statistics.median(growth[t.name])
        print(f"{t.name:<10}{s:>9.2f}{size / 1e6 / s:>8.0f}{g / 1e6:>25.0f}{g / size:>16.2f}")
    node_s, node_g = statistics.median(seconds["node"]), statistics.median(growth["node"])
    print(f"large instance: node/Orthanc time = {node_s / statistics.median(seconds['Orthanc']):.2f}, "
          f"memory = {node_g / max(1, statistics.median(growth['Orthanc'])):.2f}; node/storescp time = "
          f"{node_s / statistics.median(seconds['storescp']):.2f}, memory = "
          f"{node_g / max(1, statistics.median(growth['storescp'])):.2f}")


def filesystem(path: Path) -> str:
    """The filesystem every target writes to, e.g. ``ext4 on /dev/vda (no journal)``: its syncs and file creation
    cost differ by kind and journal."""
    found = subprocess.run(["findmnt", "-no", "FSTYPE,SOURCE", "-T", str(path)], capture_output=True, text=True)
    fstype, _, source = found.stdout.strip().partition(" ")
    if not fstype:
        return "unknown"
    note = ""
    journal = Path("/sys/fs/ext4") / Path(source.strip()).name / "journal_task"
    if fstype == "ext4" and journal.exists():
        note = " (no journal)" if journal.read_text().strip() == "<none>" else " (journal)"
    return f"{fstype} on {source.strip()}{note}"


def mount_ext4_image(folder: Path, size_gb: int) -> Path | None:
    """A fresh journaled ext4 (Debian's default for ``/var/lib``) in a sparse image file, mounted at ``folder``.

    Each target gets its own, on a loop device with direct I/O (the image's pages are not cached twice,
    so a target's fsync flushes its own writes, as on a disk of its own): every target then writes to
    the kind of filesystem a PACS host has, whatever this machine's own folder is.  On a development VM
    whose ext4 runs without a journal, creating a file costs 0.1-0.8 ms after many files were deleted
    nearby (the kernel skips recently freed inodes one by one; with a journal it does not), which hit
    the three targets unevenly.  Needs root, ``mkfs.ext4``, ``losetup`` and a loop device; returns
    ``None`` (and says why) when any is missing.
    """
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("mkfs.ext4", "losetup", "mount")):
        print("filesystem: no ext4 image (needs root, mkfs.ext4 and losetup); the targets write to the work folder")
        return None
    image = folder.with_name(folder.name + ".ext4.img")
    folder.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size_gb << 30)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)],
                          capture_output=True, text=True)
    attached = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(image)],
                              capture_output=True, text=True) if made.returncode == 0 else made
    device = attached.stdout.strip()
    mounted = subprocess.run(["mount", device, str(folder)], capture_output=True, text=True) \
        if attached.returncode == 0 and device.startswith("/dev/") else attached
    if mounted.returncode != 0:
        if device.startswith("/dev/"):
            subprocess.run(["losetup", "-d", device], check=False)
        print(f"filesystem: no ext4 image ({mounted.stderr.strip()[-200:]}); the targets write to the work folder")
        image.unlink(missing_ok=True)
        return None
    return folder


def unmount_image(folder: Path) -> None:
    """Unmount what :func:`mount_ext4_image` mounted at ``folder`` and detach its loop device."""
    source = subprocess.run(["findmnt", "-no", "SOURCE", str(folder)], capture_output=True, text=True).stdout.strip()
    for _ in range(20):  # a target's last process may still be exiting (its files open)
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode == 0:
            break
        time.sleep(0.5)
    else:
        print(f"could not unmount {folder}: unmount it with umount {folder}")
    if source.startswith("/dev/loop"):
        subprocess.run(["losetup", "-d", source], check=False)


def create_cost_us(folder: Path, count: int = 500) -> float:
    """Microseconds to create (and close) an empty file in ``folder``: each target creates one per instance.

    The probe's files stay until the work folder is removed: deleting them now would make the next
    creations slower on an ext4 without a journal (see :func:`mount_ext4_image`).
    """
    probe = folder / "create-probe"
    probe.mkdir()
    t0 = time.perf_counter()
    for i in range(count):
        os.close(os.open(probe / f"{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    return 1e6 * (time.perf_counter() - t0) / count


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far (``/proc/stat``; idle and I/O wait are not busy)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def _busy_since(before: tuple[int, int]) -> float:
    """Share of the machine's CPU time that was busy since ``before`` (:func:`_machine_ticks`)."""
    busy, total = _machine_ticks()
    return (busy - before[0]) / max(1, total - before[1])


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
    parser.add_argument("--large-mb", type=int, default=0, metavar="MB",
                        help="instead of the series: one instance of this many MiB (a whole-slide image level, a "
                             "tomosynthesis) to each target, its time and the targets' peak memory")
    parser.add_argument("--filesystem", choices=("ext4-image", "here"), default="ext4-image",
                        help="ext4-image (default, as root): each target writes to a fresh journaled ext4 of its "
                             "own (a loop-mounted image file); here: to the temporary folder's own filesystem")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    count = 2 * args.rounds * 3 + 2 * 3
    # Each target's copies of what it is sent (and the node's journal), with room to spare; sparse files.
    size_gb = max(4, int(2 * count * args.slices * 0.53e6 / 2**30) + 2) if not args.large_mb \
        else int(2 * args.rounds * args.large_mb / 1024) + 4
    mounted = [folder for folder in (work / name for name in ("node", "orthanc", "storescp"))
               if args.filesystem == "ext4-image" and mount_ext4_image(folder, size_gb) is not None]
    targets: list[Target] = [Node(work / "node"), Orthanc(work / "orthanc"), StoreScp(work / "storescp")]
    try:
        if args.large_mb:
            for t in targets:
                t.start()
                print(f"{t.name}: {t.describe()}; writes to {filesystem(t.work)}")
            large_instance(targets, work, args.large_mb, args.rounds)
            return 0
        t0 = time.perf_counter()
        series = make_series(work / "data", args.slices, count)
        size_mb = sum(f.stat().st_size for f in series[0]) / 1e6
        print(f"data: {len(series)} series of {args.slices} CT slices 512x512 ({size_mb:.0f} MB each), "
              f"made in {time.perf_counter() - t0:.0f} s; sender: DCMTK storescu, TCP_NODELAY=1")
        for t in targets:
            t.start()
            print(f"{t.name}: {t.describe()}; writes to {filesystem(t.work)}, creating a file there takes "
                  f"{create_cost_us(t.work):.0f} us")
        results: dict[tuple[str, int], list[float]] = {}
        cpu: dict[tuple[str, int], list[float]] = {}
        busy: dict[tuple[str, int], list[float]] = {}  # share of the machine's CPUs busy during each send
        sender_cpu: dict[tuple[str, int], list[float]] = {}  # the storescu processes' CPU seconds in each send
        top: dict[tuple[str, int], list[float]] = {}  # the target's busiest process during each send, in cores
        fresh = iter(series)
        # Warm-up, not timed: a whole series over one association, then one over four, to every target (its
        # first associations: imports, caches, files; and the node's intake journals grown to the size they
        # keep, as on a node in service: a journal rewound between streams is written over, not extended).
        for t in targets:
            for assocs in (1, 4):
                t.settle()
                send(t, next(fresh), assocs)
        for _ in range(args.rounds):
            for assocs in (1, 4):
                for t in targets:  # interleaved, so a busy moment of the machine hits every target
                    # Each send starts with every target idle; its CPU is counted until the target is idle
                    # again (the node records files and rows behind the sends). And with nothing left for the
                    # kernel to write back: storescp leaves its files unsynced (as its users run it), and their
                    # writeback, up to 30 s later, would otherwise land in whichever send runs then.
                    before = {u.name: u.settle() for u in targets}[t.name]
                    os.sync()
                    assert t.proc is not None
                    machine, processes, senders = _machine_ticks(), _tree_cpu(t.proc.pid), _senders_cpu()
                    seconds = send(t, next(fresh), assocs)
                    busiest = _busiest_process(processes, _tree_cpu(t.proc.pid)) / seconds
                    busy.setdefault((t.name, assocs), []).append(_busy_since(machine))
                    sender_cpu.setdefault((t.name, assocs), []).append(_senders_cpu() - senders)
                    top.setdefault((t.name, assocs), []).append(busiest)
                    results.setdefault((t.name, assocs), []).append(seconds)
                    cpu.setdefault((t.name, assocs), []).append(t.settle() - before)
        median: Callable[[str, int], float] = lambda name, a: statistics.median(results[(name, a)])
        cpu_median: Callable[[str, int], float] = lambda name, a: statistics.median(cpu[(name, a)])
        print(f"{'target':<10}{'assocs':>7}{'seconds':>9}{'inst/s':>9}{'MB/s':>8}{'CPU s':>7}{'CPU ms/inst':>12}"
              f"{'busy':>6}{'top':>6}{'storescu CPU s':>15}   range (median of {args.rounds}; busy: the machine's "
              f"{os.cpu_count()} CPUs during the send, every process and the kernel; top: the target's busiest "
              "process during the send, in CPU cores (a Python process's threads share one interpreter); "
              "storescu CPU s: the senders')")
        for assocs in (1, 4):
            for t in targets:
                s = median(t.name, assocs)
                runs = results[(t.name, assocs)]
                c = cpu_median(t.name, assocs)
                print(f"{t.name:<10}{assocs:>7}{s:>9.2f}{args.slices / s:>9.1f}{size_mb / s:>8.1f}{c:>7.2f}"
                      f"{1000 * c / args.slices:>12.2f}{100 * statistics.median(busy[(t.name, assocs)]):>5.0f}%"
                      f"{_cores(statistics.median(top[(t.name, assocs)])):>6}"
                      f"{statistics.median(sender_cpu[(t.name, assocs)]):>15.2f}"
                      f"   {min(runs):.2f}-{max(runs):.2f} s")
        for assocs in (1, 4):
            node = median("node", assocs)
            print(f"{assocs} assoc: node/Orthanc = {node / median('Orthanc', assocs):.2f}   "
                  f"node/storescp = {node / median('storescp', assocs):.2f}   (time ratio; <= 1.0: node as fast)   "
                  f"CPU: node/Orthanc = {cpu_median('node', assocs) / cpu_median('Orthanc', assocs):.2f}   "
                  f"node/storescp = {cpu_median('node', assocs) / cpu_median('storescp', assocs):.2f}")
        def fully_busy(name: str) -> float:
            """One association's time over the least four could take on these CPUs doing the work they did (the
            machine's busy CPU time during the four-association send, spread over every CPU)."""
            return median(name, 1) / max(1e-6, statistics.median(busy[(name, 4)]) * median(name, 4))

        for t in targets:
            print(f"{t.name}: 4 associations are {median(t.name, 1) / median(t.name, 4):.2f}x one association "
                  f"(the machine {100 * statistics.median(busy[(t.name, 1)]):.0f} % busy at one, "
                  f"{100 * statistics.median(busy[(t.name, 4)]):.0f} % at four: at most "
                  f"~{1 / max(0.01, statistics.median(busy[(t.name, 1)])):.1f}x on these CPUs, and with the work "
                  f"the machine did at four, fully busy, ~{fully_busy(t.name):.1f}x; at one its busiest "
                  f"process used {_cores(statistics.median(top[(t.name, 1)]))} of a core, the sender "
                  f"{statistics.median(sender_cpu[(t.name, 1)]):.2f} CPU s)")
        ok1 = median("node", 1) <= median("Orthanc", 1)
        ok3 = median("node", 1) <= 3 * median("storescp", 1)
        ok4 = median("node", 1) / median("node", 4) >= 1.5
        print(f"targets: node/Orthanc <= 1.0 single association: {'met' if ok1 else 'MISSED'}; "
              f"node/storescp <= 3 single association: {'met' if ok3 else 'MISSED'}; "
              f"4-association speed-up >= 1.5x: {'met' if ok4 else 'MISSED'}")
    finally:
        for t in targets:
            t.stop()
        for folder in mounted:
            unmount_image(folder)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0
