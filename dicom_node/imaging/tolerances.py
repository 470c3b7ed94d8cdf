"""The tolerances of the geometry checks (what still counts as the same orientation, position, spacing)."""

from __future__ import annotations

ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between direction cosines still counted as the same orientation."""

SAME_POSITION_MM = 0.01
"""Slices whose positions along the normal differ by less than this are at the same place."""

SPACING_ABS_TOLERANCE_MM = 0.05
SPACING_REL_TOLERANCE = 0.01
"""Slice spacing is uniform when it varies by at most ``max(0.05 mm, 1 %)``."""

PIXEL_SPACING_TOLERANCE_MM = 1e-3
"""Largest difference in PixelSpacing between slices of one volume."""

TILT_NOISE_PIXELS = 0.1
"""A sideways drift of the whole stack below this fraction of a pixel is not a tilt."""

MAX_TILT_DEG = 45.0
"""Stacks further than this from the slice normal are refused as nonsense."""
