"""Logging set-up: what a node process logs, and what it does not spend time formatting."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import logging
from dicom_node.logs import configure_logging
configure_logging("DEBUG")
from pynetdicom import AE, evt
from pynetdicom.association import Association
assoc = Association(AE(), "requestor")
print("PROBE", logging.getLogger("pynetdicom").level, len(assoc.get_handlers(evt.EVT_PDU_RECV)),
      len(assoc.get_handlers(evt.EVT_DIMSE_RECV)), len(assoc.get_handlers(evt.EVT_PDU_SENT)),
      len(assoc.get_handlers(evt.EVT_DIMSE_SENT)))
"""


def test_pynetdicom_formats_no_log_lines_per_message_that_the_node_would_drop() -> None:
    # pynetdicom's logger stays at WARNING even at the node's DEBUG level, so its standard per-PDU and
    # per-DIMSE handlers (which copy a received data set to say it is "Present") must not be bound either.
    # In a child process: the setting is process-wide.
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    probe = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert probe == [["30", "0", "0", "0", "0"]], done.stdout[-2000:]
