"""``type: torchscript`` models: a TorchScript file plus preprocessing declared in the config.

The image goes through MONAI dictionary transforms built from the declared
preprocessing (``Orientationd``, ``Spacingd``, ``ScaleIntensityRanged`` or
``NormalizeIntensityd``, ``Resized``), then the network (through
:func:`monai.inferers.sliding_window_inference` when ``roi_size`` is set).
A segmentation is decoded to labels on the network's grid and brought back
to the input grid by inverting the same transforms (``Invertd``, nearest
neighbour), so every label lands on the source voxel it was computed for.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import (
    Compose,
    Invertd,
    NormalizeIntensityd,
    Orientationd,
    Resized,
    ScaleIntensityRanged,
    Spacingd,
)

from inference.boxes import as_float_tensor, detections_from_boxes
from inference.models.python_callable import segment_volumes
from inference.runner import (
    amp_context,
    classify,
    decode_segmentation,
    labelmap_from_output,
    resolve_device,
    to_metatensor,
)
from inference.types import Model, ModelCard, Prediction, Task, Volume

logger = logging.getLogger(__name__)

#: Axis letters of MONAI's RAS convention (given explicitly: MONAI warns about its changing default).
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def build_preprocessing(pre: Any) -> Compose:
    """MONAI transforms (key ``image``, channel-first input) for declared preprocessing settings."""
    keys = ["image"]
    transforms: list[Any] = []
    if pre.orientation:
        transforms.append(Orientationd(keys=keys, axcodes=pre.orientation, labels=_RAS_LABELS))
    if pre.spacing:
        transforms.append(Spacingd(keys=keys, pixdim=tuple(pre.spacing), mode="bilinear"))
    if pre.window:
        transforms.append(ScaleIntensityRanged(keys=keys, a_min=pre.window[0], a_max=pre.window[1],
                                               b_min=0.0, b_max=1.0, clip=True))
    if pre.normalize == "zscore":
        transforms.append(NormalizeIntensityd(keys=keys))
    if pre.spatial_size:
        transforms.append(Resized(keys=keys, spatial_size=tuple(pre.spatial_size), mode="trilinear"))
    return Compose(transforms)


def box_outputs(out: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(boxes, labels, scores)`` from what a TorchScript detection network returns.

    Accepted: a dict with ``boxes`` (n, 6), ``scores`` (n) and optionally
    ``labels`` (n, class indices; default 0), as torchvision's and MONAI's
    detectors give it (``box``, ``label``, ``label_scores`` also read), or a
    list holding one such dict (one per image of the batch), or a tuple
    ``(boxes, scores)`` / ``(boxes, scores, labels)``.

    Raises
    ------
    ValueError
        For anything else, saying what was returned.
    """
    if isinstance(out, list | tuple) and len(out) == 1 and isinstance(out[0], dict):
        out = out[0]
    if isinstance(out, dict):
        boxes = out.get("boxes", out.get("box"))
        scores = out.get("scores", out.get("label_scores"))
        labels = out.get("labels", out.get("label"))
    elif isinstance(out, list | tuple) and len(out) in (2, 3) and all(torch.is_tensor(t) for t in out):
        boxes, scores, labels = out[0], out[1], out[2] if len(out) == 3 else None
    else:
        raise ValueError(f"detection model {name} returned {type(out).__name__}: it must return a dict with "
                         "'boxes' (n, 6) and 'scores' (n) (and 'labels'), a list of one such dict, or a tuple "
                         "(boxes, scores[, labels])")
    if boxes is None or scores is None:
        raise ValueError(f"detection model {name} returned keys {sorted(out)}: 'boxes' and 'scores' are needed")
    boxes_t = as_float_tensor(boxes)
    if boxes_t.numel() % 6:
        raise ValueError(f"detection model {name}: boxes of shape {tuple(boxes_t.shape)}, not (n, 6)")
    boxes_t = boxes_t.reshape(-1, 6)
    labels_t = torch.zeros(len(boxes_t)) if labels is None else as_float_tensor(labels)
    return boxes_t, labels_t, as_float_tensor(scores)


