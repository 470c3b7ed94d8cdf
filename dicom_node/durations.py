"""Durations as operators type them on the command line (``--since 24h``)."""

from __future__ import annotations

import re

_DURATION_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """``"90s"``, ``"30m"``, ``"24h"``, ``"2d"``, ``"1w"`` as seconds; a bare number is seconds,
    like every duration in the configuration.

    Raises
    ------
    ValueError
        Not a positive number with an optional unit.
    """
    m = _DURATION_RE.fullmatch(text)
    if m is None or float(m[1]) <= 0:
        raise ValueError(f"{text!r} is not a duration; write e.g. 90s, 30m, 24h, 7d or 2w")
    return float(m[1]) * _UNIT_S[m[2]]
