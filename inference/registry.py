"""Model registry: model specs from the config, loaded on first use and kept warm.

The registry takes the ``models:`` entries of the node's configuration as
plain objects (duck-typed: ``type`` plus the fields of that type), so this
package does not depend on the node's settings module.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from inference.types import Code, Model, ModelCard, SegmentSpec, Task

logger = logging.getLogger(__name__)


def _builtin(spec: Any) -> Model:
    from inference.models.builtin import LungsCT

    builtins = {"lungs-ct": LungsCT}
    try:
        return builtins[spec.name]()
    except KeyError:
        raise ValueError(f"unknown builtin model {spec.name!r}; available: {sorted(builtins)}") from None


def _python(name: str, spec: Any) -> Model:
    from inference.models.python_callable import PythonModel, load_callable

    task = Task(spec.task)
    segments = tuple(
        SegmentSpec(
            label=int(lbl.value), name=lbl.name,
            category=Code(lbl.category.value, lbl.category.scheme, lbl.category.meaning),
            type=Code(lbl.snomed.value, lbl.snomed.scheme, lbl.snomed.meaning),
            color=tuple(lbl.color),
        )
        for lbl in (spec.labels or ())
    )
    card = ModelCard(name=name, version=str(spec.version), family="Artificial Intelligence", task=task,
                     intended_use=getattr(spec, "intended_use", "") or "", segments=segments,
                     classes=tuple(spec.classes or ()))
    return PythonModel(card, load_callable(spec.callable, spec.path), threshold=float(spec.threshold))


class ModelRegistry:
    """Looks up models by their config name and keeps up to ``max_warm`` loaded.

    Parameters
    ----------
    specs:
        ``name -> model spec`` from the config.
    max_warm:
        How many loaded models to keep; the least recently used is dropped.
    """

    def __init__(self, specs: Mapping[str, Any], max_warm: int = 4) -> None:
        self.specs = dict(specs)
        self.max_warm = max_warm
        self._cache: OrderedDict[str, Model] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str) -> Model:
        """The loaded model ``name`` (loading it on first use)."""
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
            spec = self.specs.get(name)
            if spec is None:
                raise KeyError(f"no model named {name!r} in the configuration")
            logger.info("Model %s: loading (%s)", name, spec.type)
            if spec.type == "builtin":
                model = _builtin(spec)
            elif spec.type == "python":
                model = _python(name, spec)
            else:
                raise ValueError(f"model {name!r}: type {spec.type!r} is not supported")
            self._cache[name] = model
            while len(self._cache) > self.max_warm:
                evicted, _ = self._cache.popitem(last=False)
                logger.info("Model %s: unloaded (warm cache holds %d)", evicted, self.max_warm)
            return model
