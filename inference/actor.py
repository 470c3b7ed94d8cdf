"""A model as a long-lived Ray actor: what runs on a cluster machine (``workers.engine: ray``).

The node wraps :class:`ModelActor` with ``ray.remote`` and places it by the
resources its pool asks for; Ray starts it in a worker process of the
machine it chose.  The actor loads its one model once (warm weights) and
answers ``predict`` calls: a :class:`~inference.types.Volume` in (through
Ray's object store: a numpy array read without a copy on the same machine),
a :class:`~inference.types.Prediction` out.  Like the rest of ``inference/``
it knows no DICOM, database or network: the node loads the series, encodes
the results and sends them.

A model with its own Python environment (``environment: managed`` or an
interpreter's path) runs as it does on one host: the actor starts that
interpreter as its child process (:class:`inference.remote.EnvironmentModel`);
the environment must exist at the same path on every machine that may
place the actor (``dicom-node models install NAME`` there).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from functools import cache
from pathlib import Path
from typing import Any

from inference import wire
from inference.types import Prediction, Volume

logger = logging.getLogger(__name__)


@cache
def code_version() -> str:
    """A digest of this ``inference`` package's files: the node refuses an actor running other code."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".tsv")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class ModelActor:
    """One model, loaded once, on the machine Ray placed this actor on.

    Parameters
    ----------
    name:
        The model's config name.
    spec:
        Its config entry as built-in types (:func:`inference.wire.plain`).
    state_dir:
        The node's state directory: where managed environments are found
        (the same path on every machine).
    """

    def __init__(self, name: str, spec: dict[str, Any], state_dir: str | None = None) -> None:
        from inference.registry import ModelRegistry

        self.name = name
        self.spec = spec
        self.state_dir = Path(state_dir) if state_dir else None
        self.registries: dict[str | None, ModelRegistry] = {}
        self.jobs = 0
        self.peak_gpu_bytes = 0
        self._registry_for = ModelRegistry
        self.gpus = _ray_gpus()  # torch is imported for GPU memory figures only when Ray gave this actor a GPU
        self.card = self._model(None).card

    def _model(self, device: str | None) -> Any:
        """The model on its configured device (``None``) or on ``device`` (the CPU fallback)."""
        registry = self.registries.get(device)
        if registry is None:
            spec = dict(self.spec) if device is None else {**self.spec, "device": device}
            registry = self._registry_for({self.name: wire.namespace(spec)}, max_warm=1, state_dir=self.state_dir)
            self.registries[device] = registry
        return registry.get(self.name)

    def describe(self) -> dict[str, Any]:
        """Where this actor runs and what it holds (the node's status and metrics show it)."""
        import ray

        context = ray.get_runtime_context()
        gpus = self.gpus
        total = 0
        try:
            if gpus:
                import torch

                if torch.cuda.is_available():
                    total = int(torch.cuda.get_device_properties(0).total_memory)
        except Exception:  # noqa: BLE001 - a report, never a failure
            total = 0
        return {"node_id": context.get_node_id(), "actor_id": context.get_actor_id(),
                "hostname": socket.gethostname(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "gpu_ids": gpus, "gpu_total_bytes": total, "peak_gpu_bytes": self.peak_gpu_bytes,
                "jobs": self.jobs, "code": code_version(), "card": wire.card_out(self.card),
                "several_inputs": bool(getattr(self._model(None), "takes_several_inputs", False))}

    def predict_study(self, volumes: dict[str, Volume], primary: str,
                      device: str | None = None) -> tuple[Prediction, dict[str, float]]:
        """A study rule's model (several series by role): as :meth:`predict`."""
        return self._run(lambda model: model.predict_study(volumes, primary), device)

    def predict(self, volume: Volume, device: str | None = None) -> tuple[Prediction, dict[str, float]]:
        """Run the model on ``volume``; ``device="cpu"``: on the CPU (after a CUDA out-of-memory error).

        Returns the prediction and ``{"seconds", "peak_gpu_bytes"}``.  A
        model's exception is raised to the node (Ray wraps it; the node
        unwraps it and fails or retries the job as on one host).
        """
        return self._run(lambda model: model.predict(volume), device)

    def _run(self, call: Any, device: str | None) -> tuple[Prediction, dict[str, float]]:
        t0 = time.perf_counter()
        gpu = bool(self.gpus) and _reset_peak()
        try:
            prediction = call(self._model(device))
        finally:
            self.jobs += 1
            if gpu:
                self.peak_gpu_bytes = max(self.peak_gpu_bytes, _peak())
        return prediction, {"seconds": time.perf_counter() - t0, "peak_gpu_bytes": float(self.peak_gpu_bytes)}

    def close(self) -> None:
        for registry in self.registries.values():
            registry.close()


def _ray_gpus() -> list[str]:
    try:
        import ray

        return [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - outside a Ray worker (a test calling the class directly)
        return []


def _reset_peak() -> bool:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return True
    except Exception:  # noqa: BLE001 - a measurement, never a failure
        return False
    return False


def _peak() -> int:
    import torch

    return int(torch.cuda.max_memory_allocated())
