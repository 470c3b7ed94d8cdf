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


def upsampled_box(coarse_box: tuple[slice, ...], factors: tuple[int, int, int], shape: tuple[int, ...],
                  margin: int) -> tuple[slice, ...]:
    """The full-resolution box of a coarse box (each coarse voxel = ``factors`` voxels, clipped to ``shape``),
    grown by ``margin`` in-plane."""
    out = []
    for axis, (sl, f) in enumerate(zip(coarse_box, factors)):
        start, stop = sl.start * f, min(sl.stop * f, shape[axis])
        if axis:
            start, stop = max(start - margin, 0), min(stop + margin, shape[axis])
        out.append(slice(start, stop))
    return tuple(out)


def upsample_box(labels: np.ndarray, factors: tuple[int, int, int], box: tuple[slice, ...]) -> np.ndarray:
    """Nearest-neighbour upsampling of a coarse label map, only the full-resolution ``box`` of it."""
    index = [np.arange(sl.start, sl.stop) // f for sl, f in zip(box, factors)]
    return labels[np.ix_(*index)]


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
