"""End to end: the node's own overhead from the last CT instance received to SEG + SR stored in Orthanc.

A 200-slice 512x512 synthetic chest CT is sent with DCMTK ``storescu`` straight to
the node (``dicom-node serve`` in a subprocess, built-in ``lungs-ct`` model), which
sends its SEG and SR to a real Orthanc.  From the node's state database:

    last instance received ........ max(instances.received_at)
    series complete ............... series.completed_at        (quiet period + tick)
    INFER job queued/done ......... jobs.created_at / updated_at, payload seconds {load, model, encode}
    SEND job done ................. jobs.updated_at: Orthanc answered the last C-STORE with success

    overhead = SEND done - last instance - completion.quiet_seconds - model seconds

Side by side, as references for the same machine and run: DCMTK ``storescu`` pushing the
CT to the node (intake) and pushing the node's SEG + SR files to Orthanc (what a send costs).

With ``--completion cfind`` the CT goes to Orthanc instead, which routes the stable series to the
node (as a PACS does); the node completes the series as soon as Orthanc confirms its instance count
by C-FIND (``completion.cfind``: asked when Orthanc releases the association that routed the series,
``on_release``, or else ``--after`` seconds after the last instance; the quiet timer set far away),
and the figure is the whole path: last instance received -> SEG + SR stored in Orthanc, minus only
the model time (target: 1 s).

With ``--outputs seg,sr,sc`` (an overlay series, or ``pdf``) the job's objects go out in more than
one SEND job; a thread then watches Orthanc's change log (REST ``/changes`` every 20 ms) and prints
when the SEG and SR, and when the overlay series, were stored there, as Orthanc saw them, whatever
the node's own bookkeeping says (so two builds of the node compare on the same footing).

Usage: ``python -m bench e2e [--slices 200] [--size 512] [--quiet 2] [--runs 1] [--completion idle|cfind]
[--outputs seg,sr] [--associations 1]``
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pydicom


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench e2e", description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--quiet", type=float, default=2.0, help="completion.quiet_seconds (subtracted)")
    parser.add_argument("--runs", type=int, default=1, help="series sent one after another (new UIDs each)")
    parser.add_argument("--completion", choices=("idle", "cfind"), default="idle",
                        help="idle timer (default) or C-FIND confirmation by the routing PACS")
    parser.add_argument("--after", type=float, default=0.5, help="cfind: quiet seconds before the first query")
    parser.add_argument("--outputs", default="seg,sr",
                        help="the rule's outputs, comma-separated (seg, sr, sc, pdf); with sc or pdf Orthanc's "
                             "change log shows when SEG + SR and when the rest were stored")
    parser.add_argument("--associations", type=int, default=1,
                        help="the Orthanc destination's associations (send jobs of 8+ objects per association "
                             "go over that many at once)")
    args = parser.parse_args(argv)
    cfind = args.completion == "cfind"
    outputs = [o.strip() for o in args.outputs.split(",") if o.strip()]
    watch = bool({"sc", "pdf"} & set(outputs))

    from tests.integration.conftest import free_port, node_config, start_node, start_orthanc, storescu, wait_until
    from tests.phantoms import make_chest_phantom, write_ct_series

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        spacing = (1.5, 0.7, 0.7)
        hu, _ = make_chest_phantom(shape=(args.slices, args.size, args.size), spacing=spacing)
        series = [write_ct_series(hu, spacing, tmp / f"ct{i}") for i in range(args.runs)]
        del hu
        print(f"phantom: {args.slices} slices of {args.size}x{args.size}, {args.runs} series "
              f"({time.perf_counter() - t0:.1f} s to make)")

        pacs_port = free_port()
        config = node_config(tmp, quiet_seconds=60.0 if cfind else args.quiet,
                             destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port,
                                                    "associations": args.associations}})
        config["completion"]["tick_seconds"] = 0.5
        config["rules"][0]["outputs"] = outputs
        if cfind:
            config["completion"]["cfind"] = [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port,
                                              "after_seconds": args.after, "interval_seconds": 1, "timeout_s": 10}]
        config["logging"] = {"level": "WARNING"}
        node = start_node(tmp / "node", config)
        # idle: the modality sends straight to the node and Orthanc only receives results; cfind: Orthanc
        # receives the CT and routes the stable series to the node, then confirms it by C-FIND.
        orthanc = start_orthanc(tmp / "orthanc", node.port, dicom_port=pacs_port, stable_age=1,
                                **({} if cfind else {"lua": "-- no routing\n"}))
        print("completion: " + (f"C-FIND to Orthanc when it releases the routing association (else {args.after:g} s "
                                "after the last instance)" if cfind else f"idle timer {args.quiet:g} s")
              + f"; outputs: {', '.join(outputs)}; associations to Orthanc per send job: up to {args.associations}"
              + " (Orthanc: DicomThreadsCount 4, its default)")
        rows: list[dict[str, Any]] = []
        watcher = _StoredInOrthanc(orthanc) if watch else None
        try:
            for files in series:
                series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
                if watcher is not None:
                    watcher.reset()
                t = time.perf_counter()
                sent = storescu(orthanc.dicom_port, files, aec="ORTHANC") if cfind else \
                    storescu(node.port, files, aec="DICOMNODE")
                intake = time.perf_counter() - t
                if sent.returncode != 0:
                    print(f"storescu failed: {sent.stderr[-500:]}")
                    return 1
                wait_until(lambda: _finished(node.state, series_uid), 900, "SEG + SR sent to Orthanc", interval=0.5)
                row: dict[str, Any] = _breakdown(node.state, series_uid, 0.0 if cfind else args.quiet)
                row["cfind"] = cfind
                if watcher is not None:
                    row.update(watcher.stored(row, 0.0 if cfind else args.quiet))
                row["storescu_intake_s"] = intake
                row["storescu_results_s"] = _reference_send(node.state, series_uid, orthanc.dicom_port)
                rows.append(row)
                _print_row(row)
        finally:
            if watcher is not None:
                watcher.stop()
            node.stop()
            orthanc.stop()
        if len(rows) > 1:
            print(f"median overhead over {len(rows)} runs: "
                  f"{statistics.median(r['overhead_s'] for r in rows):.2f} s "
                  f"(target {'<= 1 s with C-FIND' if cfind else '< 0.5 s'})")
            if watch:
                print(f"median SEG + SR stored in Orthanc: {statistics.median(r['seg_sr_s'] for r in rows):.2f} s, "
                      f"everything: {statistics.median(r['all_s'] for r in rows):.2f} s (as the overhead)")
        return 0


#: SOP classes of the node's SEG and SR objects (the rest are the overlay series and the PDF).
_SEG_SR = {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7", "1.2.840.10008.5.1.4.1.1.88.22",
           "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34"}


class _StoredInOrthanc:
    """When each new instance appeared in Orthanc (wall clock, as the node's database): its change log, polled."""

    def __init__(self, orthanc: Any) -> None:
        self.orthanc = orthanc
        self.seen: dict[str, float] = {}  # Orthanc instance ID -> time it was first seen
        self._since = int(orthanc.get("/changes?last")["Last"])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="orthanc-changes", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            page = self.orthanc.get(f"/changes?since={self._since}&limit=1000")
            now = time.time()
            for change in page["Changes"]:
                if change["ChangeType"] == "NewInstance":
                    self.seen.setdefault(change["ID"], now)
            self._since = int(page["Last"])

    def reset(self) -> None:
        """Forget what was stored so far (the last run's reference re-store among it)."""
        time.sleep(0.1)
        self.seen = {}

    def stored(self, row: dict[str, Any], quiet: float) -> dict[str, float]:
        """SEG + SR and everything of the results stored, after the last instance, minus quiet and model."""
        time.sleep(0.1)  # one more poll
        seen, self.seen = self.seen, {}
        kinds: dict[str, list[float]] = {"seg_sr": [], "rest": []}
        for instance, at in seen.items():
            sop_class = self.orthanc.get(f"/instances/{instance}/metadata?expand").get("SopClassUid", "")
            if sop_class == "1.2.840.10008.5.1.4.1.1.2":  # the CT itself (routed by Orthanc with --completion cfind)
                continue
            kinds["seg_sr" if sop_class in _SEG_SR else "rest"].append(at)
        base = row["last_received"] + quiet + row["model_s"]
        return {"seg_sr_s": max(kinds["seg_sr"], default=base) - base,
                "all_s": max(kinds["seg_sr"] + kinds["rest"], default=base) - base,
                "rest_objects": float(len(kinds["rest"]))}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _db(state: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{state / 'dicom-node.sqlite3'}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def _finished(state: Path, series_uid: str) -> bool:
    with _db(state) as conn:
        jobs = conn.execute("SELECT kind, state FROM jobs WHERE series_uid=?", (series_uid,)).fetchall()
    sends = [j["state"] for j in jobs if j["kind"] == "send"]
    if any(j["state"] in ("failed", "dead") for j in jobs):
        raise RuntimeError(f"a job failed: {[dict(j) for j in jobs]}")
    # Every job done: a job's SEG + SR may be sent while it still makes its overlay series.
    return bool(sends) and all(j["state"] == "done" for j in jobs)


def _breakdown(state: Path, series_uid: str, quiet: float) -> dict[str, float]:
    with _db(state) as conn:
        last = conn.execute("SELECT MAX(received_at) FROM instances WHERE series_uid=?", (series_uid,)).fetchone()[0]
        s = conn.execute("SELECT completed_at FROM series WHERE series_uid=?", (series_uid,)).fetchone()
        jobs = [dict(j) for j in conn.execute("SELECT * FROM jobs WHERE series_uid=? ORDER BY id", (series_uid,))]
        instance_count = conn.execute("SELECT COUNT(*) FROM instances WHERE series_uid=?", (series_uid,)).fetchone()[0]
    infer = next(j for j in jobs if j["kind"] == "infer")
    sends = [j for j in jobs if j["kind"] == "send"]
    send_done = max(j["updated_at"] for j in sends)
    send_created = max(j["created_at"] for j in sends)  # the last SEND job: the one the overhead waits for
    payload = json.loads(infer["payload"])
    seconds: dict[str, float] = payload.get("seconds", {})
    infer_wall = infer["updated_at"] - infer["created_at"]
    return {
        "total_s": send_done - last,
        "overhead_s": send_done - last - quiet - seconds.get("model", 0.0),
        "completion_lag_s": s["completed_at"] - last - quiet,
        "infer_wall_s": infer_wall,
        "load_s": seconds.get("load", 0.0),
        "model_s": seconds.get("model", 0.0),
        "encode_s": seconds.get("encode", 0.0),
        "infer_other_s": infer_wall - sum(seconds.values()),
        # The job's timeline (builds before 2026-12-07 have none): waiting in the queue, listing its inputs,
        # the worker's time beyond its steps (the pipe both ways, the prefetch step it was in).
        **({"queued_s": timeline["taken"] - infer["created_at"], "inputs_s": timeline["handed"] - timeline["taken"],
            "worker_other_s": timeline["returned"] - timeline["handed"] - sum(seconds.values())}
           if (timeline := payload.get("timeline")) else {}),
        "queue_to_send_s": send_created - infer["updated_at"],
        "send_s": send_done - send_created,
        "prefetched": payload.get("prefetched", 0),
        "instances": instance_count,
        "last_received": last,
        "send_jobs": float(len(sends)),
        # Each SEND job's queuing and end, from the last instance received (minus the quiet period):
        # with a SEG sent while the SR is built, the first ends before the job does.
        "send_timeline": [(", ".join(sorted({_kind_of(f) for f in json.loads(j["payload"]).get("files", [])})),
                           j["created_at"] - last - quiet - seconds.get("model", 0.0),
                           j["updated_at"] - last - quiet - seconds.get("model", 0.0)) for j in sends],
        "infer_done_s": infer["updated_at"] - last - quiet - seconds.get("model", 0.0),
    }


def _kind_of(path: str) -> str:
    """The kind of a result file from its spool name (``.../seg.dcm``, ``.../sc-0001.dcm``)."""
    return Path(path).stem.split("-")[0]


def _reference_send(state: Path, series_uid: str, port: int) -> float:
    """DCMTK storescu pushing the node's own SEG + SR files to Orthanc (the reference for a send)."""
    import os

    from tests.integration.conftest import require_tool

    with _db(state) as conn:
        paths = [str(state / "spool" / r["path"]) for r in
                 conn.execute("SELECT path FROM results WHERE source_series=?", (series_uid,))]
    # -R: propose exactly the SOP classes of the files (SEG is not in storescu's default list).
    cmd = [require_tool("storescu"), "-R", "-aet", "DICOMNODE", "-aec", "ORTHANC", "127.0.0.1", str(port), *paths]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TCP_NODELAY": "1"}, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"storescu of the results failed: {out.stderr[-500:]}")
    return time.perf_counter() - t


def _print_row(row: dict[str, Any]) -> None:
    if row.get("cfind"):
        print(f"whole path with C-FIND completion (last instance -> SEG+SR stored in Orthanc, minus the model): "
              f"{row['overhead_s']:.2f} s  (target <= 1 s)")
    else:
        print(f"node overhead (last instance -> {'every result' if 'all_s' in row else 'SEG+SR'} stored, "
              f"minus quiet period and model): "
              f"{row['overhead_s']:.2f} s  (target < 0.5 s)")
    print(f"  total {row['total_s']:.2f} s = completion lag {row['completion_lag_s']:.2f} s (beyond quiet) "
          f"+ INFER {row['infer_wall_s']:.2f} s [load {row['load_s']:.2f} ({row['prefetched']} of "
          f"{row['instances']} instances read ahead), model {row['model_s']:.2f}, "
          f"encode {row['encode_s']:.2f}, queue/IPC/db {row['infer_other_s']:.2f}"
          + (f" (queued {row['queued_s']:.2f}, inputs {row['inputs_s']:.2f}, worker pipe {row['worker_other_s']:.2f})"
             if "queued_s" in row else "") + "] "
          f"+ to SEND {row['queue_to_send_s']:.2f} s + SEND {row['send_s']:.2f} s (+ quiet)"
          + (f"; {row['send_jobs']:.0f} SEND jobs, the figures of the last" if row["send_jobs"] > 1 else ""))
    if row["send_jobs"] > 1:
        print("  SEND jobs (queued -> done, on the overhead's clock): "
              + "; ".join(f"{kinds} {queued:.2f} -> {done:.2f}" for kinds, queued, done in row["send_timeline"])
              + f"; the INFER job done at {row['infer_done_s']:.2f}")
    if "seg_sr_s" in row:
        print(f"  in Orthanc's change log (minus {'the model' if row['cfind'] else 'quiet period and model'}): "
              f"SEG + SR stored after {row['seg_sr_s']:.2f} s, the other {row['rest_objects']:.0f} objects "
              f"(overlay series, PDF) after {row['all_s']:.2f} s")
    print(f"  reference: storescu CT -> {'Orthanc' if row['cfind'] else 'node'} {row['storescu_intake_s']:.2f} s; "
          f"storescu {'every result' if 'all_s' in row else 'SEG+SR'} -> Orthanc {row['storescu_results_s']:.2f} s "
          f"(a re-store: Orthanc replaces the node's copies) "
          f"(node SEND / storescu = {row['send_s'] / max(row['storescu_results_s'], 1e-6):.2f}x)")


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
