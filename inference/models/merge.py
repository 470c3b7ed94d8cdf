"""``type: merge``: several segmentation models on one series, one label map and one label list.

A TotalSegmentator-class task is several models (nnU-Net folders, each a part
of the body) whose label maps together are the answer.  Each part runs on the
same volume; its labels are renumbered into one sequence (the parts in the
configured order, each part's labels in its own order), and the label maps are
merged voxel by voxel.  Where two parts label the same voxel, ``overlap``
decides: ``first`` keeps the earlier part's label, ``last`` the later one; the
count of such voxels is reported as a finding when it is not zero.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from inference.models.python_callable import segment_volumes
from inference.types import Model, ModelCard, Prediction, SegmentSpec, Task, Volume

logger = logging.getLogger(__name__)


class MergeModel(Model):
    """Run every part and merge their label maps (see the module docstring).

    Raises
    ------
    ValueError
        A part that is not a segmentation model, two parts with the same
        segment name, or more than 65535 labels.
    """

    def __init__(self, name: str, version: str, parts: Sequence[Model], overlap: str = "first",
                 intended_use: str = "") -> None:
        if overlap not in ("first", "last"):
            raise ValueError(f"merge {name}: overlap is first or last (got {overlap!r})")
        segments: list[SegmentSpec] = []
        self.lookups: list[np.ndarray] = []
        seen: dict[str, str] = {}
        for part in parts:
            if part.card.task is not Task.SEGMENTATION:
                raise ValueError(f"merge {name}: {part.card.name} is not a segmentation model")
            lookup = np.zeros(max((s.label for s in part.card.segments), default=0) + 1, np.int64)
            for spec in part.card.segments:
                if spec.name in seen:
                    raise ValueError(f"merge {name}: segment {spec.name!r} is in both {seen[spec.name]} and "
                                     f"{part.card.name}: give one of them labels with another name")
                seen[spec.name] = part.card.name
                lookup[spec.label] = len(segments) + 1
                segments.append(replace(spec, label=len(segments) + 1))
            self.lookups.append(lookup)
        if len(segments) > 65535:
            raise ValueError(f"merge {name}: {len(segments)} labels is more than a label map holds (65535)")
        self.parts, self.overlap = tuple(parts), overlap
        modality = next((p.card.modality for p in parts if p.card.modality), "")
        runtimes = [f"{p.card.name}: {p.card.runtime}" for p in parts if p.card.runtime]
        self.card = ModelCard(
            name=name, version=version, family="Artificial Intelligence", task=Task.SEGMENTATION,
            intended_use=intended_use or "merged segmentation of " + ", ".join(p.card.name for p in parts),
            modality=modality, segments=tuple(segments), runtime="; ".join(runtimes))

    def predict(self, volume: Volume) -> Prediction:
        dtype = np.uint16 if len(self.card.segments) > 255 else np.uint8
        merged = np.zeros(volume.shape, dtype)
        findings: list[str] = []
        overlapping = 0
        for part, lookup in zip(self.parts, self.lookups, strict=True):
            result = part.predict(volume)
            if result.labelmap is None or result.labelmap.shape != volume.shape:
                raise ValueError(f"model {part.card.name} returned no label map of the volume's shape")
            labels = result.labelmap.astype(np.int64)
            if labels.max(initial=0) >= len(lookup):
                raise ValueError(f"model {part.card.name} wrote label {int(labels.max())}, not one of its labels")
            mapped: np.ndarray = lookup[labels].astype(dtype)
            found = np.greater(mapped, 0)
            taken = found & np.greater(merged, 0)
            overlapping += int(np.count_nonzero(taken))
            write = found & ~taken if self.overlap == "first" else found
            merged[write] = mapped[write]
            findings.extend(f"{part.card.name}: {f}" for f in result.findings)
        if overlapping:
            findings.append(f"{overlapping} voxel(s) labelled by more than one model; the "
                            f"{'earlier' if self.overlap == 'first' else 'later'} model's label kept")
        logger.debug("Merge %s: %d parts, %d overlapping voxels", self.card.name, len(self.parts), overlapping)
        return Prediction(card=self.card, labelmap=merged, measurements=segment_volumes(merged, self.card, volume),
                          findings=tuple(findings))
