"""Synthetic chest CT phantoms; the CT Image Storage writer is the product's own
(:func:`dicom_node.imaging.synthetic.write_ct_series`, re-exported here).

Used by unit and integration tests (``from tests.phantoms import ...``).

Geometry convention
-------------------
Arrays are indexed ``[z, y, x]`` like :class:`inference.types.Volume`.  With
the default ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]`` a column step
(``+x``) goes to the patient's left, a row step (``+y``) goes posterior and
the slice normal (``+z``) goes superior (LPS).  Hence the phantom's *right*
lung lies at small column indices, and the trachea enters from the last
(most superior) slice.  Patient coordinates of voxel ``[k, j, i]`` are::

    X = (i - (nx - 1) / 2) * dx      # + is patient left
    Y = (j - (ny - 1) / 2) * dy      # + is posterior
    Z = z0 + k * dz                  # + is superior

which matches the default ``origin`` of :func:`write_ct_series`.
"""

from __future__ import annotations

import logging

import numpy as np

from dicom_node.imaging.synthetic import RESCALE_INTERCEPT, write_ct_series

logger = logging.getLogger(__name__)

#: Hounsfield values of the phantom's materials.
HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT_TISSUE = 40.0
HU_LUNG = -850.0
HU_EMPHYSEMA = -985.0
HU_VESSEL = 40.0
HU_CORTICAL_BONE = 700.0
HU_CANCELLOUS_BONE = 250.0


def _ellipsoid(
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    centre: tuple[float, float, float],
    radii: tuple[float, float, float],
) -> np.ndarray:
    """Boolean mask of the ellipsoid ``sum(((c - centre) / radius)^2) <= 1`` (coords X, Y, Z in mm)."""
    total = np.zeros(np.broadcast_shapes(*(c.shape for c in coords)), dtype=np.float64)
    for c, m, r in zip(coords, centre, radii):
        total = total + ((c - m) / r) ** 2
    return total <= 1.0


def _tube(
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    start: tuple[float, float, float],
    end: tuple[float, float, float],
    radius: float,
) -> np.ndarray:
    """Boolean mask of the capsule of ``radius`` mm around the segment ``start``-``end`` (mm, X/Y/Z)."""
    p0 = np.asarray(start, dtype=np.float64)
    axis = np.asarray(end, dtype=np.float64) - p0
    length2 = float(axis @ axis)
    rel = [c - p for c, p in zip(coords, p0)]
    t = (rel[0] * axis[0] + rel[1] * axis[1] + rel[2] * axis[2]) / length2
    t = np.clip(t, 0.0, 1.0)
    d2 = sum((r - t * a) ** 2 for r, a in zip(rel, axis))
    return d2 <= radius**2


