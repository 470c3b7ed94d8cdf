"""Built-in models, by name: classical algorithms that ship with the node (no weights, no download).

``lungs-ct`` (:mod:`inference.models.lungs_ct`): right and left lung masks of a
chest CT with per-lung volume, mean lung density and %LAA-950.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from inference.models.lungs_ct import LungsCT
from inference.models.lungs_ct_card import (
    LAA950_PERCENT,
    LEFT_LUNG,
    LUNGS_CT_CARD,
    NO_LUNGS_FOUND,
    RIGHT_LUNG,
    LungsCTParameters,
)
from inference.types import Model

__all__ = ["BUILTIN_MODELS", "LAA950_PERCENT", "LEFT_LUNG", "LUNGS_CT_CARD", "NO_LUNGS_FOUND", "RIGHT_LUNG",
           "LungsCT", "LungsCTParameters", "load_builtin"]


def _make_lungs_ct() -> Model:
    return LungsCT()


#: Built-in models by name; values build a fresh model.
BUILTIN_MODELS: Mapping[str, Callable[[], Model]] = MappingProxyType({"lungs-ct": _make_lungs_ct})


def load_builtin(name: str) -> Model:
    """Build the built-in model called ``name``.

    Parameters
    ----------
    name:
        Model name, e.g. ``"lungs-ct"``.

    Returns
    -------
    Model
        A new instance.

    Raises
    ------
    ValueError
        If no built-in model has that name (the message lists the names).
    """
    try:
        factory = BUILTIN_MODELS[name]
    except KeyError:
        raise ValueError(
            f"Unknown built-in model {name!r}; available: {', '.join(sorted(BUILTIN_MODELS))}"
        ) from None
    return factory()
