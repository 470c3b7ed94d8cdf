"""External tools the tests run (Orthanc, DCMTK, dciodvfy...): fail under ``CI=true``, skip elsewhere."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def unavailable(reason: str) -> NoReturn:
    """A test cannot run here: a failure under ``CI=true`` (CI must test everything), a skip elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Path of an external tool on ``PATH`` (see :func:`unavailable` when it is missing)."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not found: install the Debian packages orthanc, dcmtk, dicom3tools (make test does)")
    return path
