"""``type: monai_bundle`` models: a directory in the MONAI bundle layout, used as its authors wrote it.

Layout (MONAI Bundle specification)::

    configs/metadata.json          version, description, network_data_format (labels)
    configs/inference.json|.yaml   network_def, preprocessing, inferer, postprocessing
    models/model.pt                state dict of network_def   (or)
    models/model.ts                TorchScript export

:class:`monai.bundle.ConfigParser` instantiates the bundle's own
``network_def``, ``preprocessing``, ``inferer`` and ``postprocessing``.  The
node supplies the image instead of the bundle's file loader: ``LoadImaged``
is removed from ``preprocessing`` and the volume enters as the MetaTensor
``LoadImaged`` would have produced (``[x, y, z]``, RAS affine, "no channel",
see :func:`inference.runner.to_metatensor`).  Writers (``SaveImaged``) are
removed from ``postprocessing``; the bundle's ``Invertd`` brings the output
back to the input grid (if a bundle has none, the node inverts the
preprocessing itself, nearest neighbour).

Labels come from ``network_data_format.outputs.pred.channel_def`` (or
``label_def``, as some bundles name it) unless the config lists ``labels``
(with SNOMED CT codes); a channel name the node's anatomy table knows
(:mod:`inference.anatomy`) gets its SNOMED CT code, any other a private code
and a warning in the log.  A ``channel_def`` without a background channel 0
describes overlapping sigmoid channels (BraTS's tumour regions), not the
label values the bundle's postprocessing writes: such a bundle needs
``labels`` in the config.

A bundle's own Python code (``scripts/`` beside ``configs/``) is imported
as the bundle's authors import it (``scripts.networks.unest``), and only
while that bundle is used: two bundles that both ship a ``scripts`` package
each see their own (:class:`BundleImports`).

Detection bundles (``outputs.pred.type: object``, e.g.
``lung_nodule_ct_detection``): the bundle's detector, its inferer and its
box postprocessing run as written; the boxes are read in the coordinates
and box mode the postprocessing leaves them in and reported in patient
coordinates (:class:`~inference.types.Detection`).
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import threading
import warnings
from collections.abc import Hashable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.inferers import SimpleInferer
from monai.transforms import Invertd

from inference import anatomy
from inference.anatomy import PRIVATE_SCHEME  # noqa: F401 - where callers found it
from inference.boxes import as_float_tensor, detections_from_boxes
from inference.gpu_memory import out_of_memory_error
from inference.models.python_callable import segment_volumes
from inference.runner import (
    amp_context,
    channel_argmax,
    classify,
    labelmap_from_output,
    resolve_device,
    to_metatensor,
)
from inference.types import (
    Model,
    ModelCard,
    Prediction,
    SegmentSpec,
    Task,
    Volume,
)

logger = logging.getLogger(__name__)

#: Transforms that read or write files: the node replaces them.
LOADERS = frozenset({"LoadImaged", "LoadImage"})
WRITERS = frozenset({"SaveImaged", "SaveImage"})

def find_config(bundle: Path, config_file: str | None) -> Path:
    """The bundle's inference config: ``configs/<config_file>``, else ``inference.json`` / ``.yaml`` / ``.yml``."""
    names = [config_file] if config_file else ["inference.json", "inference.yaml", "inference.yml"]
    for name in names:
        path = bundle / "configs" / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"bundle {bundle}: no configs/{' or configs/'.join(names)}")


def read_metadata(bundle: Path) -> dict[str, Any]:
    """``configs/metadata.json`` as a dict (empty if absent)."""
    path = bundle / "configs" / "metadata.json"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"bundle {bundle}: configs/metadata.json is not a JSON object")
    return data


