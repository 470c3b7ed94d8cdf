"""Unit-test fixtures shared by every module."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _forget_test_model_modules(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Unload the ``python`` model modules a test wrote into its temporary folder when it ends.

    Python keeps one module per name, and the node refuses a model whose
    module name is already loaded from another folder; tests that write a
    module of the same name into each of their folders must not see the last
    test's.
    """
    yield
    base = tmp_path_factory.getbasetemp()
    roots = tuple({f"{base}{os.sep}", f"{base.resolve()}{os.sep}"})
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and file.startswith(roots):
            del sys.modules[name]
