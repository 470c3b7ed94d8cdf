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

Labels come from ``network_data_format.outputs.pred.channel_def`` unless the
config lists ``labels`` (with SNOMED CT codes); a channel name the node knows
(:data:`KNOWN_STRUCTURES`) gets its SNOMED CT code, any other a private code
and a warning in the log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.inferers import SimpleInferer
from monai.transforms import Invertd

from inference.models.python_callable import segment_volumes
from inference.runner import classify, inference_context, labelmap_from_output, resolve_device, to_metatensor
from inference.types import SCT_ANATOMICAL_STRUCTURE, Code, Model, ModelCard, Prediction, SegmentSpec, Task, Volume

logger = logging.getLogger(__name__)

#: Transforms that read or write files: the node replaces them.
LOADERS = frozenset({"LoadImaged", "LoadImage"})
WRITERS = frozenset({"SaveImaged", "SaveImage"})

#: SNOMED CT codes of common channel names of Model Zoo bundles (lower-case name -> code).
KNOWN_STRUCTURES: Mapping[str, Code] = {
    "spleen": Code("78961009", "SCT", "Spleen"),
    "liver": Code("10200004", "SCT", "Liver"),
    "kidney": Code("64033007", "SCT", "Kidney"),
    "right kidney": Code("9846003", "SCT", "Right kidney"),
    "left kidney": Code("18639004", "SCT", "Left kidney"),
    "pancreas": Code("15776009", "SCT", "Pancreas"),
    "stomach": Code("69695003", "SCT", "Stomach"),
    "gallbladder": Code("28231008", "SCT", "Gallbladder"),
    "aorta": Code("15825003", "SCT", "Aorta"),
    "esophagus": Code("32849002", "SCT", "Esophagus"),
    "heart": Code("80891009", "SCT", "Heart"),
    "lung": Code("39607008", "SCT", "Lung"),
    "right lung": Code("3341006", "SCT", "Right lung"),
    "left lung": Code("44029006", "SCT", "Left lung"),
    "urinary bladder": Code("89837001", "SCT", "Urinary bladder"),
}

#: Private coding scheme for channel names without a known SNOMED CT code.
PRIVATE_SCHEME = "99DCMNODE"

_PALETTE = ((221, 130, 101), (144, 238, 144), (128, 174, 128), (241, 214, 145), (177, 122, 101),
            (111, 184, 210), (216, 101, 79), (183, 156, 220), (252, 208, 0), (255, 128, 0))


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


def channel_names(metadata: Mapping[str, Any]) -> dict[int, str]:
    """``network_data_format.outputs.pred.channel_def`` as ``{channel index: name}``."""
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    pred: Mapping[str, Any] = outputs.get("pred") or next(iter(outputs.values()), {})
    return {int(k): str(v) for k, v in (pred.get("channel_def") or {}).items()}


def input_modality(metadata: Mapping[str, Any]) -> str:
    """``network_data_format.inputs.image.modality`` (upper case), or ``""``."""
    image = metadata.get("network_data_format", {}).get("inputs", {}).get("image", {})
    modality = str(image.get("modality", "")).strip().upper()
    return modality if modality.isalpha() and len(modality) <= 16 else ""


def segments_from_channels(names: Mapping[int, str], model: str) -> tuple[SegmentSpec, ...]:
    """Segments for channels 1.. of ``channel_def`` (channel 0 is the background)."""
    segments = []
    for index, name in sorted(names.items()):
        if index == 0:
            continue
        code = KNOWN_STRUCTURES.get(name.strip().lower())
        if code is None:
            logger.warning("Model %s: channel %d %r has no known SNOMED CT code; list it under labels "
                           "in the config to code it", model, index, name)
            code = Code(name.strip()[:16].upper().replace(" ", "_") or f"CH{index}", PRIVATE_SCHEME, name[:64])
        segments.append(SegmentSpec(index, name[:64], SCT_ANATOMICAL_STRUCTURE, code,
                                    _PALETTE[(index - 1) % len(_PALETTE)]))
    return tuple(segments)


