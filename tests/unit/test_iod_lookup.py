"""highdicom's IOD lookup, remembered (:mod:`dicom_node.results.iod_lookup`): same answers, same objects, fewer walks."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from highdicom import _standard_utils
from pydicom import Dataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from dicom_node.results import iod_lookup
from dicom_node.results.identity import DEFAULT_UID_ROOT, derive_identity
from dicom_node.results.seg import build_seg
from inference.types import SCT_ANATOMICAL_STRUCTURE, Code, ModelCard, Prediction, SegmentSpec
from tests.realdata import real_ct_slices

CARD = ModelCard(name="iod-lookup", version="1", segments=(
    SegmentSpec(1, "Ventricle", SCT_ANATOMICAL_STRUCTURE, Code("35764002", "SCT", "Brain ventricle"), (0, 0, 255)),
))


@pytest.fixture
def original() -> Iterator[object]:
    """highdicom's own function, and the remembering version put back afterwards."""
    assert iod_lookup.install()
    remembering = _standard_utils.is_attribute_in_iod
    yield remembering.__wrapped__  # type: ignore[attr-defined]
    _standard_utils.is_attribute_in_iod = remembering  # type: ignore[assignment]


def _seg_bytes(sources: list[Dataset]) -> bytes:
    labelmap = np.zeros((len(sources), int(sources[0].Rows), int(sources[0].Columns)), np.uint8)
    labelmap[2:-2, 200:260, 180:300] = 1
    identity = derive_identity(DEFAULT_UID_ROOT, str(sources[0].SeriesInstanceUID), CARD.name, CARD.version,
                               "seg", 901, "AI SEG")
    seg = build_seg(Prediction(CARD, labelmap), sources, identity).dataset
    for element in seg.iterall():  # the build's clock and highdicom's random dimension UID, not what it built
        if element.VR in ("DA", "TM", "DT"):
            element.value = {"DA": "20261207", "TM": "120000", "DT": "20261207120000"}[element.VR]
        elif element.keyword == "DimensionOrganizationUID":
            element.value = "1.2.3"
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("attribute, sop_class, exclude", [
    ("NumberOfFrames", CTImageStorage, None),
    ("NumberOfFrames", EnhancedCTImageStorage, None),
    ("NumberOfFrames", SegmentationStorage, None),
    ("PixelData", SecondaryCaptureImageStorage, ["IconImageSequence"]),
    ("FloatPixelData", CTImageStorage, ["IconImageSequence"]),
    ("TotalPixelMatrixRows", CTImageStorage, None),
])
def test_answers_are_highdicoms(original: object, attribute: str, sop_class: str, exclude: list[str] | None) -> None:
    remembering = _standard_utils.is_attribute_in_iod
    for _ in range(2):  # the second answer comes from memory
        assert remembering(attribute, sop_class, exclude) is original(attribute, sop_class, exclude)  # type: ignore[operator]


def test_an_unknown_sop_class_is_still_highdicoms_error(original: object) -> None:
    for _ in range(2):  # an error is not remembered as an answer
        with pytest.raises(KeyError, match="No IOD found"):
            _standard_utils.is_attribute_in_iod("NumberOfFrames", "1.2.3.4")


def test_a_seg_is_the_same_object_and_asks_once_per_question(original: object) -> None:
    sources = real_ct_slices(24, spacing_mm=2.5)
    remembering = _standard_utils.is_attribute_in_iod
    before = remembering.cache_info()  # type: ignore[attr-defined]
    fast = _seg_bytes(sources)
    after = remembering.cache_info()  # type: ignore[attr-defined]
    assert after.hits - before.hits >= len(sources) - 1  # one question per source image, answered from memory
    _standard_utils.is_attribute_in_iod = original  # type: ignore[assignment]
    assert _seg_bytes(sources) == fast


def test_install_is_idempotent_and_leaves_an_unknown_helper_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    assert iod_lookup.install()
    remembering = _standard_utils.is_attribute_in_iod
    assert iod_lookup.install() and _standard_utils.is_attribute_in_iod is remembering

    def changed(attribute: str, sop_class_uid: str) -> bool:  # a later highdicom's different helper
        return False

    monkeypatch.setattr(_standard_utils, "is_attribute_in_iod", changed)
    assert not iod_lookup.install()
    assert _standard_utils.is_attribute_in_iod is changed