class TorchscriptModel(Model):
    """A TorchScript network with declared preprocessing.

    Parameters
    ----------
    card:
        Model card from the config (labels or classes).
    path:
        The ``.ts`` / ``.pt`` TorchScript file.
    preprocessing:
        The ``preprocessing:`` settings (orientation, spacing, window, ...).
    device:
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    amp:
        Mixed precision (float16 autocast) on CUDA.
    activation:
        ``softmax`` or ``sigmoid`` (see :func:`inference.runner.decode_segmentation`).
    threshold:
        Classification: probability at which a class is positive; detection:
        the lowest score of a box kept.
    box_mode:
        Detection: how the network gives a box (MONAI's ``xyzxyz``,
        ``xxyyzz`` or ``cccwhd``), in voxel coordinates of the image it saw.
    max_detections:
        Detection: the most boxes kept (best scores first).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    """

    def __init__(self, card: ModelCard, path: Path, preprocessing: Any, device: str = "auto", amp: bool = True,
                 activation: str = "softmax", threshold: float = 0.5, box_mode: str = "xyzxyz",
                 max_detections: int = 100) -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model {card.name}: TorchScript file {path} not found")
        self.card = card
        self.device = resolve_device(device)
        self.amp = amp
        self.activation = activation
        self.threshold = threshold
        self.box_mode = box_mode
        self.max_detections = max_detections
        self.pre = preprocessing
        self.transforms = build_preprocessing(preprocessing)
        self.network = torch.jit.load(str(path), map_location=self.device).eval()
        logger.info("Model %s: TorchScript %s on %s (AMP %s)", card.name, path.name, self.device,
                    "on" if amp and self.device.type == "cuda" else "off")

    def _detect(self, image: MetaTensor) -> Prediction:
        """The network's boxes (on the whole preprocessed image) as patient-coordinate detections."""
        batch = image.as_tensor().unsqueeze(0).to(self.device).contiguous()
        with amp_context(self.device, self.amp):
            outputs = self.network(batch)
        boxes, labels, scores = box_outputs(outputs, self.card.name)
        return Prediction(card=self.card, detections=detections_from_boxes(
            self.card.name, boxes, labels, scores, mode=self.box_mode, image=image, classes=self.card.classes,
            threshold=self.threshold, limit=self.max_detections))

    def _forward(self, image: torch.Tensor) -> torch.Tensor:
        batch = image.unsqueeze(0).to(self.device).contiguous()  # strided input makes convolutions slow
        with amp_context(self.device, self.amp):  # the network in float16 (AMP), its transforms not
            if self.pre.roi_size:
                out = sliding_window_inference(batch, roi_size=tuple(self.pre.roi_size),
                                               sw_batch_size=self.pre.sw_batch_size, predictor=self.network,
                                               overlap=self.pre.overlap)
            else:
                out = self.network(batch)
        return out[0].float()  # type: ignore[index]

    def predict(self, volume: Volume) -> Prediction:
        with torch.inference_mode():
            # Preprocess on the model's device: intensity and resampling of a large volume are GPU work too.
            data = self.transforms({"image": to_metatensor(volume, channel=True, device=self.device)})
            image = data["image"]
            if self.card.task is Task.DETECTION:
                return self._detect(image if isinstance(image, MetaTensor) else MetaTensor(image))
            out = self._forward(image.as_tensor() if isinstance(image, MetaTensor) else image)
            if self.card.task is Task.CLASSIFICATION:
                return Prediction(card=self.card,
                                  classifications=classify(out, self.card, self.activation, self.threshold))
            labels = decode_segmentation(out, self.activation)
            if image.applied_operations:  # back to the input grid through the inverse transforms
                data["pred"] = MetaTensor(labels, meta=dict(image.meta),
                                          applied_operations=list(image.applied_operations))
                data["image"] = MetaTensor(image.as_tensor(), meta=dict(image.meta),
                                           applied_operations=list(image.applied_operations))
                labels = Invertd(keys="pred", transform=self.transforms, orig_keys="image",
                                 nearest_interp=True)(data)["pred"]
        labelmap = labelmap_from_output(labels, self.card, volume.shape)
        return Prediction(card=self.card, labelmap=labelmap, measurements=segment_volumes(labelmap, self.card, volume))
