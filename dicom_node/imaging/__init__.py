"""DICOM series -> :class:`inference.types.Volume`, with our own geometry checks.

The worker hands :func:`load_series` the spooled files of one completed series.
It returns a :class:`SeriesVolume`: the pixel data in modality units (HU for
CT) on a regular grid, the source datasets in volume order (``results/``
needs them to build a SEG that references every source frame), and notes
about what was accepted on purpose (gantry tilt, single slice, duplicates).

Everything that stops a series from being *one* regular volume raises
:class:`~dicom_node.errors.ImagingError` with a short, PHI-free reason that
an operator can act on.  SimpleITK's series reader is deliberately not used:
it stacks broken series (gaps, repeated positions, mixed orientations)
without complaint.

Geometry conventions
--------------------
Arrays are indexed ``[z, y, x]`` (see :mod:`inference.types`):

* ``x`` runs along a row (increasing column index): direction
  ``ImageOrientationPatient[0:3]``, spacing ``PixelSpacing[1]``;
* ``y`` runs down a column (increasing row index): direction
  ``ImageOrientationPatient[3:6]``, spacing ``PixelSpacing[0]``;
* ``z`` is the slice index, sorted by ascending projection of
  ``ImagePositionPatient`` onto the slice normal (row x column cosines).

The centre of voxel ``(z, y, x)`` lies at
``origin + z*dz*direction[0] + y*dy*direction[1] + x*dx*direction[2]``,
which for ``y = x = 0`` is exactly the ``ImagePositionPatient`` of slice ``z``.

Decisions
---------
Spacing between slices
    Taken from the positions, never from SliceThickness or
    SpacingBetweenSlices.  Consecutive spacings must agree within
    ``max(0.05 mm, 1 %)`` and every slice must lie on the regular grid within
    the same tolerance; otherwise the series is refused (a missing slice is
    reported as such, never averaged away).
Gantry tilt (sheared stack)
    When the step between consecutive slice positions is not parallel to the
    slice normal, the stack is kept as acquired: ``direction[0]`` is the unit
    vector of the actual step and ``dz`` its length.  Voxel indices then map
    exactly to source pixels, so masks land on the source frames without
    resampling; ``|det(direction * spacing)|`` is the true voxel volume
    (``dz * dy * dx`` overestimates it by ``1 / cos(tilt)``).  The direction
    matrix is then not orthogonal; a note gives the angle.  A drift of the
    whole stack below a tenth of a pixel is treated as numerical noise (the
    normal is used).  Tilts above ``MAX_TILT_DEG`` are refused.
Single slice
    Accepted as a volume of depth 1 (2D models exist): ``direction[0]`` is the
    slice normal and ``dz`` the SliceThickness, or 1.0 mm when absent; a note
    says which.
Duplicate SOP Instance UIDs
    Files with the same SOP Instance UID are the same object (possibly in
    different transfer syntaxes); the node's spool also keys instances by
    SOP Instance UID.  The first file is kept, the others are dropped with a
    note.  Copies that disagree on geometry are a UID clash and refused.
Multi-frame (Enhanced CT/MR)
    One multi-frame object whose frames are the slices; geometry and rescale
    come from the Per-frame / Shared Functional Groups.  A series holding
    more than one multi-frame object, or mixing them with single-frame
    images, is refused.
"""

from dicom_node.imaging.series import SeriesVolume, load_series
from dicom_node.imaging.tolerances import (
    MAX_TILT_DEG,
    ORIENTATION_TOLERANCE,
    PIXEL_SPACING_TOLERANCE_MM,
    SAME_POSITION_MM,
    SPACING_ABS_TOLERANCE_MM,
    SPACING_REL_TOLERANCE,
    TILT_NOISE_PIXELS,
)

__all__ = [
    "MAX_TILT_DEG",
    "ORIENTATION_TOLERANCE",
    "PIXEL_SPACING_TOLERANCE_MM",
    "SAME_POSITION_MM",
    "SPACING_ABS_TOLERANCE_MM",
    "SPACING_REL_TOLERANCE",
    "TILT_NOISE_PIXELS",
    "SeriesVolume",
    "load_series",
]
