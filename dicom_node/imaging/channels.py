"""Several series of one study as the input channels of one model (e.g. T1c, T1, T2, FLAIR).

The first channel's series gives the grid.  The others are resampled onto
it (trilinear, in patient coordinates) only when they share its frame of
reference: series in different frames of reference have no known spatial
relation, and putting them side by side would feed the model misaligned
anatomy.  Such a job is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from dicom_node.errors import ImagingError
from dicom_node.imaging.series import SeriesVolume
from inference.types import Volume

#: Grids closer than this (mm, and direction cosines) are the same grid: stacked without resampling.
_SAME_GRID_MM = 1e-3


def _steps(volume: Volume) -> np.ndarray:
    """3x3: row ``i`` is the patient-space step (mm) of array axis ``i`` (z, y, x)."""
    return np.asarray(volume.direction, dtype=float) * np.asarray(volume.spacing, dtype=float)[:, None]


def _same_grid(a: Volume, b: Volume) -> bool:
    return (a.shape == b.shape and np.allclose(_steps(a), _steps(b), atol=_SAME_GRID_MM)
            and np.allclose(a.origin, b.origin, atol=_SAME_GRID_MM))


def resample_onto(moving: Volume, target: Volume) -> np.ndarray:
    """``moving`` sampled at the voxel centres of ``target`` (trilinear; 0 outside ``moving``)."""
    target_steps, moving_steps = _steps(target), _steps(moving)
    # patient = origin + index @ steps  ->  moving index = (patient - moving origin) @ inv(moving steps)
    to_moving = target_steps @ np.linalg.inv(moving_steps)
    offset = (np.asarray(target.origin, dtype=float) - np.asarray(moving.origin, dtype=float)) @ np.linalg.inv(
        moving_steps)
    # ndimage.affine_transform maps output index o to input index matrix @ o + offset (column vectors).
    return ndimage.affine_transform(np.asarray(moving.array, dtype=np.float32), to_moving.T, offset=offset,
                                    output_shape=target.shape, order=1, mode="constant", cval=0.0)


def frame_of_reference(series: SeriesVolume) -> str:
    return str(getattr(series.sources[0], "FrameOfReferenceUID", "") or "") if series.sources else ""


def stack_channels(named: Sequence[tuple[str, SeriesVolume]]) -> tuple[Volume, tuple[str, ...]]:
    """One multi-channel volume on the first channel's grid, and a note per resampled channel.

    Raises
    ------
    ImagingError
        When a channel's series is not in the first one's frame of reference
        (or either has none).
    """
    if not named:
        raise ImagingError("no input channels")
    first_name, first = named[0]
    reference = first.volume
    frame = frame_of_reference(first)
    arrays, notes = [np.asarray(reference.array, dtype=np.float32)], []
    for name, series in named[1:]:
        other = frame_of_reference(series)
        if not frame or other != frame:
            raise ImagingError(
                f"channel {name!r} is not in the frame of reference of channel {first_name!r} "
                f"({'none given' if not frame or not other else 'different FrameOfReferenceUID'}): its position "
                "relative to the first channel is unknown, so the channels cannot be aligned; not run")
        if _same_grid(series.volume, reference):
            arrays.append(np.asarray(series.volume.array, dtype=np.float32))
        else:
            arrays.append(resample_onto(series.volume, reference))
            notes.append(f"channel {name!r} resampled onto the grid of channel {first_name!r} "
                         f"({'x'.join(map(str, series.volume.shape))} -> {'x'.join(map(str, reference.shape))})")
    names = tuple(name for name, _ in named)
    stacked = Volume(np.stack(arrays), reference.spacing, reference.origin, reference.direction,
                     reference.modality, channels=names)
    return stacked, tuple(notes)
