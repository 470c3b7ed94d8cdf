"""Several receiver processes on one port: every instance recorded once, events reach the main process,
and no receiver outlives the node."""

from __future__ import annotations

import os
import signal
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.integration.conftest import node_config, wait_until
from tests.phantoms import make_chest_phantom, write_ct_series

pytestmark = pytest.mark.integration


def _send(port: int, files: list[Path], statuses: list[int], together: threading.Barrier | None = None) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    if together is not None:  # every sender's association is open before anyone sends
        together.wait(60)
    for f in files:
        statuses.append(int(assoc.send_c_store(pydicom.dcmread(f)).Status))
    assoc.release()


def _dead(pid: int) -> bool:
    """The process has exited: a zombie its parent has not reaped yet, or gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in {"Z", "X"}
    except (FileNotFoundError, ProcessLookupError):
        return True


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_four_senders_over_two_receiver_processes(tmp_path: Path, node_factory: Any) -> None:
    config = node_config(tmp_path, rules=[])
    config["node"]["receivers"] = 2
    node = node_factory(config)
    hu, _ = make_chest_phantom(shape=(16, 48, 48), spacing=(3.0, 4.0, 4.0))
    series = [write_ct_series(hu, (3.0, 4.0, 4.0), tmp_path / f"ct{i}") for i in range(4)]
    statuses: list[int] = []
    together = threading.Barrier(4)
    threads = [threading.Thread(target=_send, args=(node.port, files, statuses, together)) for files in series]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses == [0] * 64
    rows = node.status_json()
    assert sorted(r["instance_count"] for r in rows) == [16, 16, 16, 16]
    log = node.log()
    assert "2 receiver processes serve the associations" in log
    # Four associations open at once are spread evenly: each process runs two.
    accepted = [line.split()[3] for line in log.splitlines() if "Association accepted from MODALITY" in line]
    assert sorted(accepted) == ["receiver-0", "receiver-0", "receiver-1", "receiver-1"], accepted
    # The processes' events reach the main process's metrics: exactly the instances sent.
    metrics = f"http://127.0.0.1:{config['http']['port']}/metrics"
    wait_until(lambda: _metric(metrics, "dicomnode_instances_received_total") == 64, 10,
               "the receivers' events in /metrics")
    assert _metric(metrics, "dicomnode_associations_total") >= 4


def test_receivers_die_with_the_node(tmp_path: Path, node_factory: Any) -> None:
    config = node_config(tmp_path, rules=[])
    config["node"]["receivers"] = 2
    node = node_factory(config)
    node.stop(signal.SIGKILL)

    def port_closed() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", node.port)) != 0

    # A receiver left behind would keep acknowledging instances nobody processes.
    wait_until(port_closed, 10, "the receiver processes to exit with the killed node")


def test_a_dead_receiver_is_passed_over_and_started_again(tmp_path: Path, node_factory: Any) -> None:
    config = node_config(tmp_path, rules=[])
    config["node"]["receivers"] = 2
    node = node_factory(config)
    ready = f"http://127.0.0.1:{config['http']['port']}/readyz"

    def ready_again() -> bool:
        try:
            with urllib.request.urlopen(ready, timeout=10) as answer:
                return answer.status == 200 and "2/2 serving" in answer.read().decode()
        except (urllib.error.HTTPError, urllib.error.URLError):
            return False

    # Started, both receivers serving (the node listens before they have said so; a receiver that dies while the
    # node starts is a start-up failure, exit 2: another test)
    wait_until(ready_again, 60, "both receivers to serve")
    pid = int(node.log().split("Receiver process 1 (pid ")[1].split(")")[0])
    os.kill(pid, signal.SIGKILL)
    # Dead, not dying: a connection handed over in the milliseconds the kernel takes to end the process dies with it
    # (its peer sees a reset and sends again, as a PACS does); this test is about what comes after.
    wait_until(lambda: _dead(pid), 10, "the killed receiver to be gone")
    hu, _ = make_chest_phantom(shape=(16, 48, 48), spacing=(3.0, 4.0, 4.0))
    files = write_ct_series(hu, (3.0, 4.0, 4.0), tmp_path / "ct")
    statuses: list[int] = []
    for _ in range(3):  # while receiver 1 is dead or starting: every association is served all the same
        _send(node.port, files, statuses)
    assert statuses == [0] * 48
    wait_until(lambda: f"Receiver process 1 (pid {pid}) died (exit code -9); starting it again" in node.log(), 30,
               "the dead receiver to be noticed")
    wait_until(ready_again, 60, "both receivers alive again")
    # Four associations open at once are spread over both processes again.
    before = node.log().count("Association accepted from MODALITY")
    together = threading.Barrier(4)
    threads = [threading.Thread(target=_send, args=(node.port, files, statuses, together)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses == [0] * 112
    accepted = [line.split()[3] for line in node.log().splitlines() if "Association accepted from MODALITY" in line]
    assert sorted(accepted[before:]) == ["receiver-0", "receiver-0", "receiver-1", "receiver-1"], accepted
