"""The node's own processes (main, receivers) start without torch and MONAI: only the inference worker needs them.

Receiver processes are started by multiprocessing's spawn, which imports the main module
(``dicom_node.cli``) again in each: whatever it imports, every receiver pays for, in start-up
seconds and resident memory (torch and MONAI: ~4 s and ~100 MB per process on the development machine).
"""

from __future__ import annotations

import subprocess
import sys


def test_the_cli_and_the_receivers_do_not_import_torch_or_monai() -> None:
    code = ("import sys, dicom_node.cli, dicom_node.receive.pool; "
            "heavy = sorted(m for m in ('torch', 'monai', 'SimpleITK', 'nnunetv2') if m in sys.modules); "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported at start: {out.stdout.strip()}"
