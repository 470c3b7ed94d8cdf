"""What crosses the pipe between the node and a model running in another Python environment.

Only built-in types travel (dict, list, str, int, float, bool, bytes, None),
pickled with protocol 4: a message written by numpy 2 on one side reads on
a numpy 1 side, and no class of either side's packages is unpickled on the
other.  Arrays travel as ``{"dtype", "shape", "data"}``.

Framing: an 8-byte big-endian length, then the pickle.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Mapping
from pathlib import Path, PurePath
from types import SimpleNamespace
from typing import IO, Any

import numpy as np

from inference.types import (
    Classification,
    Code,
    Detection,
    Measurement,
    ModelCard,
    Prediction,
    SegmentSpec,
    Task,
    Volume,
)

_HEADER = struct.Struct(">Q")
#: A message larger than this is refused (a corrupted length would otherwise allocate it).
MAX_MESSAGE = 1 << 36


class WireError(RuntimeError):
    """The other side closed the pipe or wrote something that is not a message."""


def send(stream: IO[bytes], message: Any) -> None:
    """Write one message and flush."""
    body = pickle.dumps(message, protocol=4)
    stream.write(_HEADER.pack(len(body)))
    stream.write(body)
    stream.flush()


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = stream.read(min(left, 1 << 24))
        if not chunk:
            raise WireError("the other side closed the pipe")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(stream: IO[bytes]) -> Any:
    """Read one message.

    Raises
    ------
    WireError
        On end of stream or an impossible length.
    """
    (size,) = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    if size > MAX_MESSAGE:
        raise WireError(f"message of {size} bytes announced: not a message of this protocol")
    return pickle.loads(_read_exact(stream, size))  # noqa: S301 - our own child process, built-in types only


def array_out(array: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(array)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def array_in(obj: Mapping[str, Any]) -> np.ndarray:
    return np.frombuffer(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()


def volume_out(volume: Volume) -> dict[str, Any]:
    return {"array": array_out(volume.array), "spacing": [float(s) for s in volume.spacing],
            "origin": [float(o) for o in volume.origin],
            "direction": np.asarray(volume.direction, dtype=float).tolist(), "modality": volume.modality,
            "channels": list(volume.channels)}


def volume_in(obj: Mapping[str, Any]) -> Volume:
    return Volume(array_in(obj["array"]), tuple(obj["spacing"]), tuple(obj["origin"]),  # type: ignore[arg-type]
                  np.asarray(obj["direction"], dtype=float), obj["modality"], tuple(obj.get("channels", ())))


def _code_out(code: Code) -> list[str]:
    return [code.value, code.scheme, code.meaning]


def _code_in(obj: list[str]) -> Code:
    return Code(*obj)


def _maybe_code_out(code: Code | None) -> list[str] | None:
    return None if code is None else _code_out(code)


def _maybe_code_in(obj: list[str] | None) -> Code | None:
    return None if obj is None else Code(*obj)


def card_out(card: ModelCard) -> dict[str, Any]:
    return {"name": card.name, "version": card.version, "family": card.family, "task": str(card.task),
            "intended_use": card.intended_use, "modality": card.modality, "classes": list(card.classes),
            "model_hash": card.model_hash, "runtime": card.runtime,
            "segments": [{"label": s.label, "name": s.name, "category": _code_out(s.category),
                          "type": _code_out(s.type), "color": list(s.color), "modifier": _maybe_code_out(s.modifier),
                          "site": _maybe_code_out(s.site)} for s in card.segments]}


def card_in(obj: Mapping[str, Any]) -> ModelCard:
    return ModelCard(
        name=obj["name"], version=obj["version"], family=obj["family"], task=Task(obj["task"]),
        intended_use=obj["intended_use"], modality=obj["modality"], classes=tuple(obj["classes"]),
        model_hash=obj["model_hash"], runtime=obj.get("runtime", ""),
        segments=tuple(SegmentSpec(s["label"], s["name"], _code_in(s["category"]), _code_in(s["type"]),
                                   tuple(s["color"]), modifier=_maybe_code_in(s.get("modifier")),  # type: ignore[arg-type]
                                   site=_maybe_code_in(s.get("site"))) for s in obj["segments"]))


def prediction_out(prediction: Prediction) -> dict[str, Any]:
    return {
        "card": card_out(prediction.card),
        "labelmap": None if prediction.labelmap is None else array_out(prediction.labelmap),
        "measurements": {int(k): [[_code_out(m.concept), float(m.value), _code_out(m.unit)] for m in v]
                         for k, v in prediction.measurements.items()},
        "classifications": [[c.name, float(c.probability), bool(c.positive)] for c in prediction.classifications],
        "detections": [[d.label, float(d.score), [float(x) for x in d.center], [float(x) for x in d.size]]
                       for d in prediction.detections],
        "findings": list(prediction.findings),
    }


def prediction_in(obj: Mapping[str, Any]) -> Prediction:
    return Prediction(
        card=card_in(obj["card"]),
        labelmap=None if obj["labelmap"] is None else array_in(obj["labelmap"]),
        measurements={int(k): tuple(Measurement(_code_in(c), v, _code_in(u)) for c, v, u in ms)
                      for k, ms in obj["measurements"].items()},
        classifications=tuple(Classification(n, p, pos) for n, p, pos in obj["classifications"]),
        detections=tuple(Detection(label, score, tuple(c), tuple(s))  # type: ignore[arg-type]
                         for label, score, c, s in obj.get("detections", ())),
        findings=tuple(obj["findings"]),
    )


def plain(value: Any) -> Any:
    """A model spec (pydantic model, dataclass, namespace) as built-in types, recursively."""
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return plain(dump())
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, SimpleNamespace):
        return plain(vars(value))
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value.expanduser().absolute())  # the model process runs in another directory
    if isinstance(value, PurePath):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def namespace(value: Any) -> Any:
    """Built-in types back as attribute objects (what the registry reads a spec through)."""
    if isinstance(value, Mapping):
        return SimpleNamespace(**{k: namespace(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(namespace(v) for v in value)
    return value
