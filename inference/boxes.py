"""Boxes of a detection network, from its image coordinates to patient coordinates.

A detection network (a MONAI detector, a TorchScript RetinaNet) gives its
boxes as six numbers in one of MONAI's box modes (``xyzxyz``, ``xxyyzz``,
``cccwhd``: :mod:`monai.data.box_utils`) along the spatial axes of the image
it saw, i.e. after preprocessing (reoriented, resampled, resized).  That
image's MetaTensor affine maps its voxel indices to RAS world coordinates,
so the eight corners of a box go through it and then to LPS; or, when the
network's postprocessing already moved the boxes to world coordinates
(MONAI's ``AffineBoxToWorldCoordinated``), only the RAS/LPS flip is left.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.types import Detection, Prediction, Volume

if TYPE_CHECKING:  # torch and MONAI are imported where boxes come from a network, not by the node's scheduler
    import torch

#: LPS <-> RAS: negate x and y (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

logger = logging.getLogger(__name__)

#: Box modes a config may name (MONAI's StandardMode, CornerCornerModeTypeB and CenterSizeMode in 3D).
BOX_MODES = ("xyzxyz", "xxyyzz", "cccwhd")


def as_float_tensor(value: Any) -> torch.Tensor:
    """``value`` (MetaTensor, tensor, array, list or None) as a detached float CPU tensor."""
    import torch
    from monai.data import MetaTensor

    if value is None:
        return torch.zeros(0)
    return (value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)).detach().float().cpu()


def corners_lps(boxes: torch.Tensor, mode: str, image: Any, world: bool = False,
                lps: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(low, high)`` LPS corners (mm) of each box.

    Parameters
    ----------
    boxes:
        ``(n, 6)`` boxes in box mode ``mode``.
    image:
        The image the network saw (a MetaTensor with its RAS affine); used
        when the boxes are in its voxel coordinates.
    world:
        The boxes are already in world coordinates (RAS, or LPS with ``lps``).
    """
    from monai.data import MetaTensor
    from monai.data.box_utils import convert_box_mode

    if not len(boxes):
        return []
    xyz = np.asarray(convert_box_mode(boxes, src_mode=mode, dst_mode="xyzxyz"), dtype=float)
    corners = []
    for box in xyz:
        low, high = box[:3], box[3:]
        if not world:  # voxel coordinates of the preprocessed image: through its RAS affine
            affine = np.asarray(image.affine if isinstance(image, MetaTensor) else np.eye(4), dtype=float)
            points = np.array([[a, b, c, 1.0] for a in (low[0], high[0]) for b in (low[1], high[1])
                               for c in (low[2], high[2])])
            points_lps = (LPS_TO_RAS @ affine @ points.T).T[:, :3]
        else:
            points_lps = np.array([low, high])
            if not lps:
                points_lps = points_lps * np.array([-1.0, -1.0, 1.0])
        corners.append((points_lps.min(axis=0), points_lps.max(axis=0)))
    return corners


def detections_from_boxes(name: str, boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, *,
                          mode: str, image: Any, classes: Sequence[str], threshold: float, limit: int,
                          world: bool = False, lps: bool = False) -> tuple[Detection, ...]:
    """The boxes at ``score >= threshold`` as patient-coordinate detections, best first, at most ``limit``.

    Raises
    ------
    ValueError
        If the counts of boxes, labels and scores differ, a label is not a
        class index, or a score is not a probability (naming the box).
    """
    boxes = boxes.reshape(-1, 6)
    labels, scores = labels.reshape(-1), scores.reshape(-1)
    if not len(labels) == len(scores) == len(boxes):
        raise ValueError(f"model {name}: {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels "
                         "(one of each per box)")
    found = []
    for index, ((low, high), label, score) in enumerate(zip(corners_lps(boxes, mode, image, world, lps),
                                                            labels.tolist(), scores.tolist())):
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"model {name}: box {index} score {score} is not a probability in [0, 1]")
        if label != int(label) or not 0 <= int(label) < len(classes):
            raise ValueError(f"model {name}: box {index} label {label:g} is not the index of one of its classes "
                             f"{list(classes)}")
        if score >= threshold:
            centre, size = (low + high) / 2, high - low
            found.append(Detection(int(label), float(score), (float(centre[0]), float(centre[1]), float(centre[2])),
                                   (float(size[0]), float(size[1]), float(size[2]))))
    found.sort(key=lambda d: -d.score)
    logger.info("Model %s: %d box(es) at score >= %.2f (of %d), the best %d kept", name, len(found), threshold,
                len(boxes), min(len(found), limit))
    return tuple(found[:limit])


def with_box_segments(prediction: Prediction, volume: Volume) -> Prediction:
    """``prediction`` with a label map of its boxes' extents on the volume's grid (one segment per box).

    Box ``i`` (best score first, as reported) is label ``i + 1``, named
    ``"<class> <i + 1>"`` as its finding in the SR, coded from its class
    (:func:`inference.anatomy.finding_segment`).  A voxel belongs to a box
    when its centre lies inside it (patient coordinates, so an oblique grid
    gets the true extent); a box smaller than a voxel keeps the voxel at its
    centre.  Where boxes overlap, the better score wins.
    """
    from inference.anatomy import finding_segment

    detections = sorted(prediction.detections, key=lambda d: -d.score)
    shape = volume.shape
    labelmap = np.zeros(shape, dtype=np.uint16 if len(detections) > 255 else np.uint8)
    steps = np.asarray(volume.direction, dtype=float) * np.asarray(volume.spacing, dtype=float)[:, None]
    to_index = np.linalg.inv(steps.T)  # LPS offset from the origin -> (z, y, x) index
    origin = np.asarray(volume.origin, dtype=float)
    segments = []
    for value, item in reversed(list(enumerate(detections, start=1))):
        centre, half = np.asarray(item.center, dtype=float), np.asarray(item.size, dtype=float) / 2
        corners = np.array([centre + half * np.array([a, b, c]) for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)])
        index = (corners - origin) @ to_index.T
        low = np.clip(np.floor(index.min(axis=0)).astype(int), 0, np.array(shape) - 1)
        high = np.clip(np.ceil(index.max(axis=0)).astype(int), 0, np.array(shape) - 1)
        grid = np.stack(np.meshgrid(*(np.arange(lo, hi + 1) for lo, hi in zip(low, high)), indexing="ij"), axis=-1)
        points = origin + grid @ steps
        inside = np.all(np.abs(points - centre) <= half + 1e-6, axis=-1)
        region = labelmap[low[0]:high[0] + 1, low[1]:high[1] + 1, low[2]:high[2] + 1]
        region[inside] = value
        if not inside.any():
            nearest = np.rint((centre - origin) @ to_index.T).astype(int)
            if np.all(nearest >= 0) and np.all(nearest < np.array(shape)):
                labelmap[tuple(nearest)] = value
        name = prediction.card.classes[item.label] if 0 <= item.label < len(prediction.card.classes) \
            else f"class {item.label}"
        spec = finding_segment(value, name)
        segments.append(replace(spec, name=f"{spec.name} {value}"[:64]))
    if not segments and prediction.card.classes:  # no box: one (empty) segment, so an earlier box SEG can be cleared
        spec = finding_segment(1, prediction.card.classes[0])
        segments.append(replace(spec, name=f"{spec.name} 1"[:64]))
    card = replace(prediction.card, segments=tuple(reversed(segments)))
    return replace(prediction, card=card, labelmap=labelmap, detections=tuple(detections))
