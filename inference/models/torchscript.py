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

from inference.models.python_callable import segment_volumes
from inference.runner import (
    classify,
    decode_segmentation,
    inference_context,
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
        Classification: probability at which a class is positive.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    """

    def __init__(self, card: ModelCard, path: Path, preprocessing: Any, device: str = "auto", amp: bool = True,
                 activation: str = "softmax", threshold: float = 0.5) -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model {card.name}: TorchScript file {path} not found")
        self.card = card
        self.device = resolve_device(device)
        self.amp = amp
        self.activation = activation
        self.threshold = threshold
        self.pre = preprocessing
        self.transforms = build_preprocessing(preprocessing)
        self.network = torch.jit.load(str(path), map_location=self.device).eval()
        logger.info("Model %s: TorchScript %s on %s (AMP %s)", card.name, path.name, self.device,
                    "on" if amp and self.device.type == "cuda" else "off")

    def _forward(self, image: torch.Tensor) -> torch.Tensor:
        batch = image.unsqueeze(0).to(self.device).contiguous()  # strided input makes convolutions slow
        if self.pre.roi_size:
            out = sliding_window_inference(batch, roi_size=tuple(self.pre.roi_size),
                                           sw_batch_size=self.pre.sw_batch_size, predictor=self.network,
                                           overlap=self.pre.overlap)
        else:
            out = self.network(batch)
        return out[0].float()  # type: ignore[index]

    def predict(self, volume: Volume) -> Prediction:
        with inference_context(self.device, self.amp):
            # Preprocess on the model's device: intensity and resampling of a large volume are GPU work too.
            data = self.transforms({"image": to_metatensor(volume, channel=True).to(self.device)})
            image = data["image"]
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