def _pred_output(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    outputs = metadata.get("network_data_format", {}).get("outputs", {}) or {}
    pred: Any = outputs.get("pred") or next(iter(outputs.values()), {})
    return pred if isinstance(pred, Mapping) else {}


def channel_names(metadata: Mapping[str, Any]) -> dict[int, str]:
    """``network_data_format.outputs.pred.channel_def`` (or ``label_def``) as ``{channel index: name}``."""
    pred = _pred_output(metadata)
    names = pred.get("channel_def") or pred.get("label_def") or {}
    return {int(k): str(v) for k, v in names.items()} if isinstance(names, Mapping) else {}


def is_detection(metadata: Mapping[str, Any]) -> bool:
    """Whether the bundle's output is boxes (``outputs.pred.type: object``), not an image."""
    return str(_pred_output(metadata).get("type", "")).lower() == "object"


def has_background(names: Mapping[int, str]) -> bool:
    """Whether channel 0 is the background (softmax classes), not a region of its own (sigmoid channels)."""
    first = names.get(0, "").strip().lower()
    return first in ("background", "bg", "_background_", "backgroung", "") or "background" in first


def input_modality(metadata: Mapping[str, Any]) -> str:
    """``network_data_format.inputs.image.modality`` (upper case), or ``""``."""
    image = metadata.get("network_data_format", {}).get("inputs", {}).get("image", {})
    modality = str(image.get("modality", "")).strip().upper()
    modality = {"MRI": "MR"}.get(modality, modality)  # wholeBrainSeg's metadata says MRI; DICOM says MR
    return modality if modality.isalpha() and len(modality) <= 16 else ""


def segments_from_channels(names: Mapping[int, str], model: str) -> tuple[SegmentSpec, ...]:
    """Segments for channels 1.. of ``channel_def`` (channel 0 is the background)."""
    return anatomy.segments_for(names, model)


class BundleImports:
    """The bundle's own top-level Python packages and modules (``scripts``...), importable while it is used.

    Entering puts the bundle folder first on ``sys.path`` and its modules
    (imported earlier under this bundle) into ``sys.modules``, after taking
    out any other bundle's modules of the same names; leaving puts things
    back.  One bundle at a time (a lock): imports are process-wide.
    """

    _lock = threading.RLock()

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.names = frozenset(
            p.stem for p in root.iterdir()
            if (p.is_dir() and (p / "__init__.py").is_file()) or (p.is_file() and p.suffix == ".py")
        ) if root.is_dir() else frozenset()
        self._own: dict[str, Any] = {}
        self._others: dict[str, Any] = {}

    def _take(self) -> dict[str, Any]:
        return {k: sys.modules.pop(k) for k in [m for m in sys.modules if m.split(".", 1)[0] in self.names]}

    def __enter__(self) -> BundleImports:
        self._lock.acquire()
        if self.names:
            self._others = self._take()
            sys.modules.update(self._own)
            sys.path.insert(0, self.root)
            importlib.invalidate_caches()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if self.names:
                if self.root in sys.path:
                    sys.path.remove(self.root)
                self._own = self._take()
                sys.modules.update(self._others)
                self._others = {}
        finally:
            self._lock.release()


def _target_name(item: Any, parser: ConfigParser) -> str:
    """The class name in a transform's config (following ``@reference`` items)."""
    if isinstance(item, str) and item.startswith("@"):
        item = parser.get(item[1:])
    if isinstance(item, Mapping):
        return str(item.get("_target_", "")).rsplit(".", 1)[-1]
    return ""


#: Keys a bundle's LoadImaged reads that are ground truth for evaluation, never an input of inference.
_TRUTH_KEYS = frozenset({"label", "labels", "seg", "mask", "gt", "ground_truth"})


def _loader_keys(parser: ConfigParser) -> list[str]:
    """The image keys of the bundle's LoadImaged (``image`` when it has none): where the node puts the volume."""
    section = parser.get("preprocessing")
    transforms = section.get("transforms") if isinstance(section, Mapping) else None
    if isinstance(transforms, str) and transforms.lstrip("$").startswith("@"):
        transforms = parser.get(transforms.lstrip("$")[1:])
    for item in transforms if isinstance(transforms, list) else []:
        if _target_name(item, parser) in LOADERS and isinstance(item, Mapping):
            keys = item.get("keys", "image")
            if isinstance(keys, str) and keys.startswith("@"):
                keys = parser.get(keys[1:])
            found = [str(k) for k in (keys if isinstance(keys, list) else [keys]) if str(k) not in _TRUTH_KEYS]
            if found and all(not k.startswith(("@", "$")) for k in found):
                return found
    return ["image"]


def _drop_transforms(parser: ConfigParser, key: str, drop: frozenset[str]) -> list[str]:
    """Remove transforms named in ``drop`` from ``parser[key]`` (a Compose); returns what was removed."""
    section = parser.get(key)
    if not isinstance(section, Mapping):
        return []
    list_key = f"{key}#transforms"
    transforms = section.get("transforms")
    if isinstance(transforms, str) and transforms.lstrip("$").startswith("@"):
        list_key = transforms.lstrip("$")[1:]  # "$@preprocessing_transforms" -> the referenced list
        transforms = parser.get(list_key)
    if not isinstance(transforms, list):
        return []
    kept = [t for t in transforms if _target_name(t, parser) not in drop]
    removed = [_target_name(t, parser) for t in transforms if _target_name(t, parser) in drop]
    if removed:
        parser[list_key] = kept
    return removed


def _state_dict(path: Path) -> dict[str, Any]:
    """A state dict from ``models/model.pt``, unwrapping ``{"model": ...}`` / ``{"state_dict": ...}`` checkpoints."""
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "network"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} is not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


