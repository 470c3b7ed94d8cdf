"""The built-in ``lungs-ct`` model: no weights, no torch, numpy + scipy only.

``lungs-ct``
    Right and left lung segmentation of a chest CT by thresholding and
    morphology, with per-lung volume, mean lung density and %LAA-950.

The algorithm (:class:`LungsCT`) works on a coarse grid (about 1.5 mm) for
every connectivity decision and writes the final mask at full resolution:

1. *Body*: the largest connected region above -500 HU, holes filled in each
   axial slice (so the lungs are inside it).
2. *Internal air*: voxels below -320 HU inside the body.  Air regions that
   touch the air outside the body (skin folds, the gap between arms and
   chest, an open nose) are dropped unless they are large (>= 200 ml: in a
   scan that includes the face the lungs reach the nostrils through the
   airway).
3. *Airway*: the trachea is found as a small, round, pure-air (< -900 HU)
   blob near the body's mid-sagittal plane in the most superior slices of the
   large air regions; it is grown in 3D below a strict threshold (-900, then
   -950, -980 HU if the growth leaks into the lungs, i.e. exceeds 200 ml) and
   removed with a one-voxel margin.  If no threshold gives a plausible airway
   it is left in place; step 5 then still separates the lungs and the
   trachea's few tens of ml stay with one lung.
4. *Lung candidates*: remaining air regions of at least 50 ml, at least
   15 mm thick along the body axis, whose median is not pure gas
   (>= -970 HU, which rejects stomach/bowel gas, a hollow phantom and the
   hollow parts of a couch).
5. *Right/left*: if the two largest candidates lie on opposite sides of the
   body's mid-sagittal plane (x of the body's centroid) and the smaller is
   at least a fifth of the larger, they are the two lungs.  Otherwise the
   largest is eroded in-plane (distance transform, up to 20 mm) until it
   falls apart into two comparable parts on opposite sides of the midline,
   and every voxel goes to the nearest part; if it never does, it is one
   lung (a second, smaller candidate on the other side becomes the other
   lung), unless a quarter or more of it lies on each side of the midline,
   in which case it is cut at the midline.  Sides are decided in *patient*
   coordinates (LPS: +x is patient left), never from the image orientation.
6. *Full resolution*: the coarse labels (grown by one coarse voxel) select
   full-resolution voxels below -320 HU; each lung is closed in-plane
   (2 mm) and its holes filled slice by slice, so vessels and small nodules
   count as lung.

Volumes use :attr:`Volume.voxel_volume_ml`, ``|det|`` of the three axis step
vectors (direction rows scaled by spacing), which is right for sheared
(gantry tilt) grids too.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.models.lungs_ct_card import (
    LAA950_PERCENT,
    LEFT_LUNG,
    LUNGS_CT_CARD,
    NO_LUNGS_FOUND,
    RIGHT_LUNG,
    LungsCTParameters,
)
from inference.models.morphology import (
    block_mean,
    disk,
    fill_holes_per_slice,
    largest_component,
    upsample_box,
    upsampled_box,
)
from inference.types import (
    SCT_MEAN,
    SCT_VOLUME,
    UCUM_HU,
    UCUM_ML,
    UCUM_PERCENT,
    Measurement,
    Model,
    Prediction,
    Volume,
)

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class _Grid:
    """Working geometry: axis 0 is the axis closest to patient superior-inferior.

    ``steps`` rows are the LPS step vectors (mm) of the *full-resolution*
    working axes; ``factors`` the coarse block size per axis.
    """

    origin: np.ndarray
    steps: np.ndarray
    factors: tuple[int, int, int]
    superior_sign: float

    @property
    def coarse_spacing(self) -> np.ndarray:
        """Length (mm) of one coarse step along each working axis."""
        return np.linalg.norm(self.steps, axis=1) * np.asarray(self.factors, dtype=float)

    def patient_x(self, coarse_index: np.ndarray) -> float:
        """Patient x (LPS, + is left) of a (fractional) coarse index ``(3,)``."""
        full = np.asarray(coarse_index, dtype=float) * self.factors + (np.asarray(self.factors) - 1) / 2.0
        return float(self.origin[0] + full @ self.steps[:, 0])


class LungsCT(Model):
    """Right/left lung segmentation and lung densitometry on chest CT (classical, no weights).

    Parameters
    ----------
    params:
        Thresholds and sizes; defaults suit adult chest CT.

    Notes
    -----
    Output labels: 1 = right lung, 2 = left lung (patient sides).  Per lung
    the prediction reports, in this order:

    - volume: ``SCT_VOLUME`` in ``ml``;
    - mean lung density: concept ``SCT_MEAN`` ("Mean") in ``[hnsf'U]``
      (the mean attenuation of the lung mask, vessels inside included);
    - %LAA-950: :data:`LAA950_PERCENT` in ``%``, the percentage of the
      lung's voxels below -950 HU.
    """

    card = LUNGS_CT_CARD

    def __init__(self, params: LungsCTParameters | None = None) -> None:
        self.params = params or LungsCTParameters()

    def predict(self, volume: Volume) -> Prediction:
        """Segment the lungs of a CT volume and measure them.

        Parameters
        ----------
        volume:
            CT in HU, ``(z, y, x)``, with its LPS geometry.

        Returns
        -------
        Prediction
            ``labelmap`` ``uint8`` of the input's shape (1 right, 2 left lung);
            measurements per present lung; ``findings`` is
            ``("no lungs found",)`` when no lung is present (all-zero label
            map, no measurements) and names a missing side when only one lung
            is found.

        Raises
        ------
        ValueError
            If the volume's modality is not ``"CT"`` (the thresholds are in HU).
        """
        modality = (volume.modality or "").strip().upper()
        if modality != "CT":
            raise ValueError(
                f"Model 'lungs-ct' needs a CT volume in HU, got modality {volume.modality!r}; "
                "route only CT series to it (and set Volume.modality='CT')"
            )
        started = time.perf_counter()
        p = self.params
        arr = np.asarray(volume.array)
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        direction = np.asarray(volume.direction, dtype=float)
        steps = direction * np.asarray(volume.spacing, dtype=float)[:, None]
        voxel_ml = volume.voxel_volume_ml  # |det| of the axis steps: right for sheared grids

        # Working axes: axis 0 = the array axis closest to patient S-I.
        axial = int(np.argmax(np.abs(direction[:, 2])))
        perm = (axial, *[a for a in range(3) if a != axial])
        work = np.transpose(arr, perm)
        work_steps = steps[list(perm)]
        lengths = np.linalg.norm(work_steps, axis=1)
        factors = tuple(max(1, int(round(p.coarse_voxel_mm / float(s)))) for s in lengths)
        grid = _Grid(
            origin=np.asarray(volume.origin, dtype=float),
            steps=work_steps,
            factors=(factors[0], factors[1], factors[2]),
            superior_sign=1.0 if work_steps[0, 2] >= 0 else -1.0,
        )
        coarse = block_mean(work, grid.factors)
        coarse_ml = voxel_ml * float(np.prod(grid.factors))

        coarse_labels, airway = self._coarse_lungs(coarse, grid, coarse_ml)
        del coarse
        labelmap_work = np.zeros(work.shape, dtype=np.uint8)
        if coarse_labels is not None:
            self._refine(work, coarse_labels, airway, grid, labelmap_work)
        labelmap = np.ascontiguousarray(np.transpose(labelmap_work, np.argsort(perm)))

        measurements: dict[int, tuple[Measurement, ...]] = {}
        for label in (RIGHT_LUNG, LEFT_LUNG):
            mask = labelmap == label
            count = int(np.count_nonzero(mask))
            if count == 0:
                continue
            values = arr[mask]
            measurements[label] = (
                Measurement(SCT_VOLUME, count * voxel_ml, UCUM_ML),
                Measurement(SCT_MEAN, float(values.mean(dtype=np.float64)), UCUM_HU),
                Measurement(
                    LAA950_PERCENT,
                    100.0 * float(np.count_nonzero(values < p.laa_threshold_hu)) / count,
                    UCUM_PERCENT,
                ),
            )
            del mask, values  # one lung's mask at a time (each is the size of the label map)
            logger.debug(
                "lungs-ct: label %d volume %.1f ml, mean %.1f HU, LAA-950 %.2f %%",
                label,
                measurements[label][0].value,
                measurements[label][1].value,
                measurements[label][2].value,
            )
        if not measurements:
            findings: tuple[str, ...] = (NO_LUNGS_FOUND,)
        elif len(measurements) == 1:
            missing = "left" if RIGHT_LUNG in measurements else "right"
            findings = (f"{missing} lung not found",)
        else:
            findings = ()
        logger.info(
            "lungs-ct: %d lung(s) found in a %s volume in %.1f s",
            len(measurements),
            "x".join(str(n) for n in arr.shape),
            time.perf_counter() - started,
        )
        return Prediction(card=self.card, labelmap=labelmap, measurements=measurements, findings=findings)

    # -- coarse grid ---------------------------------------------------------------------

    def _coarse_lungs(
        self, coarse: np.ndarray, grid: _Grid, coarse_ml: float
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """Right/left lung labels on the coarse grid, and the removed airway mask.

        Returns ``(None, airway)`` when no lung is found.
        """
        p = self.params
        body = largest_component(coarse > p.body_threshold_hu)
        airway = np.zeros(coarse.shape, dtype=bool)
        if not body.any():
            logger.debug("lungs-ct: no body found")
            return None, airway
        body = fill_holes_per_slice(body)
        body_centre = np.array(ndimage.center_of_mass(body))
        midline_x = grid.patient_x(body_centre)

        low = coarse < p.air_threshold_hu
        internal = low & body
        outside = low & ~body
        lab, n = ndimage.label(internal)
        if n == 0:
            return None, airway
        sizes_ml = np.bincount(lab.ravel()).astype(float) * coarse_ml
        touching = np.zeros(n + 1, dtype=bool)
        touching[np.unique(lab[ndimage.binary_dilation(outside) & internal])] = True
        keep = (sizes_ml >= p.min_lung_ml) & ~(touching & (sizes_ml < p.keep_touching_ml))
        keep[0] = False
        candidates = keep[lab]
        if not candidates.any():
            logger.debug("lungs-ct: no air region of %.0f ml or more inside the body", p.min_lung_ml)
            return None, airway

        airway = self._airway(coarse, candidates, grid, midline_x, coarse_ml)
        if airway.any():
            airway = ndimage.binary_dilation(airway) & candidates
            candidates &= ~airway

        lab, n = ndimage.label(candidates)
        sizes_ml = np.bincount(lab.ravel()).astype(float) * coarse_ml
        objects = ndimage.find_objects(lab)
        lungs: list[tuple[float, int, float]] = []  # (ml, label, patient x of centroid)
        for i in range(1, n + 1):
            if sizes_ml[i] < p.min_lung_ml:
                continue
            sl = objects[i - 1]
            if sl is None:
                continue
            extent_mm = (sl[0].stop - sl[0].start) * float(grid.coarse_spacing[0])
            if extent_mm < p.min_lung_extent_mm:
                logger.debug("lungs-ct: dropped a region %.0f mm thick (too thin for a lung)", extent_mm)
                continue
            part = lab[sl] == i
            median = float(np.median(coarse[sl][part]))
            if median < p.gas_median_hu:
                logger.debug("lungs-ct: dropped a %.0f ml gas region (median %.0f HU)", sizes_ml[i], median)
                continue
            centre = np.array(ndimage.center_of_mass(part)) + [s.start for s in sl]
            lungs.append((float(sizes_ml[i]), i, grid.patient_x(centre)))
        if not lungs:
            return None, airway
        lungs.sort(reverse=True)

        out = np.zeros(coarse.shape, dtype=np.uint8)
        first_ml, first, first_x = lungs[0]
        opposite = [c for c in lungs[1:] if (c[2] < midline_x) != (first_x < midline_x)]
        if opposite and opposite[0][0] >= 0.2 * first_ml:
            self._assign_two(out, lab == first, first_x, lab == opposite[0][1], opposite[0][2])
            return out, airway

        largest = lab == first
        if self._split(largest, grid, midline_x, out):
            return out, airway
        side = RIGHT_LUNG if first_x < midline_x else LEFT_LUNG
        out[largest] = side
        if opposite:
            out[lab == opposite[0][1]] = LEFT_LUNG if side == RIGHT_LUNG else RIGHT_LUNG
        return out, airway

    @staticmethod
    def _assign_two(out: np.ndarray, a: np.ndarray, a_x: float, b: np.ndarray, b_x: float) -> None:
        """Label two lung masks: the one with the smaller patient x is the right lung."""
        right, left = (a, b) if a_x < b_x else (b, a)
        out[right] = RIGHT_LUNG
        out[left] = LEFT_LUNG

    def _airway(
        self, coarse: np.ndarray, candidates: np.ndarray, grid: _Grid, midline_x: float, coarse_ml: float
    ) -> np.ndarray:
        """Trachea and main bronchi (coarse mask), or an empty mask if not found safely."""
        p = self.params
        empty = np.zeros(coarse.shape, dtype=bool)
        present = np.flatnonzero(candidates.any(axis=(1, 2)))
        if present.size == 0:
            return empty
        order = present[::-1] if grid.superior_sign > 0 else present
        spacing = grid.coarse_spacing
        max_slices = max(1, int(math.ceil(p.airway_search_mm / spacing[0])))
        pixel_cm2 = float(spacing[1] * spacing[2]) / 100.0
        seed: tuple[int, np.ndarray] | None = None
        for z in order[:max_slices]:
            blobs, _ = ndimage.label(candidates[z])
            best: tuple[float, np.ndarray] | None = None
            for j, sl in enumerate(ndimage.find_objects(blobs), start=1):
                if sl is None:
                    continue
                blob = blobs[sl] == j
                area_cm2 = np.count_nonzero(blob) * pixel_cm2
                if not p.min_airway_area_cm2 <= area_cm2 <= p.max_airway_area_cm2:
                    continue
                # Lower quartile: the lumen is pure air even when its rim is partial volume.
                if float(np.percentile(coarse[z][sl][blob], 25)) >= p.airway_thresholds_hu[0]:
                    continue
                cy, cx = np.array(ndimage.center_of_mass(blob)) + [sl[0].start, sl[1].start]
                off = abs(grid.patient_x(np.array([z, cy, cx])) - midline_x)
                if off <= p.airway_midline_mm and (best is None or off < best[0]):
                    full = np.zeros(candidates.shape[1:], dtype=bool)
                    full[sl] = blob
                    best = (off, full)
            if best is not None:
                seed = (int(z), best[1])
                break
        if seed is None:
            logger.debug("lungs-ct: no trachea found in the superior slices; airway kept")
            return empty

        z, blob = seed
        for threshold in p.airway_thresholds_hu:
            region = candidates & (coarse < threshold)
            lab, _ = ndimage.label(region)
            ids = np.unique(lab[z][blob & region[z]])
            ids = ids[ids > 0]
            if ids.size == 0:
                continue
            grown = np.isin(lab, ids)
            grown_ml = float(np.count_nonzero(grown)) * coarse_ml
            if grown_ml <= p.max_airway_ml:
                logger.debug("lungs-ct: airway %.0f ml below %.0f HU", grown_ml, threshold)
                return grown
            logger.debug("lungs-ct: airway growth below %.0f HU leaked (%.0f ml)", threshold, grown_ml)
        return empty

    def _split(self, mask: np.ndarray, grid: _Grid, midline_x: float, out: np.ndarray) -> bool:
        """Split one region holding both lungs; write labels into ``out``; ``False`` if it is one lung.

        The region is eroded in-plane (Euclidean distance in mm) until it falls
        into two parts of comparable size on opposite sides of the midline;
        each voxel of the region then goes to the nearest part.
        """
        p = self.params
        spacing = grid.coarse_spacing
        found = ndimage.find_objects(mask.astype(np.uint8))
        if not found or found[0] is None:
            return False
        box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(found[0], mask.shape))
        sub = np.pad(mask[box], ((0, 0), (1, 1), (1, 1)))
        offset = np.array([box[0].start, box[1].start - 1, box[2].start - 1])
        depth = ndimage.distance_transform_edt(sub, sampling=(1e6, spacing[1], spacing[2]))
        step = float(min(spacing[1], spacing[2]))
        radius = step
        while radius <= p.max_split_erosion_mm:
            lab, n = ndimage.label(depth > radius)
            if n == 0:
                break
            if n >= 2:
                sizes = np.bincount(lab.ravel())
                sizes[0] = 0
                a, b = (int(i) for i in np.argsort(sizes)[::-1][:2])
                if sizes[b] >= 0.1 * sizes[a]:
                    ax = grid.patient_x(np.array(ndimage.center_of_mass(lab == a)) + offset)
                    bx = grid.patient_x(np.array(ndimage.center_of_mass(lab == b)) + offset)
                    if (ax < midline_x) != (bx < midline_x):
                        seeds = np.zeros(sub.shape, dtype=np.uint8)
                        right_id, left_id = (a, b) if ax < bx else (b, a)
                        seeds[lab == right_id] = RIGHT_LUNG
                        seeds[lab == left_id] = LEFT_LUNG
                        nearest = ndimage.distance_transform_edt(
                            seeds == 0, sampling=spacing, return_distances=False, return_indices=True
                        )
                        assigned = seeds[tuple(nearest)]
                        assigned[~sub] = 0
                        region = out[box]
                        inner = assigned[:, 1:-1, 1:-1]
                        region[inner > 0] = inner[inner > 0]
                        logger.debug("lungs-ct: lungs separated after %.1f mm erosion", radius)
                        return True
            radius += step
        # Last resort: a region with a large share on each side of the midline.
        zz, yy, xx = np.nonzero(mask)
        full = np.stack([zz, yy, xx], axis=1).astype(float) * grid.factors + (np.asarray(grid.factors) - 1) / 2.0
        on_right = grid.origin[0] + full @ grid.steps[:, 0] < midline_x
        if 0.25 <= float(np.mean(on_right)) <= 0.75:
            out[zz[on_right], yy[on_right], xx[on_right]] = RIGHT_LUNG
            out[zz[~on_right], yy[~on_right], xx[~on_right]] = LEFT_LUNG
            logger.debug("lungs-ct: lungs not separable by erosion; split at the body midline")
            return True
        return False

    # -- full resolution -----------------------------------------------------------------

    def _refine(
        self,
        work: np.ndarray,
        coarse_labels: np.ndarray,
        airway: np.ndarray,
        grid: _Grid,
        labelmap: np.ndarray,
    ) -> None:
        """Write full-resolution lung labels into ``labelmap`` (working axes)."""
        p = self.params
        grown = coarse_labels.copy()
        free = (coarse_labels == 0) & ~airway
        for label in (RIGHT_LUNG, LEFT_LUNG):
            ring = ndimage.binary_dilation(coarse_labels == label) & free & (grown == 0)
            grown[ring] = label
        pixel = float(min(np.linalg.norm(grid.steps[1]), np.linalg.norm(grid.steps[2])))
        radius = max(1, int(round(p.closing_mm / pixel)))
        closed: dict[int, tuple[tuple[slice, ...], np.ndarray]] = {}
        # Each lung is upsampled within its own box only: no full-resolution copy of the label map (the
        # peak memory of a 300 x 512x512 CT was the volume plus three of them).
        boxes = ndimage.find_objects(grown)
        for label in (RIGHT_LUNG, LEFT_LUNG):
            coarse_box = boxes[label - 1] if len(boxes) >= label else None
            if coarse_box is None:
                continue
            box = upsampled_box(coarse_box, grid.factors, work.shape, radius + 1)
            selected = upsample_box(grown, grid.factors, box) == label
            lung = selected & (work[box] < p.air_threshold_hu)
            del selected
            labelmap[box][lung] = label
            shut = ndimage.binary_closing(lung, structure=disk(radius))
            closed[label] = (box, fill_holes_per_slice(shut | lung))
        for label, (box, filled) in closed.items():
            region = labelmap[box]
            region[filled & (region == 0)] = label
