"""Array operations of the built-in lungs model: block averaging, upsampling, hole filling, components.

Pure numpy/SciPy on ``(z, y, x)`` arrays; no geometry, no DICOM.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def block_mean(arr: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean over ``factors`` blocks (edge-padded to a multiple), as ``float32``."""
    if factors == (1, 1, 1):
        return np.ascontiguousarray(arr, dtype=np.float32)
    pad = [(0, (-n) % f) for n, f in zip(arr.shape, factors)]
    if any(p[1] for p in pad):
        arr = np.pad(arr, pad, mode="edge")
    nz, ny, nx = (n // f for n, f in zip(arr.shape, factors))
    fz, fy, fx = factors
    blocks = arr.reshape(nz, fz, ny, fy, nx, fx)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def upsample(labels: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour upsampling of a coarse label map to ``shape``."""
    out = labels
    for axis, f in enumerate(factors):
        if f > 1:
            out = np.repeat(out, f, axis=axis)
    return out[: shape[0], : shape[1], : shape[2]]


def inplane_cross() -> np.ndarray:
    """4-neighbourhood within a slice (no neighbours along axis 0), shaped ``(3, 3, 3)``."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    return structure


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill holes of a 3D mask independently in each slice along axis 0.

    One empty slice is added at each end so that the first and last slices
    are not taken for the array border (where the background is "outside").
    """
    padded = np.pad(mask, ((1, 1), (0, 0), (0, 0)))
    filled: np.ndarray = ndimage.binary_fill_holes(padded, structure=inplane_cross())
    return filled[1:-1]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of ``mask`` (empty if ``mask`` is)."""
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def disk(radius: int) -> np.ndarray:
    """In-plane disk structuring element shaped ``(1, 2r+1, 2r+1)``."""
    r = np.arange(-radius, radius + 1)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2)[None, :, :]


def bbox(mask: np.ndarray, margin: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margin`` voxels in-plane (clipped to ``shape``)."""
    found = ndimage.find_objects(mask.astype(np.uint8))
    if not found or found[0] is None:
        return tuple(slice(0, n) for n in shape)
    sl = found[0]
    out = [slice(sl[0].start, sl[0].stop)]
    for axis in (1, 2):
        out.append(slice(max(sl[axis].start - margin, 0), min(sl[axis].stop + margin, shape[axis])))
    return tuple(out)
