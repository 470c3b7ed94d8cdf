"""What every network model shares: device choice, AMP, image in MONAI's convention, outputs decoded.

A :class:`~inference.types.Volume` is ``[z, y, x]`` in LPS patient
coordinates; MONAI (``LoadImage`` with its default readers) hands networks an
image ``[x, y, z]`` whose 4x4 ``affine`` maps voxel indices to RAS.
:func:`to_metatensor` builds exactly that, so a bundle's own transforms
(``Orientationd``, ``Spacingd``, ...) see what they would have seen from a
file, and :func:`to_volume_order` turns a result on that grid back into
``[z, y, x]``.

Execution: :func:`resolve_device` (``auto`` -> ``cuda`` when available),
:func:`inference_context` (``torch.inference_mode`` plus ``torch.autocast``
in float16 on CUDA when AMP is on), :func:`amp_context` (the autocast alone:
the models put it around the network's forward passes only, so that their
transforms, resampling grids and inversion included, run in full precision,
as MONAI's own evaluators do).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from inference.types import Classification, ModelCard, Volume

logger = logging.getLogger(__name__)

#: LPS -> RAS: negate the first two patient axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def resolve_device(name: str) -> torch.device:
    """The torch device for a model's ``device`` setting.

    Parameters
    ----------
    name:
        ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises
    ------
    RuntimeError
        If a CUDA device is asked for and none (or not that index) is available.
    """
    if name == "auto":
        # The worker process has bound its GPU (torch.cuda.set_device): use that one.
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available; use device: auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


@contextlib.contextmanager
def amp_context(device: torch.device, amp: bool) -> Iterator[None]:
    """``torch.autocast`` (float16) on CUDA when ``amp`` is on; nothing otherwise.

    For the network's forward passes only.  Under autocast every float32
    ``matmul``/``bmm`` on CUDA runs in float16, ``affine_grid``'s inside
    ``grid_sample`` too: a resampling grid of a 512-voxel axis in float16 is
    off by up to a tenth of a voxel, enough to move a nearest-neighbour label
    at a border when the prediction is inverted to the source grid.
    """
    if amp and device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            yield
    else:
        yield


@contextlib.contextmanager
def inference_context(device: torch.device, amp: bool) -> Iterator[None]:
    """``torch.inference_mode``, with :func:`amp_context` around all of it (a bare forward pass)."""
    with torch.inference_mode(), amp_context(device, amp):
        yield


def affine_ras(volume: Volume) -> np.ndarray:
    """4x4 affine from MONAI voxel indices ``(i, j, k) = (x, y, z)`` to RAS mm."""
    direction = np.asarray(volume.direction, dtype=float)
    spacing = np.asarray(volume.spacing, dtype=float)
    lps = np.eye(4)
    # Column i is the step of array axis i: x (row direction), y (column direction), z (slice step).
    lps[:3, 0] = direction[2] * spacing[2]
    lps[:3, 1] = direction[1] * spacing[1]
    lps[:3, 2] = direction[0] * spacing[0]
    lps[:3, 3] = np.asarray(volume.origin, dtype=float)
    return _LPS_TO_RAS @ lps


def to_metatensor(volume: Volume, channel: bool = False, device: torch.device | None = None) -> MetaTensor:
    """The volume as MONAI's ``LoadImage`` would return it: ``[x, y, z]``, RAS affine, float32.

    Parameters
    ----------
    channel:
        Add a leading channel axis (``[1, x, y, z]``); without it the metadata
        says "no channel", as for a NIfTI file, so ``EnsureChannelFirstd`` works.
        A multi-channel volume (:attr:`Volume.channels`) is always
        ``[c, x, y, z]`` with channel 0 first, as ``LoadImage`` stacks a list
        of files.
    device:
        Where the tensor goes.  On an accelerator the volume is uploaded as it
        is stored (``[c, z, y, x]``, contiguous) and reordered there, so the
        host makes no reordered copy of it (0.6-0.8 s for 300 x 512x512 on 2 cores).
    """
    several = bool(volume.channels)
    stack = np.asarray(volume.channel_first(), dtype=np.float32)
    if device is not None and device.type != "cpu":
        with warnings.catch_warnings():  # read only: the upload is a copy, the source is never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            host = torch.from_numpy(np.ascontiguousarray(stack))
        data = host.to(device).permute(0, 3, 2, 1).contiguous()
    else:
        data = torch.from_numpy(reordered(stack, (0, 3, 2, 1)))
    affine = torch.as_tensor(affine_ras(volume), dtype=torch.float64)
    meta: dict[str, Any] = {
        "affine": affine.clone(),
        "original_affine": affine.clone(),
        "spatial_shape": np.asarray(data.shape[1:]),
        "original_channel_dim": 0 if channel or several else float("nan"),
        "filename_or_obj": "dicom-node-volume",
        "space": "RAS",
    }
    return MetaTensor(data if channel or several else data[0], meta=meta)


def to_volume_order(array: np.ndarray) -> np.ndarray:
    """A ``[x, y, z]`` array (MONAI's order) as ``[z, y, x]`` (the node's order)."""
    return reordered(np.asarray(array), (2, 1, 0))


def reordered(array: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``array`` with its axes in the order ``axes``, as a new C-contiguous array.

    Done by torch (blocked, on every core torch uses): twice as fast as numpy's
    copy of a transposed view on this project's 2-core machine (0.8 against
    1.5 s for a 300 x 512x512 float32 volume).  Arrays torch cannot take (a
    foreign byte order, an object array) go the numpy way.
    """
    try:
        with warnings.catch_warnings():  # read only here: the copy is new, the source is never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(array).permute(*axes).contiguous().numpy()
    except (TypeError, ValueError, RuntimeError):
        return np.ascontiguousarray(array.transpose(axes))


