"""The model process of a model that runs in its own Python environment: ``python -m inference.serve``.

Started by :class:`inference.remote.EnvironmentModel` with the environment's
interpreter and a ``PYTHONPATH`` that holds only this ``inference``
package.  It reads requests from stdin and answers on stdout (framing and
types: :mod:`inference.wire`); logs go to stderr, which the node logs.

Requests: ``{"op": "load", "name", "spec"}`` (answer: the model card and the
versions it runs with), ``{"op": "predict", "volume"}`` (answer: the
prediction).  A model's exception is an answer (``{"ok": False, "error"}``),
not the end of the process.  It ends at the end of stdin, or when its parent
is gone.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any

from inference import wire
from inference.gpu_memory import out_of_memory_error

logger = logging.getLogger("inference.serve")


def _watch_parent(parent: int) -> None:
    """Leave when the node's worker is gone (killed for a timeout): no orphan holds the GPU."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(3)


def runtime() -> str:
    """``monai 1.4.0, torch 2.13.0, numpy 1.26.4, python 3.11.7`` for the record."""
    parts = []
    for module in ("monai", "torch", "numpy"):
        try:
            parts.append(f"{module} {importlib.import_module(module).__version__}")
        except ImportError:
            continue
    parts.append(f"python {sys.version.split()[0]}")
    return ", ".join(parts)


def main() -> int:
    logging.basicConfig(level=os.environ.get("DICOM_NODE_MODEL_LOG", "INFO"), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True, name="parent-watch").start()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a model that prints must not corrupt the pipe
    model: Any = None
    while True:
        try:
            request = wire.receive(stdin)
        except wire.WireError:
            return 0
        try:
            if request["op"] == "load":
                from inference.registry import ModelRegistry

                registry = ModelRegistry({request["name"]: wire.namespace(request["spec"])}, max_warm=1)
                model = registry.get(request["name"])
                answer: dict[str, Any] = {"ok": True, "card": wire.card_out(model.card), "runtime": runtime()}
            elif request["op"] == "predict":
                if model is None:
                    raise RuntimeError("predict before load")
                prediction = model.predict(wire.volume_in(request["volume"]))
                answer = {"ok": True, "prediction": wire.prediction_out(prediction)}
            else:
                raise ValueError(f"unknown request {request.get('op')!r}")
        except Exception as exc:  # noqa: BLE001 - the model's failure is the job's, not this process's
            logger.error("%s", traceback.format_exc(limit=8))
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                      "out_of_memory": out_of_memory_error(exc) is not None}
        wire.send(stdout, answer)


if __name__ == "__main__":
    sys.exit(main())
