"""Faults under the state database while C-STOREs arrive: 0xA700 in time, a log line, then recovery.

Real faults on the running node (``dicom-node serve`` with two receiver
processes): another process holding the database locked (an sqlite3
``BEGIN EXCLUSIVE``, as a backup tool or a shell would), and the rollback
journal made impossible to create (its path taken by a directory, as a
failing disk or a wrong permission would).  The node answers 0xA700 within
``storage.database_busy_timeout_s`` (well before the sender's timeout), says
why in its log, ``/readyz`` says so, and the next C-STORE after the fault is
stored.
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


def test_a_database_locked_by_another_process_gives_a700_in_time(node: Any) -> None:
    first, second = dicomdir_series("98892001/CT5N")[:2]
    db_path = node.state / DATABASE_NAME
    holder = sqlite3.connect(db_path, isolation_level=None, timeout=1)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        status, elapsed = _store(node.port, first)
        assert status == 0xA700
        assert elapsed < BUSY_S + 3.0, elapsed
        assert not _readyz(node)["ready"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_until(lambda: "could not record it" in node.log(), 10, "the log line")
    assert _store(node.port, second)[0] == 0x0000
    assert _store(node.port, first)[0] == 0x0000  # the refused one, sent again, is stored
    assert _readyz(node)["checks"]["database"] == "ok"


def test_a_journal_that_cannot_be_written_gives_a700_then_recovers(node: Any) -> None:
    first, second = dicomdir_series("98892001/CT5N")[:2]
    journal = node.state / f"{DATABASE_NAME}-journal"
    assert _store(node.port, second)[0] == 0x0000  # the journal file exists once a commit ran
    if journal.exists():
        journal.unlink()
    journal.mkdir()  # SQLite can no longer create or open its rollback journal
    try:
        status, elapsed = _store(node.port, first)
        assert status == 0xA700
        assert elapsed < BUSY_S + 3.0
        checks = _readyz(node)["checks"]
        assert checks["database"].startswith("writes fail"), checks
    finally:
        shutil.rmtree(journal)
    wait_until(lambda: "could not record it" in node.log(), 10, "the log line")
    assert _store(node.port, first)[0] == 0x0000
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
