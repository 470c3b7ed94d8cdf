"""``models:``: the model types (builtin, python, torchscript, monai_bundle, nnunet, chain, merge) and their labels."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Discriminator, Field, Tag, field_validator, model_validator

from dicom_node.settings.base import (
    CALLABLE_RE,
    FROZEN,
    Device,
    Flag,
    Float,
    Int,
    Name,
    Seconds,
    no_duplicates,
    text_or_int,
    type_of,
)


def _check_environment(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("environment is shared, managed or the path of a Python interpreter")
    text = value.strip()
    if text in ("shared", "managed"):
        return text
    if not text.startswith("/"):
        raise ValueError(f"environment must be shared, managed or the absolute path of a Python interpreter "
                         f"(got {value!r})")
    return text


_REQUIREMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?\s*((==|>=|<=|~=|!=|<|>)\s*[A-Za-z0-9.*+!_-]+"
                             r"(\s*,\s*(==|>=|<=|~=|!=|<|>)\s*[A-Za-z0-9.*+!_-]+)*)?")


def _check_requirement(value: Any) -> str:
    if not isinstance(value, str) or not _REQUIREMENT_RE.fullmatch(value.strip()):
        raise ValueError(f"a requirement is a package with an optional version, e.g. einops==0.7.0 (got {value!r}; "
                         "URLs, paths and pip options are not accepted)")
    return value.strip()


class _EnvironmentFields(BaseModel):
    """Where a model's code runs: the node's own Python, a managed environment, or a given interpreter.

    ``environment: shared`` (default) runs it in the node's worker;
    ``managed`` in a virtual environment under the state directory built by
    ``dicom-node models install NAME`` from the bundle's metadata (its MONAI
    version and optional packages) plus ``requirements``; a path runs it
    with that Python interpreter (which must have what the model imports).
    ``channels`` names the study rule's series (roles) that become the
    model's input channels, in order.
    """

    model_config = FROZEN

    environment: Annotated[str, BeforeValidator(_check_environment)] = "shared"
    requirements: tuple[Annotated[str, BeforeValidator(_check_requirement)], ...] = ()
    channels: tuple[Name, ...] = ()

    @model_validator(mode="after")
    def _environment_fields(self) -> _EnvironmentFields:
        if self.requirements and self.environment != "managed":
            raise ValueError("requirements apply to environment: managed only")
        no_duplicates("channel", list(self.channels))
        return self


#: Names accepted by ``models.<name>: {type: builtin, name: ...}``.
BUILTIN_MODEL_NAMES: tuple[str, ...] = ("lungs-ct",)

class CodeSettings(BaseModel):
    """A coded concept, e.g. SNOMED CT ``{value: "10200004", meaning: Liver}``."""

    model_config = FROZEN

    value: Annotated[str, BeforeValidator(text_or_int), Field(min_length=1, max_length=64)]
    meaning: Annotated[str, Field(min_length=1, max_length=64)]
    scheme: Annotated[str, Field(min_length=1, max_length=16)] = "SCT"


_Channel = Annotated[Int, Field(ge=0, le=255)]


class LabelSettings(BaseModel):
    """One segment of a python segmentation model: label value, name, SNOMED CT codes, colour."""

    model_config = FROZEN

    value: Annotated[Int, Field(ge=1, le=65535)]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    snomed: CodeSettings
    category: CodeSettings = CodeSettings(value="123037004", meaning="Anatomical Structure")
    color: tuple[_Channel, _Channel, _Channel] = (255, 0, 0)
    laterality: Literal["left", "right"] | None = None


def _check_modality(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Z]{0,16}", value.strip().upper()):
        raise ValueError(f"modality must be a DICOM Modality such as CT or MR, or empty for any (got {value!r})")
    return value.strip().upper()


#: Input modality a model accepts ("" = any); the job fails on any other.
Modality = Annotated[str, BeforeValidator(_check_modality)]


class BuiltinModel(BaseModel):
    """A model shipped with the node (``type: builtin``)."""

    model_config = FROZEN

    type: Literal["builtin"]
    name: str
    device: Device = "auto"
    timeout_s: Seconds | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in BUILTIN_MODEL_NAMES:
            raise ValueError(f"unknown builtin model {value!r} (available: {', '.join(BUILTIN_MODEL_NAMES)})")
        return value


class PythonModel(_EnvironmentFields):
    """A model implemented by a Python callable (``type: python``).

    ``callable`` is ``"package.module:function"``; ``path`` is an optional
    directory prepended to ``sys.path`` before importing it.  Segmentation models
    declare ``labels``; classification models declare ``classes`` and ``threshold``.
    """

    model_config = FROZEN

    type: Literal["python"]
    callable: str
    path: Path | None = None
    task: Literal["segmentation", "classification", "detection"] = "segmentation"
    max_detections: Annotated[Int, Field(ge=1, le=1000)] = 100
    box_seg: Flag = False
    version: Annotated[str, BeforeValidator(text_or_int), Field(min_length=1, max_length=64)] = "1.0"
    labels: tuple[LabelSettings, ...] = ()
    classes: tuple[Annotated[str, Field(min_length=1, max_length=64)], ...] = ()
    threshold: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.5
    device: Device = "auto"
    timeout_s: Seconds | None = None
    modality: Modality = ""
    intended_use: Annotated[str, Field(max_length=1024)] = ""

    @field_validator("callable")
    @classmethod
    def _callable(cls, value: str) -> str:
        if not CALLABLE_RE.fullmatch(value.strip()):
            raise ValueError(f"callable must look like 'package.module:function' (got {value!r})")
        return value.strip()

    @model_validator(mode="after")
    def _outputs_declared(self) -> PythonModel:
        if self.task == "segmentation" and not self.labels:
            raise ValueError("a segmentation model needs at least one entry in labels")
        if self.task in ("classification", "detection") and not self.classes:
            raise ValueError(f"a {self.task} model needs at least one entry in classes")
        if self.box_seg and self.task != "detection":
            raise ValueError("box_seg (a SEG of the boxes' extents) is for task: detection")
        no_duplicates("label value", [label.value for label in self.labels])
        no_duplicates("label name", [label.name for label in self.labels])
        no_duplicates("class", list(self.classes))
        return self


_Positive = Annotated[Float, Field(gt=0)]
_Size = Annotated[Int, Field(ge=1, le=4096)]


def _check_axcodes(value: Any) -> Any:
    if value is None:
        return None
    text = str(value).strip().upper()
    axes = {"L": "x", "R": "x", "P": "y", "A": "y", "I": "z", "S": "z"}
    if len(text) != 3 or any(c not in axes for c in text) or len({axes[c] for c in text}) != 3:
        raise ValueError(f"orientation must be three letters, one of L/R, A/P and S/I each, e.g. RAS (got {value!r})")
    return text


class PreprocessingSettings(BaseModel):
    """Declared preprocessing of a ``torchscript`` model (MONAI transforms, then the network).

    ``spacing`` is in mm along the model's array axes after ``orientation``
    (MONAI's ``pixdim``); ``window`` maps ``[low, high]`` (modality units, HU
    for CT) linearly to ``[0, 1]`` and clips; ``normalize: zscore`` scales to
    zero mean and unit variance.  ``roi_size`` enables sliding-window inference
    with ``overlap`` and ``sw_batch_size``; ``spatial_size`` resizes the whole
    volume (classifiers that take a fixed input size).
    """

    model_config = FROZEN

    orientation: Annotated[str | None, BeforeValidator(_check_axcodes)] = "RAS"
    spacing: tuple[_Positive, _Positive, _Positive] | None = None
    window: tuple[Float, Float] | None = None
    normalize: Literal["none", "zscore"] = "none"
    roi_size: tuple[_Size, _Size, _Size] | None = None
    spatial_size: tuple[_Size, _Size, _Size] | None = None
    overlap: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.25
    sw_batch_size: Annotated[Int, Field(ge=1, le=256)] = 4

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessingSettings:
        if self.window is not None and self.window[0] >= self.window[1]:
            raise ValueError(f"window must be [low, high] with low < high (got {list(self.window)})")
        if self.roi_size is not None and self.spatial_size is not None:
            raise ValueError("use roi_size (sliding window) or spatial_size (resize), not both")
        return self


class _NetworkModel(_EnvironmentFields):
    """Fields shared by models that run a neural network (``torchscript``, ``monai_bundle``)."""

    model_config = FROZEN

    task: Literal["segmentation", "classification", "detection"] = "segmentation"
    labels: tuple[LabelSettings, ...] = ()
    classes: tuple[Annotated[str, Field(min_length=1, max_length=64)], ...] = ()
    threshold: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.5
    intended_use: Annotated[str, Field(max_length=1024)] = ""
    modality: Modality = ""
    device: Device = "auto"
    amp: Flag = True
    timeout_s: Seconds | None = None
    activation: Literal["softmax", "sigmoid", "none"] = "softmax"
    max_detections: Annotated[Int, Field(ge=1, le=1000)] = 100
    box_seg: Flag = False

    @model_validator(mode="after")
    def _unique_outputs(self) -> _NetworkModel:
        no_duplicates("label value", [label.value for label in self.labels])
        no_duplicates("label name", [label.name for label in self.labels])
        no_duplicates("class", list(self.classes))
        return self


class TorchscriptModel(_NetworkModel):
    """A TorchScript network file plus declared preprocessing (``type: torchscript``).

    Segmentation output channels are classes (channel 0 background, argmax),
    or with ``activation: sigmoid`` (or one channel) each channel ``c`` is
    label ``c + 1`` where its probability is at least 0.5; classification
    output is one score per class in ``classes`` order, turned into
    probabilities by ``activation`` (``none``: already probabilities).
    A detection network returns boxes (a dict ``boxes``/``scores``/``labels``,
    or a tuple) in ``box_mode``, in voxel coordinates of the preprocessed
    image it saw; the node maps them to patient coordinates.
    """

    type: Literal["torchscript"]
    path: Path
    version: Annotated[str, BeforeValidator(text_or_int), Field(min_length=1, max_length=64)] = "1.0"
    preprocessing: PreprocessingSettings = PreprocessingSettings()
    box_mode: Literal["xyzxyz", "xxyyzz", "cccwhd"] = "xyzxyz"

    @model_validator(mode="after")
    def _outputs_declared(self) -> TorchscriptModel:
        if self.box_seg and self.task != "detection":
            raise ValueError("box_seg (a SEG of the boxes' extents) is for task: detection")
        if self.task == "detection":
            if not self.classes:
                raise ValueError("a detection model needs at least one entry in classes (what its boxes are)")
            if self.preprocessing.roi_size:
                raise ValueError("preprocessing.roi_size: a detection network sees the whole preprocessed image "
                                 "(boxes of sliding windows are not merged); leave roi_size out, or resize")
        if self.task == "segmentation" and not self.labels:
            raise ValueError("a segmentation model needs at least one entry in labels")
        if self.task == "classification" and not self.classes:
            raise ValueError("a classification model needs at least one entry in classes")
        return self


class MonaiBundleModel(_NetworkModel):
    """A MONAI bundle directory (``type: monai_bundle``).

    The bundle's ``network_def``, ``preprocessing``, ``inferer`` and
    ``postprocessing`` are used; the node supplies the image in place of the
    bundle's ``LoadImaged``.  ``version``, ``intended_use``, ``modality`` and
    the labels / classes default to the bundle's ``metadata.json``.  For
    segmentation the bundle's postprocessing decides the labels;
    ``activation`` applies to classification scores only.
    ``transforms_on``: where the bundle's preprocessing and postprocessing
    run: ``device`` (the model's: on a GPU the volume is uploaded once and
    resampled, inverted and counted there; a bundle whose transforms fail on
    the GPU is moved to the CPU by itself, with a warning) or ``cpu``.
    """

    type: Literal["monai_bundle"]
    path: Path
    config_file: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    version: Annotated[str, BeforeValidator(text_or_int), Field(min_length=1, max_length=64)] | None = None
    overlap: Annotated[Float, Field(ge=0.0, lt=1.0)] | None = None
    sw_batch_size: Annotated[Int, Field(ge=1, le=256)] | None = None
    transforms_on: Literal["device", "cpu"] = "device"


class ChainModel(BaseModel):
    """A segmentation model whose regions are each handed to a second model (``type: chain``).

    ``first`` and ``then`` name other (non-chain) models; ``first`` must be a
    segmentation model.  ``regions`` are label values of ``first`` (empty: all);
    each region's bounding box grown by ``margin_mm`` is cropped and given to
    ``then``.
    """

    model_config = FROZEN

    type: Literal["chain"]
    first: Name
    then: Name
    regions: tuple[Annotated[Int, Field(ge=1, le=65535)], ...] = ()
    margin_mm: Annotated[Float, Field(ge=0.0, le=500.0)] = 10.0
    version: Annotated[str, BeforeValidator(text_or_int), Field(min_length=1, max_length=64)] = "1.0"
    intended_use: Annotated[str, Field(max_length=1024)] = ""
    timeout_s: Seconds | None = None

    @model_validator(mode="after")
    def _distinct(self) -> ChainModel:
        if self.first == self.then:
            raise ValueError(f"first and then must be different models (both {self.first!r})")
        no_duplicates("region", list(self.regions))
        return self




def _check_fold(value: Any) -> Any:
    if isinstance(value, str) and value.strip() == "all":
        return "all"
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip().isdigit():
        raise ValueError(f"a fold is a number (the fold_N folder) or 'all' (got {value!r})")
    return int(value)


class NnunetModel(_EnvironmentFields):
    """A trained nnU-Net v2 model folder (``type: nnunet``), run by nnunetv2's own predictor.

    ``path`` is the folder nnU-Net's training writes,
    ``<Trainer>__<Plans>__<configuration>/`` with ``dataset.json``, ``plans.json``
    and ``fold_N/<checkpoint>``.  ``folds`` (default: every fold that has the
    checkpoint) are ensembled; ``mirroring`` is nnU-Net's test-time mirroring;
    ``tile_step`` its sliding-window step (fraction of the patch).  Labels
    come from ``dataset.json`` and are coded from the node's anatomy table;
    ``labels`` here override them by value (and are required for
    region-based models).  nnU-Net does not reorient: the volume goes in as
    the DICOM series stores it unless ``orientation`` names the axis codes the
    model was trained in (e.g. ``RAS`` for models trained on reoriented NIfTI).
    """

    type: Literal["nnunet"]
    path: Path
    folds: tuple[Annotated[int | str, BeforeValidator(_check_fold)], ...] | None = None
    checkpoint: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._-]+$")] = \
        "checkpoint_final.pth"
    mirroring: Flag = True
    tile_step: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.5
    orientation: Annotated[str | None, BeforeValidator(_check_axcodes)] = None
    labels: tuple[LabelSettings, ...] = ()
    version: Annotated[str, BeforeValidator(text_or_int), Field(min_length=1, max_length=64)] | None = None
    intended_use: Annotated[str, Field(max_length=1024)] = ""
    modality: Modality = ""
    device: Device = "auto"
    timeout_s: Seconds | None = None
    task: Literal["segmentation"] = "segmentation"

    @model_validator(mode="after")
    def _unique(self) -> NnunetModel:
        no_duplicates("fold", [str(f) for f in self.folds or ()])
        no_duplicates("label value", [label.value for label in self.labels])
        no_duplicates("label name", [label.name for label in self.labels])
        if self.folds is not None and not self.folds:
            raise ValueError("folds is a list of fold numbers (or 'all'); leave it out to use every trained fold")
        return self


class MergeModel(BaseModel):
    """Several segmentation models run on the same series, their label maps merged into one (``type: merge``).

    A TotalSegmentator-class task (several nnU-Net models, each a part of the
    body) gives one SEG with one label list: the parts' labels in the order
    of ``models``, renumbered 1..n.  Where two parts label the same voxel,
    ``overlap: first`` keeps the earlier model's label, ``last`` the later one.
    """

    model_config = FROZEN

    type: Literal["merge"]
    models: Annotated[tuple[Name, ...], Field(min_length=2, max_length=32)]
    overlap: Literal["first", "last"] = "first"
    channels: tuple[Name, ...] = ()
    version: Annotated[str, BeforeValidator(text_or_int), Field(min_length=1, max_length=64)] = "1.0"
    intended_use: Annotated[str, Field(max_length=1024)] = ""
    timeout_s: Seconds | None = None
    task: Literal["segmentation"] = "segmentation"

    @model_validator(mode="after")
    def _distinct(self) -> MergeModel:
        no_duplicates("model", list(self.models))
        no_duplicates("channel", list(self.channels))
        return self


ModelSpec = Annotated[
    Annotated[BuiltinModel, Tag("builtin")] | Annotated[PythonModel, Tag("python")] | Annotated[MonaiBundleModel, Tag("monai_bundle")] | Annotated[TorchscriptModel, Tag("torchscript")] | Annotated[ChainModel, Tag("chain")] | Annotated[NnunetModel, Tag("nnunet")] | Annotated[MergeModel, Tag("merge")],
    Discriminator(type_of(None)),
]
