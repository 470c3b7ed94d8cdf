"""highdicom's "is this attribute part of that IOD?" answered once per question.

highdicom (0.28) decides, for *every* source image of a derived image, whether
the image's SOP class allows multiple frames: ``is_multiframe_image`` asks
``highdicom._standard_utils.is_attribute_in_iod("NumberOfFrames", sop_class)``,
which walks every attribute of every module of the IOD in highdicom's own
tables: ~0.5 ms a call.  A SEG of a 200-slice CT asks it ~200 times with the
same two arguments, about a third of the whole SEG build on this project's
2-core reference machine.

The answer depends on nothing but the arguments (highdicom's tables are read
once from its package data and never change), so :func:`install` puts a
remembering version of that one function in its place.  The objects highdicom
builds are the same, byte for byte (``tests/unit/test_iod_lookup.py`` builds a
SEG both ways and compares them).

The function is highdicom's private helper; its signature is checked before
anything is replaced, and a highdicom whose helper looks different is left as
it is (correct, only slower; a DEBUG line says so).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Final

from highdicom import _standard_utils

logger = logging.getLogger(__name__)

#: The parameters of the helper this module knows how to remember.
_EXPECTED_PARAMETERS: Final = ("attribute", "sop_class_uid", "exclude_path_elements")
#: Distinct questions kept (attribute x SOP class x exclusions); a node asks a handful.
_CACHE_SIZE: Final[int] = 1024


def install() -> bool:
    """Replace highdicom's ``is_attribute_in_iod`` with a remembering version (once).

    Returns
    -------
    bool
        Whether the remembering version is in place.
    """
    current = _standard_utils.is_attribute_in_iod
    if getattr(current, "__wrapped__", None) is not None and hasattr(current, "cache_info"):
        return True
    if tuple(inspect.signature(current).parameters) != _EXPECTED_PARAMETERS:
        logger.debug("highdicom's is_attribute_in_iod has another signature; its IOD lookups are not remembered")
        return False
    _standard_utils.is_attribute_in_iod = _remembering(current)  # type: ignore[assignment]
    return True


def _remembering(original: Callable[..., bool]) -> Callable[..., bool]:
    @functools.lru_cache(maxsize=_CACHE_SIZE)
    def ask(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
        return original(attribute, sop_class_uid, list(exclude) if exclude is not None else None)

    @functools.wraps(original)
    def is_attribute_in_iod(attribute: str, sop_class_uid: str,
                            exclude_path_elements: Sequence[str] | None = None) -> bool:
        exclude = tuple(exclude_path_elements) if exclude_path_elements is not None else None
        return ask(str(attribute), str(sop_class_uid), exclude)

    is_attribute_in_iod.cache_info = ask.cache_info  # type: ignore[attr-defined]
    return is_attribute_in_iod
