"""A model that runs in another Python environment, seen from the node as any other model.

:class:`EnvironmentModel` starts ``python -m inference.serve`` with the
model's interpreter (a managed environment's, or the one named by
``environment: /path/to/python``), asks it to load the model, and keeps it
running (warm) between jobs.  ``predict`` sends the volume and returns the
prediction.  A model that raises fails the job with its message; a model
process that dies is started again at the next job.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from inference import wire
from inference.types import Model, Prediction, Volume

logger = logging.getLogger(__name__)


class ModelEnvironmentError(RuntimeError):
    """The model's environment cannot run it (missing, broken, or its process died)."""


class OutOfMemoryError(MemoryError):
    """The model ran out of GPU memory in its environment (named as torch's, which the job runner knows)."""


class EnvironmentModel(Model):
    """Parameters
    ----------
    name, spec:
        The model's config name and entry (sent to the model process as plain values).
    python:
        The interpreter to run it with.
    inference_path:
        The folder holding only a link to this ``inference`` package (the
        process's ``PYTHONPATH``); ``None``: the folder above this package.
    label:
        How the environment is named in logs and the model card's ``runtime``.
    """

    def __init__(self, name: str, spec: Any, python: Path, inference_path: Path | None = None,
                 label: str = "") -> None:
        self.name = name
        self.spec = wire.plain(spec)
        self.spec["environment"] = "shared"  # inside its environment the model runs in process
        self.python = Path(python)
        self.inference_path = inference_path or Path(__file__).resolve().parent.parent
        self.label = label or str(python)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self.card = self._start()

    def _start(self) -> Any:
        if not self.python.exists():
            raise ModelEnvironmentError(f"model {self.name}: interpreter {self.python} not found")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PYTHONPATH"] = str(self.inference_path)
        env["PYTHONNOUSERSITE"] = "1"
        env["DICOM_NODE_MODEL_LOG"] = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        # cwd: ``-m`` puts the working directory first on sys.path; this folder holds only the link.
        self._proc = subprocess.Popen([str(self.python), "-m", "inference.serve"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                      cwd=str(self.inference_path))
        assert self._proc.stderr is not None
        threading.Thread(target=self._log_stderr, args=(self._proc.stderr,), daemon=True,
                         name=f"model-{self.name}-stderr").start()
        answer = self._ask({"op": "load", "name": self.name, "spec": self.spec})
        card = wire.card_in(answer["card"])
        where = f"{answer['runtime']} ({self.label})"
        card = replace(card, runtime=f"{card.runtime}; {where}" if card.runtime else where)
        logger.info("Model %s: running in %s: %s (process %d)", self.name, self.label, answer["runtime"],
                    self._proc.pid)
        return card

    def _log_stderr(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                logger.info("Model %s [%s]: %s", self.name, "environment", line)

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise ModelEnvironmentError(f"model {self.name}: its process is not running")
        try:
            wire.send(proc.stdin, request)
            answer: dict[str, Any] = wire.receive(proc.stdout)
        except (wire.WireError, BrokenPipeError, OSError) as exc:
            code = proc.wait(timeout=10) if proc.poll() is None else proc.returncode
            self._proc = None
            _close_pipes(proc)
            raise ModelEnvironmentError(f"model {self.name}: its process in {self.label} ended "
                                    f"(exit code {code}): {exc}") from None
        if not answer.get("ok"):
            if answer.get("out_of_memory"):
                raise OutOfMemoryError(f"model {self.name}: CUDA out of memory in its environment: {answer['error']}")
            raise RuntimeError(f"in {self.label}: {answer.get('error', 'failed')}")
        return answer

    def predict(self, volume: Volume) -> Prediction:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                logger.warning("Model %s: its process had ended; starting it again", self.name)
                self.card = self._start()
            answer = self._ask({"op": "predict", "volume": wire.volume_out(volume)})
        prediction = wire.prediction_in(answer["prediction"])
        return replace(prediction, card=self.card)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        _close_pipes(proc)

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