class MonaiBundleModel(Model):
    """A MONAI bundle run with its own transforms, network, inferer and postprocessing.

    Parameters
    ----------
    name:
        The model's name in the config (used on its card).
    path:
        The bundle directory.
    spec:
        The config entry (``labels``, ``classes``, ``version``, ``device``, ``amp``, ...).

    Raises
    ------
    FileNotFoundError
        If the bundle has no inference config or no weights.
    ValueError
        If no labels (or classes) can be found, or the weights do not fit ``network_def``.
    """

    def __init__(self, name: str, path: Path, spec: Any, segments: tuple[SegmentSpec, ...] = ()) -> None:
        bundle = Path(path).expanduser().resolve()
        if not bundle.is_dir():
            raise FileNotFoundError(f"model {name}: bundle directory {bundle} not found")
        metadata = read_metadata(bundle)
        self.device = resolve_device(spec.device)
        #: Where the bundle's transforms run (``transforms_on``); the CPU after they failed on the device.
        self.transforms_device = (self.device if getattr(spec, "transforms_on", "device") == "device"
                                  else torch.device("cpu"))
        self.amp = bool(spec.amp)
        self.activation = spec.activation
        self.threshold = float(spec.threshold)
        self.max_detections = int(getattr(spec, "max_detections", 100))
        task = Task(spec.task)
        if task is Task.SEGMENTATION and is_detection(metadata):
            task = Task.DETECTION  # the bundle says its output is boxes
        names = channel_names(metadata)
        classes: tuple[str, ...] = ()
        if task is Task.SEGMENTATION:
            if not segments and names and not has_background(names):
                raise ValueError(
                    f"model {name}: the channel_def of {bundle.name} ({', '.join(names.values())}) has no background "
                    "channel 0: its channels are overlapping regions (sigmoid), not the label values its "
                    "postprocessing writes; list those under labels in the config")
            segments = segments or segments_from_channels(names, name)
            if not segments:
                raise ValueError(f"model {name}: no labels in the config and no channel_def or label_def in "
                                 f"{bundle}/configs/metadata.json")
        elif task is Task.DETECTION:
            classes = tuple(spec.classes) or tuple(n for _, n in sorted(names.items())) or ("Finding",)
        else:
            classes = tuple(spec.classes) or tuple(n for _, n in sorted(names.items()))
            if not classes:
                raise ValueError(f"model {name}: no classes in the config and no channel_def in metadata.json")
        self.card = ModelCard(
            name=name, version=str(spec.version or metadata.get("version", "") or "0"),
            family="Artificial Intelligence", task=task,
            intended_use=(spec.intended_use or str(metadata.get("description", "")))[:1024],
            modality=spec.modality or input_modality(metadata), segments=segments, classes=classes,
        )
        self.imports = BundleImports(bundle)
        with self.imports:
            self._build(bundle, metadata, spec)

    def _build(self, bundle: Path, metadata: dict[str, Any], spec: Any) -> None:
        parser = ConfigParser()
        parser.read_config(str(find_config(bundle, spec.config_file)))
        with warnings.catch_warnings():  # MONAI 1.6 renames optional_packages_version, as most bundles name it
            warnings.filterwarnings("ignore", message=".*deprecated name.*", category=UserWarning)
            parser.read_meta(metadata)
        parser["bundle_root"] = str(bundle)
        parser["device"] = f"$torch.device('{self.device}')"
        for key in ("overlap", "sw_batch_size"):
            value = getattr(spec, key, None)
            if value is not None and isinstance(parser.get("inferer"), Mapping):
                parser[f"inferer#{key}"] = value
        self.input_keys = _loader_keys(parser)
        dropped = _drop_transforms(parser, "preprocessing", LOADERS)
        dropped += _drop_transforms(parser, "postprocessing", WRITERS)
        self.preprocessing = parser.get_parsed_content("preprocessing") if parser.get("preprocessing") else None
        self.postprocessing = parser.get_parsed_content("postprocessing") if parser.get("postprocessing") else None
        self.network = self._load_network(bundle, parser).to(self.device).eval()
        if self.card.task is Task.DETECTION:
            # The evaluator's _requires_ configure the detector (score threshold, NMS, sliding window).
            for required in _as_list(parser.get("evaluator#_requires_") if parser.get("evaluator") else None):
                if isinstance(required, str) and required.startswith("@"):
                    parser.get_parsed_content(required[1:])
            self.box_format = _box_format(parser)
        self.inferer = parser.get_parsed_content("inferer") if parser.get("inferer") else SimpleInferer()
        logger.info("Model %s: MONAI bundle %s version %s on %s (AMP %s; replaced %s)", self.card.name, bundle.name,
                    self.card.version, self.device, "on" if self.amp and self.device.type == "cuda" else "off",
                    ", ".join(dropped) or "nothing")

    @staticmethod
    def _load_network(bundle: Path, parser: ConfigParser) -> torch.nn.Module:
        weights, script = bundle / "models" / "model.pt", bundle / "models" / "model.ts"
        if weights.is_file() and parser.get("network_def") is not None:
            network = parser.get_parsed_content("network_def")
            network.load_state_dict(_state_dict(weights), strict=True)
            return network  # type: ignore[no-any-return]
        if script.is_file():
            return torch.jit.load(str(script), map_location="cpu")  # type: ignore[no-any-return]
        raise FileNotFoundError(f"bundle {bundle}: needs models/model.pt with network_def in its config, "
                                "or models/model.ts")

    def predict(self, volume: Volume) -> Prediction:
        with self.imports, torch.inference_mode():
            data = self._preprocessed(volume)
            image = data["image"] if "image" in data else data[self.input_keys[0]]
            if image.ndim == 3:  # a bundle without EnsureChannelFirstd
                image = image[None]
            batch = image.unsqueeze(0).to(self.device).contiguous()
            with amp_context(self.device, self.amp):  # the network in float16 (AMP), its transforms not
                outputs = self.inferer(batch, self.network)
            if self.card.task is Task.DETECTION:
                return self._detections(outputs, image)
            pred = outputs[0].float()
            if self.card.task is Task.CLASSIFICATION:
                return Prediction(card=self.card,
                                  classifications=classify(pred, self.card, self.activation, self.threshold))
            out = self._postprocess(data, image, pred, volume)
        labelmap = labelmap_from_output(out, self.card, volume.shape)
        return Prediction(card=self.card, labelmap=labelmap, measurements=segment_volumes(labelmap, self.card, volume))

    def _preprocessed(self, volume: Volume) -> dict[str, Any]:
        """The bundle's preprocessing of the volume, on :attr:`transforms_device`.

        On a GPU the volume is uploaded once, as stored, and every transform
        after it (orientation, resampling, intensity) runs there; the
        postprocessing then inverts and the label map is counted there too.
        A bundle whose own transforms need host memory (NumPy, SciPy) fails
        there: its preprocessing is run again on the CPU, and if that
        succeeds the model stays on the CPU for its transforms from then on
        (a warning says so).  Running out of memory is not such a failure:
        it is raised as it is (the job is retried or moved by the node).
        """
        device = self.transforms_device
        if device.type == "cpu":
            return self._preprocess(self._inputs(volume, None))
        try:
            return self._preprocess(self._inputs(volume, device))
        except Exception as exc:
            if out_of_memory_error(exc) is not None or isinstance(exc, MemoryError):
                raise
            root: BaseException = exc
            while root.__cause__ is not None and root.__cause__ is not root:  # MONAI's "applying transform ..."
                root = root.__cause__
            failure = f"{type(root).__name__}: {str(root)[:300]}"
        data = self._preprocess(self._inputs(volume, None))  # a failure here is the job's, as before
        self.transforms_device = torch.device("cpu")
        logger.warning("Model %s: the bundle's preprocessing failed on %s (%s) and succeeded on the CPU; its "
                       "transforms run on the CPU from now on (transforms_on: cpu starts there)",
                       self.card.name, device, failure)
        return data

    def _preprocess(self, data: dict[str, Any]) -> dict[str, Any]:
        return self.preprocessing(data) if self.preprocessing is not None else data

    def _inputs(self, volume: Volume, device: torch.device | None) -> dict[str, Any]:
        """What the bundle's LoadImaged would have produced: one key per input file key of the bundle.

        A bundle that loads each channel under its own key (renalStructures_CECT:
        ``artery``, ``vein``, ``excret``) gets channel ``c`` under key ``c``; one
        image key (brats: a list of four files) gets the channels stacked.
        ``device``: where the images go (None: host memory, as a loader leaves them).
        """
        keys = self.input_keys
        if volume.channels and len(keys) > 1:
            if len(keys) != len(volume.channels):
                raise ValueError(f"model {self.card.name}: the bundle loads {len(keys)} images ({', '.join(keys)}); "
                                 f"it was given {len(volume.channels)} channels ({', '.join(volume.channels)})")
            images = {key: to_metatensor(Volume(volume.array[c], volume.spacing, volume.origin, volume.direction,
                                                volume.modality), device=device) for c, key in enumerate(keys)}
        else:
            images = {keys[0] if keys else "image": to_metatensor(volume, device=device)}
        # LoadImaged(image_only=False) also gives "<key>_meta_dict"; some bundles' own transforms read it.
        return {**images, **{f"{key}_meta_dict": dict(image.meta) for key, image in images.items()}}

    def _postprocess(self, data: dict[str, Any], image: Any, pred: Any, volume: Volume) -> Any:
        meta = image.meta if isinstance(image, MetaTensor) else {}
        ops = image.applied_operations if isinstance(image, MetaTensor) else []
        data["image"] = image
        data["pred"] = MetaTensor(pred.as_tensor() if isinstance(pred, MetaTensor) else pred,
                                  meta=dict(meta), applied_operations=list(ops))
        if self.postprocessing is not None:
            data = self.postprocessing(data)
        out = data["pred"]
        spatial = tuple(volume.shape[::-1])
        # Still on the network's grid (the bundle has no Invertd): shape differs, or transforms not undone.
        on_network_grid = tuple(out.shape[-3:]) != spatial or bool(getattr(out, "applied_operations", None))
        if on_network_grid and self.preprocessing is not None and isinstance(out, MetaTensor):
            logger.debug("Model %s: postprocessing left the output on the network grid; inverting", self.card.name)
            if out.shape[0] > 1:
                out = MetaTensor(channel_argmax(out.as_tensor(), keepdim=True).float(), meta=dict(out.meta),
                                 applied_operations=list(out.applied_operations))
            data["pred"] = out
            invert = Invertd(keys="pred", transform=self.preprocessing, orig_keys="image", nearest_interp=True)
            inverted: Mapping[Hashable, Any] = invert(cast(Mapping[Hashable, Any], data))
            out = inverted["pred"]
        return out

    def _detections(self, outputs: Any, image: Any) -> Prediction:
        """The detector's boxes, through the bundle's postprocessing, as patient-coordinate detections."""
        result = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        if not isinstance(result, Mapping):
            raise ValueError(f"model {self.card.name}: the detector returned {type(result).__name__}, "
                             "not a dict of boxes")
        data: dict[str, Any] = {**result, "image": image}
        if self.postprocessing is not None:
            data = self.postprocessing(data)
        fmt = self.box_format
        boxes = as_float_tensor(data.get(fmt.box_key)).reshape(-1, 6)
        detections = detections_from_boxes(
            self.card.name, boxes, as_float_tensor(data.get(fmt.label_key, torch.zeros(len(boxes)))),
            as_float_tensor(data.get(fmt.score_key, torch.ones(len(boxes)))), mode=fmt.mode, image=image,
            classes=self.card.classes, threshold=self.threshold, limit=self.max_detections, world=fmt.world,
            lps=fmt.lps)
        return Prediction(card=self.card, detections=detections)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class _BoxFormat:
    """How the bundle's postprocessing leaves its boxes: keys, box mode, and coordinate space."""

    def __init__(self, box_key: str = "box", label_key: str = "label", mode: str = "xyzxyz", world: bool = False,
                 lps: bool = False) -> None:
        self.box_key, self.label_key, self.score_key = box_key, label_key, f"{label_key}_scores"
        self.mode, self.world, self.lps = mode, world, lps


def _box_format(parser: ConfigParser) -> _BoxFormat:
    """Read the box keys, mode and space from the bundle's detector and postprocessing configuration."""
    fmt = _BoxFormat()
    for op in _as_list(parser.get("detector_ops")):
        text = str(op)
        if "set_target_keys" in text:
            for key, attr in (("box_key", "box_key"), ("label_key", "label_key")):
                marker = f"{key}='"
                if marker in text:
                    setattr(fmt, attr, text.split(marker, 1)[1].split("'", 1)[0])
            fmt.score_key = f"{fmt.label_key}_scores"
    post = parser.get("postprocessing") or {}
    for item in _as_list(post.get("transforms") if isinstance(post, Mapping) else None):
        target = str(item.get("_target_", "")).rsplit(".", 1)[-1] if isinstance(item, Mapping) else ""
        if target == "AffineBoxToWorldCoordinated":
            fmt.world, fmt.lps = True, bool(item.get("affine_lps_to_ras", False))
        elif target == "ConvertBoxModed":
            fmt.mode = str(item.get("dst_mode", fmt.mode))
    return fmt