def _target_name(item: Any, parser: ConfigParser) -> str:
    """The class name in a transform's config (following ``@reference`` items)."""
    if isinstance(item, str) and item.startswith("@"):
        item = parser.get(item[1:])
    if isinstance(item, Mapping):
        return str(item.get("_target_", "")).rsplit(".", 1)[-1]
    return ""


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
        self.amp = bool(spec.amp)
        self.activation = spec.activation
        self.threshold = float(spec.threshold)
        task = Task(spec.task)
        names = channel_names(metadata)
        if task is Task.SEGMENTATION:
            segments = segments or segments_from_channels(names, name)
            if not segments:
                raise ValueError(f"model {name}: no labels in the config and no channel_def in "
                                 f"{bundle}/configs/metadata.json")
            classes: tuple[str, ...] = ()
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

        parser = ConfigParser()
        parser.read_config(str(find_config(bundle, spec.config_file)))
        parser.read_meta(metadata)
        parser["bundle_root"] = str(bundle)
        parser["device"] = f"$torch.device('{self.device}')"
        for key in ("overlap", "sw_batch_size"):
            value = getattr(spec, key, None)
            if value is not None and isinstance(parser.get("inferer"), Mapping):
                parser[f"inferer#{key}"] = value
        dropped = _drop_transforms(parser, "preprocessing", LOADERS)
        dropped += _drop_transforms(parser, "postprocessing", WRITERS)
        self.preprocessing = parser.get_parsed_content("preprocessing") if parser.get("preprocessing") else None
        self.postprocessing = parser.get_parsed_content("postprocessing") if parser.get("postprocessing") else None
        self.inferer = parser.get_parsed_content("inferer") if parser.get("inferer") else SimpleInferer()
        self.network = self._load_network(bundle, parser).to(self.device).eval()
        logger.info("Model %s: MONAI bundle %s version %s on %s (AMP %s; replaced %s)", name, bundle.name,
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
        with inference_context(self.device, self.amp):
            data: dict[str, Any] = {"image": to_metatensor(volume)}
            if self.preprocessing is not None:
                data = self.preprocessing(data)
            image = data["image"]
            if image.ndim == 3:  # a bundle without EnsureChannelFirstd
                image = image[None]
            batch = image.unsqueeze(0).to(self.device).contiguous()
            pred = self.inferer(batch, self.network)[0].float()
            if self.card.task is Task.CLASSIFICATION:
                return Prediction(card=self.card,
                                  classifications=classify(pred, self.card, self.activation, self.threshold))
            meta = image.meta if isinstance(image, MetaTensor) else {}
            ops = image.applied_operations if isinstance(image, MetaTensor) else []
            data["image"] = image
            data["pred"] = MetaTensor(pred.as_tensor() if isinstance(pred, MetaTensor) else pred,
                                      meta=dict(meta), applied_operations=list(ops))
            if self.postprocessing is not None:
                data = self.postprocessing(data)
            out = data["pred"]
            spatial = tuple(volume.array.shape[::-1])
            if tuple(out.shape[-3:]) != spatial and self.preprocessing is not None and isinstance(out, MetaTensor):
                logger.debug("Model %s: postprocessing left the output on the network grid; inverting",
                             self.card.name)
                if out.shape[0] > 1:
                    out = MetaTensor(torch.argmax(out, dim=0, keepdim=True).float(), meta=dict(out.meta),
                                     applied_operations=list(out.applied_operations))
                data["pred"] = out
                invert = Invertd(keys="pred", transform=self.preprocessing, orig_keys="image", nearest_interp=True)
                inverted: Mapping[Hashable, Any] = invert(cast(Mapping[Hashable, Any], data))
                out = inverted["pred"]
        labelmap = labelmap_from_output(out, self.card, volume.array.shape)
        return Prediction(card=self.card, labelmap=labelmap, measurements=segment_volumes(labelmap, self.card, volume))