def make_chest_phantom(
    shape: tuple[int, int, int] = (60, 128, 128),
    spacing: tuple[float, float, float] = (2.5, 2.0, 2.0),
    seed: int = 0,
    *,
    lung_bridge: bool = False,
) -> tuple[np.ndarray, dict[str, float]]:
    """Build a synthetic chest CT in HU and the truth about its lungs.

    Parameters
    ----------
    shape:
        Array shape ``(z, y, x)``.
    spacing:
        Voxel size ``(dz, dy, dx)`` in mm.
    seed:
        Seed of the noise generator; the same seed gives the same array.
    lung_bridge:
        If true, join the lungs with a thin posterior band of lung tissue
        (like a posterior junction line that is not resolved), so that one
        connected air region holds both lungs.  Bridge voxels count for the
        lung on their side of the mid-sagittal plane.

    Returns
    -------
    hu:
        ``int16`` array ``(z, y, x)``: air outside (-1000 HU), an elliptical
        body of soft tissue with a fat rim, a spine posteriorly, a trachea
        entering from the most superior slice and branching into two main
        bronchi that reach the lungs, two ellipsoidal lungs (-850 HU) with a
        few vessels (40 HU) inside, and an emphysema-like sphere (-985 HU)
        in the left lung.  Gaussian noise (sigma 15 HU) everywhere.  The
        right lung (patient right) is at small ``x`` and is the larger one.
    truth:
        ``right_ml``, ``left_ml`` (voxel count x voxel volume, in ml),
        ``right_laa950_pct``, ``left_laa950_pct`` (percent of the lung's
        voxels below -950 HU), ``right_mean_hu``, ``left_mean_hu``, all
        computed from the phantom's own lung masks.

    Raises
    ------
    ValueError
        If the shape is too small to hold the anatomy (fewer than 16 slices
        or 48 rows/columns) or the spacing is not positive.
    """
    nz, ny, nx = (int(s) for s in shape)
    if nz < 16 or ny < 48 or nx < 48:
        raise ValueError(f"Phantom shape must be at least (16, 48, 48), got {shape}")
    if len(spacing) != 3 or any(s <= 0 for s in spacing):
        raise ValueError(f"Phantom spacing must be three positive numbers, got {spacing}")
    dz, dy, dx = (float(s) for s in spacing)
    wz, wy, wx = nz * dz, ny * dy, nx * dx

    z = (np.arange(nz, dtype=np.float64) * dz)[:, None, None]
    y = ((np.arange(ny, dtype=np.float64) - (ny - 1) / 2.0) * dy)[None, :, None]
    x = ((np.arange(nx, dtype=np.float64) - (nx - 1) / 2.0) * dx)[None, None, :]
    coords = (x, y, z)

    hu = np.full(shape, HU_AIR, dtype=np.float64)

    # Body: elliptic cylinder through every slice, fat rim, soft tissue inside.
    body_a, body_b = 0.40 * wx, 0.30 * wy
    body_r2 = (x / body_a) ** 2 + (y / body_b) ** 2
    body = np.broadcast_to(body_r2 <= 1.0, shape)
    inner = np.broadcast_to(body_r2 <= 0.88**2, shape)
    hu[body] = HU_FAT
    hu[inner] = HU_SOFT_TISSUE

    # Spine: cortical ring with cancellous core, posterior midline.
    spine_r = 0.06 * wx
    spine_y = 0.22 * wy
    spine_d2 = x**2 + (y - spine_y) ** 2
    hu[np.broadcast_to(spine_d2 <= spine_r**2, shape)] = HU_CORTICAL_BONE
    hu[np.broadcast_to(spine_d2 <= (0.6 * spine_r) ** 2, shape)] = HU_CANCELLOUS_BONE

    # Lungs: the right one (patient right = negative X) is a little wider.
    lung_y, lung_z = -0.02 * wy, 0.45 * wz
    lung_ry, lung_rz = 0.20 * wy, 0.40 * wz
    right_c = (-0.18 * wx, lung_y, lung_z)
    left_c = (0.18 * wx, lung_y, lung_z)
    right_r = (0.13 * wx, lung_ry, lung_rz)
    left_r = (0.12 * wx, lung_ry, lung_rz)
    right = _ellipsoid(coords, right_c, right_r)
    left = _ellipsoid(coords, left_c, left_r)
    if lung_bridge:
        bridge_y = lung_y + 0.55 * lung_ry
        band = (
            (np.abs(y - bridge_y) <= 3.0)
            & (np.abs(z - lung_z) <= 0.35 * lung_rz)
            & (np.abs(x) <= 0.18 * wx)
        )
        band = np.broadcast_to(band, shape)
        right = right | (band & (x < 0) & ~left)
        left = left | (band & (x >= 0) & ~right)
    hu[right | left] = HU_LUNG

    # Vessels: short tubes well inside each lung (they are holes in the lung
    # cross-sections, part of the lung mask).
    for centre, radii, mask in ((right_c, right_r, right), (left_c, left_r, left)):
        core = _ellipsoid(coords, centre, tuple(0.7 * r for r in radii))
        cx, cy, cz = centre
        rx, ry, rz = radii
        vessels = (
            _tube(coords, (cx + 0.3 * rx, cy, cz - 0.5 * rz), (cx + 0.3 * rx, cy, cz + 0.5 * rz), 2.0)
            | _tube(coords, (cx - 0.3 * rx, cy + 0.3 * ry, cz - 0.4 * rz), (cx - 0.2 * rx, cy + 0.2 * ry, cz + 0.5 * rz), 1.6)
            | _tube(coords, (cx - 0.3 * rx, cy - 0.4 * ry, cz), (cx + 0.3 * rx, cy - 0.1 * ry, cz + 0.2 * rz), 1.5)
        )
        hu[vessels & core & mask] = HU_VESSEL

    # Emphysema-like region: a sphere in the lateral part of the left lung.
    emph_r = 0.45 * min(left_r)
    emph_c = (left_c[0] + 0.4 * left_r[0], left_c[1] + 0.35 * left_r[1], left_c[2] - 0.25 * left_r[2])
    emphysema = _ellipsoid(coords, emph_c, (emph_r, emph_r, emph_r)) & left
    hu[emphysema] = HU_EMPHYSEMA

    # Trachea from the most superior slice down to the carina, then two main
    # bronchi down and out to the medial surface of each lung.  Airway
    # voxels never lie inside a lung mask (they only touch it).
    trachea_r = 0.035 * wx
    trachea_y = -0.08 * wy
    carina = (0.0, trachea_y, 0.55 * wz)
    top = (0.0, trachea_y, wz + dz)
    airway = _tube(coords, carina, top, trachea_r)
    for centre, radii, side in ((right_c, right_r, -1.0), (left_c, left_r, 1.0)):
        entry = (centre[0] - side * 0.85 * radii[0], centre[1], centre[2] + 0.1 * radii[2])
        airway = airway | _tube(coords, carina, entry, 0.55 * trachea_r)
    airway = airway & ~(right | left)
    hu[airway] = HU_AIR

    rng = np.random.default_rng(seed)
    hu = hu + rng.normal(0.0, 15.0, size=shape)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    voxel_ml = dz * dy * dx / 1000.0
    truth: dict[str, float] = {}
    for name, mask in (("right", right), ("left", left)):
        count = int(np.count_nonzero(mask))
        values = hu[mask].astype(np.float64)
        truth[f"{name}_ml"] = count * voxel_ml
        truth[f"{name}_laa950_pct"] = 100.0 * float(np.count_nonzero(values < -950.0)) / count
        truth[f"{name}_mean_hu"] = float(values.mean())
    logger.debug("Phantom %s built: right %.1f ml, left %.1f ml", shape, truth["right_ml"], truth["left_ml"])
    return hu, truth


__all__ = ["RESCALE_INTERCEPT", "make_chest_phantom", "write_ct_series"]
