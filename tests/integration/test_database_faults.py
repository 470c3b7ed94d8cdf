"""Faults under the state database while C-STOREs arrive: 0xA700 in time, a log line, then recovery.

Real faults on the running node (``dicom-node serve`` with two receiver
processes): another process holding the database locked (an sqlite3
``BEGIN EXCLUSIVE``, as a backup tool or a shell would), and the rollback
journal made impossible to create (its path taken by a directory, as a
failing disk or a wrong permission would).  An instance already acknowledged
(durable in a receiver's intake journal) waits there; the node then answers
0xA700 within ``storage.database_busy_timeout_s`` (well before the sender's
timeout), says why in its log, ``/readyz`` says so, and once the fault is
gone the journaled instances are recorded and the next C-STOREs stored.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE

from dicom_node.store.layout import DATABASE_NAME
from tests.integration.conftest import node_config, wait_until
from tests.realdata import dicomdir_series

pytestmark = pytest.mark.integration

BUSY_S = 2.0


@pytest.fixture()
def node(tmp_path: Path, node_factory: Any) -> Any:
    config = node_config(tmp_path)
    config["node"]["receivers"] = 2
    config["storage"]["database_busy_timeout_s"] = BUSY_S
    started = node_factory(config)
    wait_until(lambda: _readyz(started)["ready"], 60, "the node to be ready (receivers and worker up)")
    return started


def _store(port: int, path: Path) -> tuple[int, float]:
    """C-STORE one file; (status, seconds until the response)."""
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.dimse_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    start = time.monotonic()
    rsp = assoc.send_c_store(ds)
    elapsed = time.monotonic() - start
    assoc.release()
    assert rsp is not None and "Status" in rsp, "no C-STORE response"
    return int(rsp.Status), elapsed


def _readyz(node: Any) -> dict[str, Any]:
    url = f"http://127.0.0.1:{node.config['http']['port']}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))


def _until_refused(node: Any, files: list[Path]) -> list[Path]:
    """Send ``files`` one by one while the database fails; returns those acknowledged before the first 0xA700.

    An acknowledged instance is durable in its receiver's intake journal; the receiver then finds the database
    refusing its row (it logs why, once) and answers 0xA700 from then on.  With two receiver processes, at
    most one instance each is acknowledged so.
    """
    accepted: list[Path] = []
    for path in files:
        status, elapsed = _store(node.port, path)
        assert elapsed < BUSY_S + 3.0, elapsed
        if status == 0xA700:
            return accepted
        assert status == 0x0000
        accepted.append(path)
        wait_until(lambda: node.log().count("could not record it") >= len(accepted), BUSY_S + 10,
                   "the receiver to find the database refusing the row")
    raise AssertionError(f"no 0xA700 after {len(files)} C-STOREs while the database fails")


def _recorded(node: Any) -> int:
    rows = node.status_json()
    return sum(int(r["instance_count"]) for r in rows)


def test_a_database_locked_by_another_process_gives_a700_in_time(node: Any) -> None:
    files = dicomdir_series("98892001/CT5N")[:4]
    db_path = node.state / DATABASE_NAME
    holder = sqlite3.connect(db_path, isolation_level=None, timeout=1)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        accepted = _until_refused(node, files)
        assert 1 <= len(accepted) <= 2, accepted
        assert not _readyz(node)["ready"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # Once the lock is gone, what was acknowledged is recorded, and intake resumes.
    wait_until(lambda: _recorded(node) == len(accepted), 20, "the journaled instances to be recorded")
    for path in files:
        assert _store(node.port, path)[0] == 0x0000  # the refused ones, sent again, are stored
    wait_until(lambda: _recorded(node) == len(files), 20, "every instance recorded")
    assert _readyz(node)["checks"]["database"] == "ok"


def test_a_journal_that_cannot_be_written_gives_a700_then_recovers(node: Any) -> None:
    files = dicomdir_series("98892001/CT5N")[:5]
    journal = node.state / f"{DATABASE_NAME}-journal"
    assert _store(node.port, files[0])[0] == 0x0000
    wait_until(lambda: _recorded(node) == 1, 20, "the first instance recorded (the journal file exists)")
    if journal.exists():
        journal.unlink()
    journal.mkdir()  # SQLite can no longer create or open its rollback journal
    try:
        accepted = _until_refused(node, files[1:])
        assert 1 <= len(accepted) <= 2, accepted
        checks = _readyz(node)["checks"]
        assert checks["database"].startswith("writes fail"), checks
    finally:
        shutil.rmtree(journal)
    wait_until(lambda: _recorded(node) == 1 + len(accepted), 20, "the journaled instances to be recorded")
    for path in files:
        assert _store(node.port, path)[0] == 0x0000
    wait_until(lambda: _recorded(node) == len(files), 20, "every instance recorded")
    assert _readyz(node)["checks"]["database"] == "ok"
    assert node.proc.poll() is None, "the node must still run"
    assert "Fatal Python error" not in node.log()


def test_the_database_has_no_memory_mapped_shared_file(node: Any) -> None:
    assert _store(node.port, dicomdir_series("98892001/CT5N")[0])[0] == 0x0000
    names = os.listdir(node.state)
    assert f"{DATABASE_NAME}-shm" not in names and f"{DATABASE_NAME}-wal" not in names, names
    # WAL would persist in the file (a new connection would report "wal"); a rollback journal does not.
    with sqlite3.connect(node.state / DATABASE_NAME) as conn:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode != "wal"
