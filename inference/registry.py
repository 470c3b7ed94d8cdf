"""Model registry: model specs from the config, loaded on first use and kept warm.

The registry takes the ``models:`` entries of the node's configuration as
plain objects (duck-typed: ``type`` plus the fields of that type), so this
package does not depend on the node's settings module.

Each model family's module is imported when a model of that family is first
loaded (inside ``_builtin``, ``_python``...): a node that runs only TorchScript
models never imports MONAI, and the registry imports no framework itself.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from inference.anatomy import LATERALITY
from inference.gpu_memory import cuda_device
from inference.types import Code, Model, ModelCard, SegmentSpec, Task

logger = logging.getLogger(__name__)


def _builtin(spec: Any) -> Model:
    from inference.models.builtin import LungsCT

    builtins = {"lungs-ct": LungsCT}
    try:
        return builtins[spec.name]()
    except KeyError:
        raise ValueError(f"unknown builtin model {spec.name!r}; available: {sorted(builtins)}") from None


def segments_from_labels(labels: Any) -> tuple[SegmentSpec, ...]:
    """Segment specs from config ``labels`` entries (value, name, snomed, category, color)."""
    return tuple(
        SegmentSpec(
            label=int(lbl.value), name=lbl.name,
            category=Code(lbl.category.value, lbl.category.scheme, lbl.category.meaning),
            type=Code(lbl.snomed.value, lbl.snomed.scheme, lbl.snomed.meaning),
            color=tuple(lbl.color),
            modifier=LATERALITY.get(str(getattr(lbl, "laterality", "") or "")[:1].upper()),
        )
        for lbl in (labels or ())
    )


def _card(name: str, spec: Any) -> ModelCard:
    """Model card of a ``python`` or ``torchscript`` entry (everything comes from the config)."""
    return ModelCard(name=name, version=str(spec.version), family="Artificial Intelligence", task=Task(spec.task),
                     intended_use=getattr(spec, "intended_use", "") or "",
                     modality=getattr(spec, "modality", "") or "",
                     segments=segments_from_labels(spec.labels), classes=tuple(spec.classes or ()))


def _python(name: str, spec: Any) -> Model:
    from inference.models.python_callable import PythonModel, load_callable

    return PythonModel(_card(name, spec), load_callable(spec.callable, spec.path), threshold=float(spec.threshold),
                       max_detections=int(getattr(spec, "max_detections", 100)), device=str(spec.device))


def _torchscript(name: str, spec: Any) -> Model:
    from inference.models.torchscript import TorchscriptModel

    return TorchscriptModel(_card(name, spec), spec.path, spec.preprocessing, device=spec.device, amp=spec.amp,
                            activation=spec.activation, threshold=float(spec.threshold), box_mode=spec.box_mode,
                            max_detections=int(spec.max_detections))


def _in_environment(name: str, spec: Any, state_dir: Path | None) -> Model:
    """A model whose ``environment`` is not the node's own: its own process, in its interpreter."""
    from inference.environments import environments_root, link_inference, python_of, state_of
    from inference.remote import EnvironmentModel, ModelEnvironmentError

    if state_dir is None:
        raise ModelEnvironmentError(f"model {name}: environment {spec.environment} needs the node's state directory")
    state = state_of(name, spec, state_dir)
    if state.state != "ready" or state.python is None:
        raise ModelEnvironmentError(f"model {name}: {state.detail}")
    if spec.environment == "managed":
        directory = state.python.parent.parent
        return EnvironmentModel(name, spec, python_of(directory), link_inference(directory),
                                label=f"managed environment {directory.name}")
    return EnvironmentModel(name, spec, state.python, link_inference(environments_root(state_dir) / "external"),
                            label=f"interpreter {state.python}")


def _nnunet(name: str, spec: Any) -> Model:
    from inference.models.nnunet import NnunetModel

    return NnunetModel(name, spec, segments=segments_from_labels(spec.labels))


def _monai_bundle(name: str, spec: Any) -> Model:
    from inference.models.monai_bundle import MonaiBundleModel

    return MonaiBundleModel(name, spec.path, spec, segments=segments_from_labels(spec.labels))