def channel_argmax(t: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """``torch.argmax(t, dim=0)``: the same indices (the first of equal maxima, NaN as the maximum), in a tenth of
    the time on the CPU.

    torch's CPU ``argmax`` over a leading axis of a few channels walks the
    volume one voxel at a time; ``max(dim=0)`` reduces it in blocks: for
    3 x 3.5 Mvoxel float32 (2 cores) 0.27 s against 0.027 s, 0.67 s against
    0.03 s when the channels are not contiguous (as an inverted prediction
    is).  On CUDA both are fast.
    """
    return torch.max(t, dim=0, keepdim=keepdim).indices


def decode_segmentation(pred: torch.Tensor, activation: str) -> torch.Tensor:
    """Network output ``[C, x, y, z]`` (no batch axis) to a label map ``[1, x, y, z]`` (float).

    ``C > 1`` with ``softmax`` (or ``none``): argmax, channel ``c`` is label
    ``c`` and channel 0 background.  One channel, or ``sigmoid``: channel ``c``
    is label ``c + 1`` where its probability is at least 0.5 (a later channel
    wins where several are).
    """
    pred = pred.float()
    if pred.shape[0] > 1 and activation != "sigmoid":
        return channel_argmax(pred, keepdim=True).float()
    probs = torch.sigmoid(pred) if activation == "sigmoid" or pred.shape[0] == 1 and activation != "none" else pred
    labels = torch.zeros_like(pred[:1])
    for c in range(pred.shape[0]):
        labels[0][probs[c] >= 0.5] = float(c + 1)
    return labels


def labelmap_from_output(pred: Any, card: ModelCard, expected_shape: tuple[int, ...]) -> np.ndarray:
    """A post-processed label map ``[1, x, y, z]`` (or ``[x, y, z]``) as the node's ``[z, y, x]`` array.

    Labels the card does not declare are set to background (a bundle whose
    labels were narrowed in the config, e.g. one organ of a whole-body model).

    Raises
    ------
    ValueError
        If the label map is not on the input grid.
    """
    known = np.array(sorted({s.label for s in card.segments}), dtype=np.int64)
    top = int(known.max()) if known.size else 0
    if isinstance(pred, torch.Tensor):
        labels = _labels_on_device(pred, card, known, top)
    else:
        labels = to_volume_order(_narrowed(np.asarray(pred), card, known, top))
    if labels.shape != expected_shape:
        raise ValueError(f"model {card.name}: output shape {labels.shape} (z, y, x) is not the input grid "
                         f"{expected_shape}; the model's postprocessing must invert its spatial transforms")
    return labels


#: Undeclared label values inside ``1..top`` cleared one comparison each, up to this many (else a lookup table).
_GAPS_CLEARED_ONE_BY_ONE = 8


def _labels_on_device(pred: torch.Tensor, card: ModelCard, known: np.ndarray, top: int) -> np.ndarray:
    """A label tensor ``[1, x, y, z]`` / ``[C, x, y, z]`` / ``[x, y, z]`` as the node's ``[z, y, x]`` array.

    Everything happens where the tensor is (the GPU for a network on one):
    argmax or rounding, undeclared labels set to background, the narrowing
    to 8 bits (16 above 255 labels) and the axis order; only the final label
    map crosses to the host, a quarter of the 32-bit map it used to be, and
    the host does no pass over the volume at all.
    """
    t = (pred.as_tensor() if isinstance(pred, MetaTensor) else pred).detach()
    if t.ndim == 4:
        t = channel_argmax(t) if t.shape[0] != 1 else t[0]
    if t.ndim != 3:
        raise ValueError(f"model {card.name}: output shape {tuple(pred.shape)} is not a label map [1, x, y, z] or "
                         "[x, y, z]; the model's postprocessing must invert its spatial transforms")
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if t.is_floating_point():
        t = torch.round(t.float())
    lowest, highest = (float(v) for v in torch.aminmax(t))
    if math.isnan(lowest) or math.isnan(highest):  # a network that gave NaN there: background, as any undeclared value
        nan = torch.isnan(t)
        logger.debug("Model %s: %d voxels of NaN set to background", card.name, int(nan.count_nonzero()))
        t = t.masked_fill(nan, 0)
        lowest, highest = (float(v) for v in torch.aminmax(t))
    gaps = sorted(set(range(1, top + 1)) - set(known.tolist()))
    dropped = 0
    if lowest < 0 or highest > top:
        outside = (t < 0) | (t > top)
        dropped += int(outside.count_nonzero())
        t = t.masked_fill(outside, 0)
    if gaps and len(gaps) <= _GAPS_CLEARED_ONE_BY_ONE:
        for gap in gaps:
            undeclared = t == gap
            dropped += int(undeclared.count_nonzero())
            t = t.masked_fill(undeclared, 0)
    elif gaps:
        lut = torch.zeros(top + 1, dtype=torch.int64, device=t.device)
        lut[torch.from_numpy(known).to(t.device)] = torch.from_numpy(known).to(t.device)
        before = int(t.count_nonzero())
        t = lut[t.to(torch.int64)]
        dropped += before - int(t.count_nonzero())
    if dropped:
        logger.debug("Model %s: %d voxels with undeclared labels set to background", card.name, dropped)
    if top <= 255:
        return t.to(torch.uint8).permute(2, 1, 0).contiguous().cpu().numpy()
    # torch has no general 16-bit unsigned type: 16-bit signed below 32768 (same bits), else 32 bits narrowed here.
    wide = t.to(torch.int16 if top < 2**15 else torch.int32).permute(2, 1, 0).contiguous().cpu().numpy()
    return wide.view(np.uint16) if wide.dtype == np.int16 else wide.astype(np.uint16)


def _narrowed(arr: np.ndarray, card: ModelCard, known: np.ndarray, top: int) -> np.ndarray:
    """A label array (argmax over a channel axis first, rounded) with declared labels only, 8 or 16 bits."""
    if arr.ndim == 4:
        arr = np.argmax(arr, axis=0) if arr.shape[0] != 1 else arr[0]
    arr = np.rint(arr)
    if arr.dtype.kind == "f" and np.isnan(arr).any():  # NaN: background, as any undeclared value
        arr = np.where(np.isnan(arr), 0.0, arr)
    dtype = np.uint16 if top > 255 else np.uint8
    # Lookup table: declared labels map to themselves, anything else (undeclared, negative) to 0.
    lut = np.zeros(top + 2, dtype=dtype)
    lut[known] = known
    flat = np.clip(arr, -1, top + 1).astype(np.int64)
    flat[flat < 0] = top + 1
    mapped = lut[np.minimum(flat, top + 1)]
    dropped = int(np.count_nonzero(arr)) - int(np.count_nonzero(mapped))
    if dropped:
        logger.debug("Model %s: %d voxels with undeclared labels set to background", card.name, dropped)
    return mapped


def classify(scores: Any, card: ModelCard, activation: str, threshold: float) -> tuple[Classification, ...]:
    """Network scores (one per class, in ``card.classes`` order) as classifications.

    ``softmax`` over the scores, ``sigmoid`` on each, or ``none`` (already
    probabilities).  A class is positive when its probability is at least
    ``threshold``.

    Raises
    ------
    ValueError
        If the number of scores is not the number of classes.
    """
    t = torch.as_tensor(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores).float().flatten()
    if t.numel() != len(card.classes):
        raise ValueError(f"model {card.name}: {t.numel()} output score(s) for {len(card.classes)} "
                         f"class(es) {list(card.classes)}")
    if activation == "softmax":
        t = torch.softmax(t, dim=0)
    elif activation == "sigmoid":
        t = torch.sigmoid(t)
    probs = [float(p) for p in t.tolist()]
    if any(not 0.0 <= p <= 1.0 or p != p for p in probs):
        raise ValueError(f"model {card.name}: scores {probs} are not probabilities; set activation")
    return tuple(Classification(name, p, p >= threshold) for name, p in zip(card.classes, probs))
