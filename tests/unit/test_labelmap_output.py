"""A network's label output to the node's label map (:func:`inference.runner.labelmap_from_output`), and its input.

A tensor is decoded where it is (the GPU for a network on one: argmax or
rounding, undeclared labels cleared, narrowed to 8/16 bits, axes reordered) and
only the finished map crosses to the host; an array takes the numpy way.  Both
must give the same map, and the one a reader expects by hand.  The input
(:func:`inference.runner.to_metatensor`) goes to an accelerator as stored and
is reordered there.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from inference.models.python_callable import segment_volumes
from inference.runner import channel_argmax, labelmap_from_output, reordered, to_metatensor
from inference.types import SCT_ANATOMICAL_STRUCTURE, Code, ModelCard, SegmentSpec, Volume

SHAPE_XYZ = (6, 5, 4)  # MONAI's [x, y, z]: the node's map is (4, 5, 6)


def _card(*labels: int) -> ModelCard:
    return ModelCard(name="net", version="1", segments=tuple(
        SegmentSpec(label, f"S{label}", SCT_ANATOMICAL_STRUCTURE, Code("91723000", "SCT", "Anatomical structure"),
                    (label % 256, 0, 0)) for label in labels))


def _both(pred: torch.Tensor, card: ModelCard) -> np.ndarray:
    """The tensor way, checked against the array way on the same values."""
    on_device = labelmap_from_output(pred, card, SHAPE_XYZ[::-1])
    on_host = labelmap_from_output(pred.detach().cpu().numpy(), card, SHAPE_XYZ[::-1])
    assert on_device.dtype == on_host.dtype and on_device.flags.c_contiguous
    np.testing.assert_array_equal(on_device, on_host)
    return on_device


def _expected_zyx(xyz: np.ndarray, dtype: type) -> np.ndarray:
    return np.ascontiguousarray(xyz.transpose(2, 1, 0)).astype(dtype)


def test_declared_labels_pass_in_node_order_as_8_bits() -> None:
    labels = torch.zeros((1, *SHAPE_XYZ))
    labels[0, 1:3, 2:4, 0:2] = 1
    labels[0, 4, 0, 3] = 2
    out = _both(labels, _card(1, 2))
    assert out.dtype == np.uint8 and out.shape == (4, 5, 6)
    np.testing.assert_array_equal(out, _expected_zyx(labels[0].numpy(), np.uint8))
    assert out[3, 0, 4] == 2 and out[0, 2, 1] == 1


def test_channels_are_argmaxed_and_fractions_rounded() -> None:
    logits = torch.randn((3, *SHAPE_XYZ), generator=torch.Generator().manual_seed(1))
    out = _both(logits, _card(1, 2))
    np.testing.assert_array_equal(out, _expected_zyx(torch.argmax(logits, 0).numpy(), np.uint8))
    fractions = torch.full((1, *SHAPE_XYZ), 0.9)
    fractions[0, 0, 0, 0] = 1.6
    out = _both(fractions, _card(1, 2))
    assert out[0, 0, 0] == 2 and out.sum() == 2 + out.size - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool])
def test_any_tensor_type_gives_the_same_map(dtype: torch.dtype) -> None:
    labels = torch.zeros(SHAPE_XYZ)
    labels[2:5, 1:4, 1:3] = 1
    out = _both(labels.to(dtype), _card(1))
    np.testing.assert_array_equal(out, _expected_zyx(labels.numpy(), np.uint8))


def test_undeclared_values_become_background_and_the_log_counts_them(caplog: pytest.LogCaptureFixture) -> None:
    labels = torch.zeros((1, *SHAPE_XYZ), dtype=torch.int64)
    labels[0, 0, 0, :] = 3  # a gap: the card declares 1 and 4
    labels[0, 1, 0, :2] = 7  # above the highest declared label
    labels[0, 2, 0, 0] = -1  # below background
    labels[0, 3, 0, 0] = 4
    labels[0, 3, 1, 0] = 1
    with caplog.at_level(logging.DEBUG, logger="inference.runner"):
        out = _both(labels, _card(1, 4))
    assert sorted(np.unique(out).tolist()) == [0, 1, 4] and out[0, 0, 3] == 4 and out[0, 1, 3] == 1
    assert int(np.count_nonzero(out)) == 2
    assert caplog.messages.count("Model net: 7 voxels with undeclared labels set to background") == 2


def test_many_gaps_go_through_a_lookup_table() -> None:
    card = _card(2, 13, 29)  # 26 undeclared values below the highest
    labels = torch.arange(np.prod(SHAPE_XYZ), dtype=torch.float32).reshape(SHAPE_XYZ) % 32
    out = _both(labels, card)
    expected = np.where(np.isin(labels.numpy(), [2, 13, 29]), labels.numpy(), 0)
    np.testing.assert_array_equal(out, _expected_zyx(expected, np.uint8))


@pytest.mark.parametrize("top", [300, 40_000])
def test_more_than_255_labels_make_a_16_bit_map(top: int) -> None:
    labels = torch.zeros(SHAPE_XYZ, dtype=torch.int64)
    labels[0, 0, 0], labels[1, 0, 0], labels[2, 0, 0] = top, 1, top + 1  # the last is undeclared
    out = _both(labels, _card(1, top))
    assert out.dtype == np.uint16
    assert out[0, 0, 0] == top and out[0, 0, 1] == 1 and out[0, 0, 2] == 0


def test_a_metatensor_is_decoded_like_its_tensor() -> None:
    labels = torch.zeros((1, *SHAPE_XYZ))
    labels[0, 2:4, 1:3, 1] = 1
    meta = MetaTensor(labels, affine=torch.eye(4))
    np.testing.assert_array_equal(labelmap_from_output(meta, _card(1), (4, 5, 6)), _both(labels, _card(1)))


@pytest.mark.parametrize("pred", [torch.zeros((1, 1, *SHAPE_XYZ)), torch.zeros(SHAPE_XYZ[:2]), torch.zeros((6, 5, 3))])
def test_a_map_not_on_the_input_grid_is_a_clear_error(pred: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="model net: output shape"):
        labelmap_from_output(pred, _card(1), (4, 5, 6))


def test_segment_volumes_count_each_label_once() -> None:
    labelmap = np.zeros((4, 5, 6), np.uint8)
    labelmap[0:2, 1:3, 2:5] = 1  # 12 voxels
    labelmap[3, 4, 5] = 4  # 1 voxel; label 2 is declared but absent
    volumes = segment_volumes(labelmap, _card(1, 2, 4), SimpleNamespace(voxel_volume_ml=0.5))  # type: ignore[arg-type]
    assert {label: [m.value for m in ms] for label, ms in volumes.items()} == {1: [6.0], 4: [0.5]}


def test_the_volume_goes_to_an_accelerator_as_stored_and_is_reordered_there() -> None:
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # (z, y, x)
    array.flags.writeable = False  # as a read-ahead buffer may be: read, never written
    volume = Volume(array, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "CT")
    on_host = to_metatensor(volume, channel=True)
    assert tuple(on_host.shape) == (1, 6, 5, 4) and on_host.is_contiguous()
    assert float(on_host[0, 5, 1, 3]) == float(array[3, 1, 5])
    # The 'meta' device stands in for a GPU here (shapes and strides, no values): same layout, same metadata.
    on_device = to_metatensor(volume, channel=True, device=torch.device("meta"))
    assert on_device.device.type == "meta" and on_device.shape == on_host.shape and on_device.is_contiguous()
    assert list(on_device.meta["spatial_shape"]) == list(on_host.meta["spatial_shape"]) == [6, 5, 4]
    assert torch.equal(on_device.affine, on_host.affine)
    assert to_metatensor(volume, device=torch.device("meta")).shape == (6, 5, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.uint16, np.int16, np.bool_, ">i2", object])
def test_reordering_keeps_every_value_and_type(dtype: Any) -> None:
    array = (np.arange(2 * 3 * 4 * 5) % 7).reshape(2, 3, 4, 5).astype(dtype)
    array.flags.writeable = dtype != np.float32  # a read-only volume (a read-ahead buffer) too
    out = reordered(array, (0, 3, 2, 1))
    assert out.flags.c_contiguous and out.dtype == np.dtype(dtype) and out.shape == (2, 5, 4, 3)
    np.testing.assert_array_equal(out, array.transpose(0, 3, 2, 1))


def test_nan_is_background_on_both_ways() -> None:
    labels = torch.ones((1, *SHAPE_XYZ))
    labels[0, 0, 0, 0] = float("nan")
    out = _both(labels, _card(1))
    assert out[0, 0, 0] == 0 and int(out.sum()) == out.size - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.int64])
def test_channel_argmax_is_torch_argmax_for_ties_nan_and_strided_channels(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 3, (4, 9, 10, 11), generator=g).to(dtype)  # three values in four channels: ties everywhere
    if dtype.is_floating_point:
        t[2, 0, 0, 0] = float("nan")
        t[0, 1, 1, 1] = t[3, 1, 1, 1] = float("nan")  # the first NaN wins, as argmax has it
    for x in (t, t.permute(0, 3, 2, 1), t[:, ::2]):  # channels not contiguous, as an inverted prediction's are
        assert torch.equal(channel_argmax(x), torch.argmax(x, dim=0))
        assert torch.equal(channel_argmax(x, keepdim=True), torch.argmax(x, dim=0, keepdim=True))
    if dtype.is_floating_point:
        assert int(channel_argmax(t)[0, 0, 0]) == 2 and int(channel_argmax(t)[1, 1, 1]) == 0