class ModelRegistry:
    """Looks up models by their config name and keeps up to ``max_warm`` loaded.

    Parameters
    ----------
    specs:
        ``name -> model spec`` from the config.
    max_warm:
        How many loaded models to keep; the least recently used is dropped.
    state_dir:
        The node's state directory (where managed environments live); needed
        only for models whose ``environment`` is not ``shared``.
    """

    def __init__(self, specs: Mapping[str, Any], max_warm: int = 4, state_dir: Path | None = None) -> None:
        self.specs = dict(specs)
        self.max_warm = max_warm
        self.state_dir = state_dir
        self._cache: OrderedDict[str, Model] = OrderedDict()
        self._lock = threading.RLock()  # a chain loads its parts through get()

    def get(self, name: str, device: str | None = None) -> Model:
        """The loaded model ``name`` (loading it on first use).

        ``device`` (e.g. ``"cpu"``) loads it on that device instead of its
        configured one, kept warm beside it under its own entry: the CPU
        fallback of a model that ran out of GPU memory.
        """
        key = name if device is None else f"{name}@{device}"
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            spec = self.specs.get(name)
            if spec is None:
                raise KeyError(f"no model named {name!r} in the configuration")
            if device is not None and "device" in type(spec).model_fields:
                spec = spec.model_copy(update={"device": device})
            logger.info("Model %s: loading (%s)%s", name, spec.type, f" on {device}" if device else "")
            model = self._load(name, spec, device)
            if not model.card.model_hash:
                model.card = replace(model.card, model_hash=self._fingerprint(spec, model))
            self._cache[key] = model
            while len(self._cache) > self.max_warm:
                evicted, unloaded = self._cache.popitem(last=False)
                close = getattr(unloaded, "close", None)
                if callable(close):  # a model in its own environment: end its process
                    close()
                logger.info("Model %s: unloaded (warm cache holds %d)", evicted, self.max_warm)
            return model

    def unload_other(self, keep: str, device: Any) -> str | None:
        """Unload the least recently used warm model other than ``keep`` that computes on ``device``.

        Returns its name, or ``None`` when no other model is loaded there
        (GPU admission, :mod:`inference.gpu_memory`).
        """
        with self._lock:
            for key, model in self._cache.items():  # least recently used first
                if key != keep and cuda_device(model) == device:
                    del self._cache[key]
                    close = getattr(model, "close", None)
                    if callable(close):
                        close()
                    logger.info("Model %s: unloaded to make room on %s", key, device)
                    return key
            return None

    def _fingerprint(self, spec: Any, model: Model) -> str:
        """``sha256:`` of what defines the model's behaviour, recorded in its result objects.

        TorchScript: the file; MONAI bundle: its configs and weights; python:
        the function's module source; builtin: the node's algorithm source;
        chain: its two models' fingerprints.
        """
        digest = hashlib.sha256()
        if spec.type in ("chain", "merge"):
            for part in ((spec.first, spec.then) if spec.type == "chain" else spec.models):
                digest.update(self.get(part).card.model_hash.encode())
        else:
            if spec.type == "torchscript":
                files = [Path(spec.path)]
            elif spec.type == "monai_bundle":
                root = Path(spec.path)
                files = sorted(f for sub in ("configs", "models") for f in (root / sub).rglob("*") if f.is_file())
            else:  # python, builtin: the source of the code that computes the result
                func = getattr(model, "func", None)
                source = inspect.getsourcefile(func if func is not None else type(model))
                files = [Path(source)] if source else []
            for f in files:
                digest.update(f.name.encode())
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(block)
        return "sha256:" + digest.hexdigest()[:32]

    def close(self) -> None:
        """End the processes of models that run in their own environment."""
        with self._lock:
            for model in self._cache.values():
                close = getattr(model, "close", None)
                if callable(close):
                    close()
            self._cache.clear()

    def _load(self, name: str, spec: Any, device: str | None = None) -> Model:
        if (getattr(spec, "environment", "shared") or "shared") != "shared" and spec.type not in ("chain", "merge"):
            return _in_environment(name, spec, self.state_dir)
        if spec.type == "builtin":
            return _builtin(spec)
        if spec.type == "python":
            return _python(name, spec)
        if spec.type == "torchscript":
            return _torchscript(name, spec)
        if spec.type == "monai_bundle":
            return _monai_bundle(name, spec)
        if spec.type == "nnunet":
            return _nnunet(name, spec)
        if spec.type == "merge":
            from inference.models.merge import MergeModel

            return MergeModel(name, str(spec.version), [self.get(part, device) for part in spec.models],
                              overlap=spec.overlap, intended_use=spec.intended_use)
        if spec.type == "chain":
            from inference.models.chain import ChainModel

            return ChainModel(name, str(spec.version), self.get(spec.first, device), self.get(spec.then, device),
                              regions=tuple(spec.regions), margin_mm=float(spec.margin_mm),
                              intended_use=spec.intended_use)
        raise ValueError(f"model {name!r}: type {spec.type!r} is not supported")
