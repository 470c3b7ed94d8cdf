"""GPU admission for local workers: a model runs on a GPU only when its measured need fits.

Several warm models (in one worker, or in several workers bound to one GPU)
share a GPU.  Running one whose working memory does not fit ends in a CUDA
out-of-memory error half-way through, possibly in *another* process's job
that allocated at the wrong moment.  Instead, each run of a model on a GPU
is measured (``torch.cuda.max_memory_allocated`` above what was allocated
before it: activations, sliding-window buffers, not the weights, which stay
allocated while the model is warm), and before the next run:

* the need is the largest measured working memory of that model, scaled up
  linearly for a larger input than the one it was measured on (never down),
  plus :data:`MARGIN`;
* what is available is the device's free memory (every process's use
  counted: ``torch.cuda.mem_get_info``) plus what this process's caching
  allocator holds but does not use;
* while the need does not fit, this worker's other warm models on that GPU
  are unloaded, least recently used first;
* if it still does not fit, the job is not started: :class:`GpuAdmissionRefused`,
  handled as a CUDA out-of-memory error is (``workers.gpu_out_of_memory``:
  retried later, run on the CPU, or failed), without ever touching the GPU.

A model not yet measured runs (its first run is its measurement; a real
out-of-memory error then takes the same way).  Models in their own
environment run in another process and are not measured here.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)

#: Added to a model's measured need before it is compared with what is free.
MARGIN = 0.10
#: Measurements kept per model (input size, working bytes), the most recent.
KEPT = 8


def out_of_memory_error(exc: BaseException) -> BaseException | None:
    """The CUDA out-of-memory error ``exc`` is, or was raised from; None if none.

    ``torch.cuda.OutOfMemoryError`` (by its name: also as a model's own
    environment reports it), found through ``raise ... from`` chains: MONAI's
    ``Compose`` re-raises a transform's error as ``RuntimeError("applying
    transform ...")`` from it.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if type(cause).__name__ == "OutOfMemoryError":
            return cause
        seen.add(id(cause))
        cause = cause.__cause__
    return None


class GpuAdmissionRefused(Exception):
    """The model's measured need does not fit on its GPU now (after unloading this worker's other models)."""


class DeviceMemory(Protocol):
    """What admission reads of a GPU (torch's CUDA calls; a stand-in in tests)."""

    def present(self) -> bool: ...

    def available(self, device: Any) -> int: ...

    def start(self, device: Any) -> int: ...

    def peak(self, device: Any) -> int: ...

    def release(self, device: Any) -> None: ...


class CudaMemory:
    """:class:`DeviceMemory` through ``torch.cuda``."""

    def present(self) -> bool:
        # Not imported here: a model on a GPU has imported torch already, and importing it for a numpy-only
        # model (the built-in one) would add torch's ~170 MB to the worker for nothing.
        torch = sys.modules.get("torch")
        return torch is not None and bool(torch.cuda.is_available())

    def available(self, device: Any) -> int:
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))

    def start(self, device: Any) -> int:
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))

    def peak(self, device: Any) -> int:
        import torch

        return int(torch.cuda.max_memory_allocated(device))

    def release(self, device: Any) -> None:
        import torch

        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Measured:
    voxels: int
    working_bytes: int


def cuda_device(model: Any) -> Any | None:
    """The CUDA device a loaded model computes on, or ``None`` (CPU, or a model in its own process)."""
    device = getattr(model, "device", None)
    if device is None:
        return None
    name = str(device)
    if not name.startswith("cuda"):
        return None
    import torch

    device = torch.device(name)
    if device.index is not None:
        return device
    return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class GpuAdmission:
    """Measured working memory per model, and the admission check before each GPU run.

    Parameters
    ----------
    memory:
        The GPU's memory figures (:class:`CudaMemory` by default).
    """

    def __init__(self, memory: DeviceMemory | None = None) -> None:
        self.memory: DeviceMemory = memory or CudaMemory()
        self._measured: dict[str, list[Measured]] = {}

    def present(self) -> bool:
        """Whether there is a GPU to admit to (no CUDA: models asking for one fail as they always did)."""
        return self.memory.present()

    def need(self, model: str, voxels: int) -> int | None:
        """Bytes ``model`` is expected to need for an input of ``voxels`` (``None``: never measured)."""
        runs = self._measured.get(model)
        if not runs:
            return None
        expected = max(m.working_bytes * max(1.0, voxels / max(1, m.voxels)) for m in runs)
        return int(expected * (1 + MARGIN))

    def admit(self, model: str, device: Any, voxels: int, unload_other: Callable[[], str | None]) -> None:
        """Return when ``model`` may run on ``device``; unload other warm models first if needed.

        ``unload_other()`` unloads this worker's least recently used other
        model on ``device`` and returns its name (``None`` when there is none).

        Raises
        ------
        GpuAdmissionRefused
            The need does not fit even with nothing else of this worker loaded.
        """
        need = self.need(model, voxels)
        if need is None:
            return
        available = self.memory.available(device)
        while available < need:
            unloaded = unload_other()
            if unloaded is None:
                raise GpuAdmissionRefused(
                    f"not started on GPU {device}: it needs {_gib(need)} (its measured working memory "
                    f"+{MARGIN:.0%}), {_gib(available)} is free (other processes hold the rest)")
            self.memory.release(device)
            available = self.memory.available(device)
            logger.info("Model %s needs %s on GPU %s: unloaded model %s (now %s free)", model, _gib(need),
                        device, unloaded, _gib(available))

    @contextmanager
    def measured(self, model: str, device: Any | None, voxels: int) -> Iterator[None]:
        """Measure the working memory of one run of ``model`` on ``device`` (nothing when ``device`` is None)."""
        if device is None:
            yield
            return
        before = self.memory.start(device)
        yield
        working = max(0, self.memory.peak(device) - before)
        runs = self._measured.setdefault(model, [])
        runs.append(Measured(voxels, working))
        del runs[:-KEPT]
        logger.debug("Model %s: %s working GPU memory for %d voxels", model, _gib(working), voxels)

    def working_bytes(self, model: str) -> int:
        """The largest working memory measured for ``model`` (0 when never measured)."""
        return max((m.working_bytes for m in self._measured.get(model, ())), default=0)


__all__ = ["CudaMemory", "DeviceMemory", "GpuAdmission", "GpuAdmissionRefused", "cuda_device", "out_of_memory_error"]
