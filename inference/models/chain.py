"""``type: chain`` models: a segmentation, then a second model on each region (region experts).

The first model segments the whole volume.  For each selected label that is
present, the bounding box of its voxels, grown by ``margin_mm`` on every
side, is cut out of the volume (with the matching origin, so the geometry
stays exact) and given to the second model:

* a **segmentation** expert's labels are written into that box of the output
  label map, as labels of their own (the expert's label value plus an offset
  above the first model's labels); the first model's labels stay where the
  expert found nothing;
* a **classification** expert's answers are reported per region, named
  ``"<region>: <class>"``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np

from inference.models.python_callable import segment_volumes
from inference.types import Classification, Model, ModelCard, Prediction, Task, Volume

logger = logging.getLogger(__name__)


def crop(volume: Volume, box: tuple[slice, slice, slice]) -> Volume:
    """The part of ``volume`` inside ``box`` (``z, y, x`` slices), with its origin moved accordingly."""
    start = np.array([s.start for s in box], dtype=float)
    steps = np.asarray(volume.direction, dtype=float) * np.asarray(volume.spacing, dtype=float)[:, None]
    origin = np.asarray(volume.origin, dtype=float) + start @ steps
    return Volume(np.ascontiguousarray(volume.array[box]), volume.spacing,
                  (float(origin[0]), float(origin[1]), float(origin[2])),
                  volume.direction, volume.modality)


def region_box(mask: np.ndarray, spacing: tuple[float, float, float], margin_mm: float) -> tuple[slice, slice, slice]:
    """Bounding box of ``mask`` grown by ``margin_mm`` along each axis, clipped to the array."""
    idx = np.nonzero(mask)
    out = []
    for axis, (values, step) in enumerate(zip(idx, spacing)):
        pad = int(math.ceil(margin_mm / step)) if margin_mm > 0 else 0
        out.append(slice(max(int(values.min()) - pad, 0), min(int(values.max()) + 1 + pad, mask.shape[axis])))
    return out[0], out[1], out[2]


class ChainModel(Model):
    """Run ``first``, then ``then`` on each region of ``first``'s segmentation.

    Parameters
    ----------
    name, version, intended_use:
        The chain's own card entries.
    first:
        A segmentation model.
    then:
        A segmentation or classification model (the region expert).
    regions:
        Label values of ``first`` to hand on; empty means all of its labels.
    margin_mm:
        Context added around each region's bounding box.

    Raises
    ------
    ValueError
        If ``first`` is not a segmentation model or ``regions`` names labels it does not have.
    """

    def __init__(self, name: str, version: str, first: Model, then: Model, regions: tuple[int, ...] = (),
                 margin_mm: float = 10.0, intended_use: str = "") -> None:
        if first.card.task is not Task.SEGMENTATION:
            raise ValueError(f"chain {name}: first model {first.card.name} is not a segmentation model")
        known = {s.label: s for s in first.card.segments}
        unknown = sorted(set(regions) - set(known))
        if unknown:
            raise ValueError(f"chain {name}: regions {unknown} are not labels of {first.card.name} "
                             f"(labels: {sorted(known)})")
        self.first, self.then, self.margin_mm = first, then, margin_mm
        self.regions = tuple(known[r] for r in (regions or sorted(known)))
        self.offset = max(known, default=0)
        expert = tuple(replace(s, label=s.label + self.offset) for s in then.card.segments)
        if then.card.task is Task.SEGMENTATION and max((s.label for s in expert), default=0) > 65535:
            raise ValueError(f"chain {name}: label values above 65535 after offsetting the expert's labels")
        self.card = ModelCard(
            name=name, version=version, family="Artificial Intelligence", task=Task.SEGMENTATION,
            intended_use=intended_use or f"{first.card.name}, then {then.card.name} on each region",
            modality=first.card.modality or then.card.modality,
            segments=first.card.segments + (expert if then.card.task is Task.SEGMENTATION else ()),
            classes=then.card.classes,
        )

    def predict(self, volume: Volume) -> Prediction:
        base = self.first.predict(volume)
        if base.labelmap is None:
            raise ValueError(f"model {self.first.card.name} returned no label map")
        dtype = np.uint16 if max((s.label for s in self.card.segments), default=0) > 255 else np.uint8
        labelmap = base.labelmap.astype(dtype)
        classifications: list[Classification] = []
        findings = list(base.findings)
        for region in self.regions:
            mask = base.labelmap == region.label
            if not mask.any():
                continue
            box = region_box(mask, volume.spacing, self.margin_mm)
            result = self.then.predict(crop(volume, box))
            findings.extend(f"{region.name}: {f}" for f in result.findings)
            if self.then.card.task is Task.CLASSIFICATION:
                classifications.extend(replace(c, name=f"{region.name}: {c.name}"[:64])
                                       for c in result.classifications)
                continue
            if result.labelmap is None or result.labelmap.shape != mask[box].shape:
                raise ValueError(f"model {self.then.card.name} returned no label map of the region's shape")
            found = result.labelmap > 0
            labelmap[box][found] = result.labelmap[found].astype(dtype) + self.offset
            logger.debug("Chain %s: region %s, %d expert voxels", self.card.name, region.name, int(found.sum()))
        return Prediction(card=self.card, labelmap=labelmap,
                          measurements=segment_volumes(labelmap, self.card, volume),
                          classifications=tuple(classifications), findings=tuple(findings))
