"""Start-up objects exempt from full garbage collections (:mod:`dicom_node.heap`); later garbage still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from dicom_node.heap import freeze_startup_objects


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def thawed() -> Iterator[None]:
    yield
    gc.unfreeze()  # this test process is not a node's: give its objects back to the collector


def test_startup_objects_are_exempt_and_later_garbage_is_collected(thawed: None) -> None:
    left_by_startup = _cycle()  # garbage already: the collection before freezing takes it
    kept = _Node()
    kept.other = kept
    made_at_startup = weakref.ref(kept)
    frozen = freeze_startup_objects("test")
    assert left_by_startup() is None
    assert frozen == gc.get_freeze_count() > 0
    made_later = _cycle()
    gc.collect()
    assert made_later() is None  # a job's or an association's cycles are collected as before
    del kept
    gc.collect()
    assert made_at_startup() is not None  # a start-up object dropped later is not (why models load after)
