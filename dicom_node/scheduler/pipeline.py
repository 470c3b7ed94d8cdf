"""One INFER job from files to result objects: imaging -> inference -> results -> spool.

Runs inside the worker process (see :mod:`dicom_node.scheduler.worker`);
it touches neither the database nor the network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from dicom_node.domain import OutputKind
from dicom_node.errors import DicomNodeError, ImagingError, JobInterrupted, ModelError
from dicom_node.imaging import SeriesVolume, load_series
from dicom_node.imaging.channels import stack_channels
from dicom_node.imaging.prefetch import Prefetch
from dicom_node.results.content import result_words
from dicom_node.results.header_check import Change, check_sources, record_changes
from dicom_node.results.identity import derive_identity
from dicom_node.results.overlay import OverlayStyle
from dicom_node.results.part10 import part10_bytes
from dicom_node.results.pdf import build_pdf
from dicom_node.results.routing import SR_MEASUREMENTS
from dicom_node.results.sc import iter_overlays
from dicom_node.results.seg import SegResult, build_seg, outline_differs, seg_outline
from dicom_node.results.sr import build_sr
from dicom_node.scheduler.forked import Forked
from dicom_node.spool import Spool
from dicom_node.spool.layout import WARM_UP_PREFIX
from inference.boxes import with_box_segments
from inference.gpu_memory import GpuAdmission, GpuAdmissionRefused, cuda_device, out_of_memory_error
from inference.registry import ModelRegistry
from inference.types import Model, Prediction, Task

logger = logging.getLogger(__name__)

#: How often a job hands the overlay images written so far over to be sent while it draws the rest (seconds).
HAND_OVER_S = 0.25

#: Runs each job's header check beside its model (a thread; several jobs at once with Ray runners).
_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="header-check")


@dataclass(frozen=True)
class InferTask:
    """What the scheduler hands to a worker: validated UIDs and spool paths only.

    Parameters
    ----------
    series_uid, paths:
        The series the results belong to (their grid, the instances they
        reference) and its instance files, relative to the spool root.
    inputs:
        For a study rule, ``(role, paths)`` of every series of the study the
        model takes, primary (``series_uid``) first; empty for a series rule.
    rule:
        The rule that queued the job (for error messages).
    channels:
        Roles of ``inputs`` that become the model's input channels, in this
        order (one multi-channel volume on the first channel's grid); empty:
        the model gets the series by role (``predict_study``).
    gpu_out_of_memory:
        What a CUDA out-of-memory error of the model does
        (``workers.gpu_out_of_memory``): ``cpu`` runs the model again on the
        CPU in this job; ``retry`` and ``fail`` end the job with
        :attr:`InferOutcome.out_of_memory` set (the scheduler then retries
        it later, or fails it).
    replaces:
        SOP Instance UIDs of the results made earlier for this series and
        model.  A result whose findings a re-run no longer finds is replaced
        by an empty one of the same UID (SEG, overlay images), never left
        showing them.
    """

    job_id: int
    series_uid: str
    model: str
    paths: tuple[str, ...]
    outputs: tuple[str, ...]
    inputs: tuple[tuple[str, tuple[str, ...]], ...] = ()
    rule: str = ""
    replaces: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    gpu_out_of_memory: str = "fail"


def study_inputs(primary_uid: str, inputs: Mapping[str, str],
                 instance_paths: Callable[[str], Iterable[str]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The :attr:`InferTask.inputs` of a study rule's job: each role's instance paths, the primary first.

    Parameters
    ----------
    primary_uid:
        The job's series (the primary role's series).
    inputs:
        ``role -> series UID`` from the job payload, in the rule's role order.
    instance_paths:
        ``series UID -> instance paths`` (relative to the spool root).
    """
    ordered = sorted(inputs.items(), key=lambda item: item[1] != primary_uid)  # stable: rule order otherwise
    return tuple((role, tuple(instance_paths(uid))) for role, uid in ordered)


@dataclass(frozen=True)
class ProducedObject:
    kind: str
    sop_uid: str
    series_uid: str
    path: str  # relative to the spool root


@dataclass
class InferOutcome:
    ok: bool
    objects: list[ProducedObject] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""
    model_version: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    out_of_memory: bool = False
    interrupted: bool = False  # the model's machine or process was lost (Ray): queued again, bounded
    prefetched: int = 0  # instances whose dataset (and slice) were read while the series arrived


def run_infer(task: InferTask, registry: ModelRegistry, spool: Spool, outputs: Any,
              prefetch: Prefetch | None = None, parallel_encode: bool = False,
              ready: Callable[[list[ProducedObject]], None] | None = None) -> InferOutcome:
    """Run one model on one series (or the series of a study rule) and write its result objects to the spool.

    For a study rule (``task.inputs``), every input is loaded and the model's
    ``predict_study`` gets them by role; the result is on the primary
    series' grid and the objects reference its instances.

    Parameters
    ----------
    outputs:
        The ``outputs:`` settings (``uid_root``, ``seg``/``sr`` series number and description).
    prefetch:
        The worker's instances read and decoded while their series arrived;
        the job takes its series' from there and drops the rest of them.
    parallel_encode:
        Encode part of the result objects in a forked child process beside
        the rest (worker processes on machines with two or more CPUs; see
        :func:`_encode`).
    ready:
        Called with the SEG and SR once they are written, while the job's
        overlay series or PDF are still being made (only then): the node
        sends them at once instead of after the last overlay image.  The
        returned outcome still lists every object.

    Returns
    -------
    InferOutcome
        ``ok=False`` with ``error`` for anything that makes the job fail
        permanently (not a volume, model error); never raises for those.
    """
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    notes: list[str] = []
    prefetched = 0
    try:
        if task.inputs:
            loaded = _load_inputs(task, spool, prefetch)
            sv = loaded[task.channels[0] if task.channels else task.inputs[0][0]]
            notes = [f"{role}: {note}" for role, one in loaded.items() for note in one.notes]
        else:
            sv = load_series(spool.absolute_all(task.paths), prefetch)
            notes = list(sv.notes)
        prefetched = _release(prefetch, task, spool)  # a copied-out buffer must not outlive the load
        if not {OutputKind.SC, OutputKind.PDF} & set(task.outputs):  # overlay and PDF key images redraw them
            for ds in sv.sources:
                for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
                    if keyword in ds:
                        delattr(ds, keyword)
        times["load"] = time.perf_counter() - t0
        # The header check needs the sources only: it runs beside the model (which waits on a GPU, or on
        # numpy code that lets go of the GIL) instead of after it.
        checking = _pool.submit(check_sources, list(sv.sources))
        model = registry.get(task.model)
        t1 = time.perf_counter()

        def predict(model: Model) -> Prediction:
            if task.channels:
                return _predict_channels(task, model, loaded, notes)
            if task.inputs:
                return _predict_study(task, model, loaded)
            _require_modality(task.model, model.card, sv.volume)
            return model.predict(sv.volume)

        voxels = (sum(one.volume.array.size for one in loaded.values()) if task.inputs
                  else sv.volume.array.size)
        try:
            prediction = _admitted(task.model, model, registry, voxels, lambda: predict(model))
        except Exception as exc:
            if not _out_of_memory(exc) or task.gpu_out_of_memory != "cpu":
                raise
            _release_gpu_memory()
            logger.warning("Job %d: model %s %s; running it on the CPU (workers.gpu_out_of_memory: cpu)",
                           task.job_id, task.model, "was not admitted on its GPU" if isinstance(
                               exc, GpuAdmissionRefused) else "ran out of GPU memory")
            notes.append(f"{_oom_words(exc)[:160]}: ran on the CPU instead")
            prediction = predict(registry.get(task.model, device="cpu"))
        times["model"] = time.perf_counter() - t1
        if (prediction.card.task is Task.DETECTION and OutputKind.SEG in task.outputs
                and getattr(registry.specs.get(task.model), "box_seg", False)):
            prediction = with_box_segments(prediction, sv.volume)  # the SEG of the boxes' extents
        if prediction.card.runtime:
            notes.append(f"model ran with {prediction.card.runtime}")
        t2 = time.perf_counter()
        sources, changes = checking.result()  # copied attributes the standard forbids
        notes.extend(f"results: {change}" for change in changes)
        objects = _encode(task, _in_source_order(prediction, sv.frame_of_source), sources, spool, outputs,
                          changes, parallel=parallel_encode, ready=ready)
        times["encode"] = time.perf_counter() - t2
    except JobInterrupted as exc:  # the model's machine or process was lost: not the series' fault
        _release(prefetch, task, spool)
        return InferOutcome(ok=False, error=str(exc), seconds=times, interrupted=True)
    except DicomNodeError as exc:
        _release(prefetch, task, spool)
        return InferOutcome(ok=False, error=str(exc), seconds=times)
    except Exception as exc:  # a model's own bug: fail this job, keep the worker
        _release(prefetch, task, spool)
        if _out_of_memory(exc):
            _release_gpu_memory()
            logger.error("Job %d: model %s %s", task.job_id, task.model, "was not admitted on its GPU" if isinstance(
                exc, GpuAdmissionRefused) else "ran out of GPU memory")
            return InferOutcome(ok=False, seconds=times, out_of_memory=True, error=(
                f"model {task.model}: {_oom_words(exc)[:240]}; lower sw_batch_size / roi_size, free the GPU, "
                "use device: cpu or workers.gpu_out_of_memory: cpu"))
        logger.exception("Job %d: model %s failed", task.job_id, task.model)
        return InferOutcome(ok=False, error=f"model {task.model} raised {type(exc).__name__}: {exc}"[:500],
                            seconds=times)
    return InferOutcome(ok=True, objects=objects, findings=list(prediction.findings), notes=notes,
                        model_version=prediction.card.version, seconds=times, prefetched=prefetched)


def _release(prefetch: Prefetch | None, task: InferTask, spool: Spool) -> int:
    """Drop what the worker read ahead of the job's series; returns how many of the job's instances it held."""
    if prefetch is None:
        return 0
    return prefetch.taken(spool.absolute_all(p for _, paths in task.inputs or (("", task.paths),) for p in paths))


def _load_inputs(task: InferTask, spool: Spool, prefetch: Prefetch | None = None) -> dict[str, SeriesVolume]:
    """Load every series of a study rule's job, by role (primary first).

    Raises
    ------
    ModelError
        When the primary series is not the job's series or an input has no
        instances left in the spool.
    ImagingError
        When an input is not one regular volume (the message names its role).
    """
    primary_role, primary_paths = task.inputs[0]
    if set(primary_paths) != set(task.paths):
        raise ModelError(f"study rule {task.rule!r}: the job's series {task.series_uid} is not among its inputs "
                         f"({', '.join(role for role, _ in task.inputs)})")
    loaded: dict[str, SeriesVolume] = {}
    for role, paths in task.inputs:
        if not paths:
            raise ModelError(f"study rule {task.rule!r}: input {role!r} has no instances in the spool "
                             "(removed by retention?); re-send the series")
        try:
            loaded[role] = load_series(spool.absolute_all(paths), prefetch)
        except ImagingError as exc:
            raise ImagingError(f"input {role!r}: {exc}") from exc
    return loaded


def _predict_study(task: InferTask, model: Model, loaded: dict[str, SeriesVolume]) -> Prediction:
    """Run ``model`` on every input of a study rule; a model that takes one series only gets one."""
    for role, sv in loaded.items():
        try:
            _require_modality(task.model, model.card, sv.volume)
        except ModelError as exc:
            raise ModelError(f"input {role!r}: {exc}") from exc
    primary = task.inputs[0][0]
    if len(loaded) == 1 and not model.takes_several_inputs:
        return model.predict(loaded[primary].volume)
    if not model.takes_several_inputs:
        raise ModelError(f"model {task.model} takes one series; rule {task.rule!r} gives it {len(loaded)} "
                         f"({', '.join(loaded)}): use a type: python model for this study rule")
    return model.predict_study({role: sv.volume for role, sv in loaded.items()}, primary)


def _predict_channels(task: InferTask, model: Model, loaded: dict[str, SeriesVolume], notes: list[str]) -> Prediction:
    """Run ``model`` on the study's series stacked as its input channels (``task.channels`` order)."""
    missing = [c for c in task.channels if c not in loaded]
    if missing:
        raise ModelError(f"study rule {task.rule!r}: channels {missing} are not among its series "
                         f"({', '.join(loaded)})")
    for role in task.channels:
        try:
            _require_modality(task.model, model.card, loaded[role].volume)
        except ModelError as exc:
            raise ModelError(f"channel {role!r}: {exc}") from exc
    volume, resampled = stack_channels([(role, loaded[role]) for role in task.channels])
    notes.extend(resampled)
    return model.predict(volume)


def _require_modality(name: str, card: Any, volume: Any) -> None:
    """Refuse a series whose modality is not the model card's input modality (when the card names one)."""
    expected = (card.modality or "").upper()
    actual = (volume.modality or "").upper()
    if expected and actual != expected:
        raise ModelError(f"model {name} takes {expected} input; this series is "
                         f"{actual or 'without a Modality'}: not run")


def _out_of_memory(exc: BaseException) -> bool:
    """``torch.cuda.OutOfMemoryError`` (raised here, in a model's own environment, or inside a MONAI transform), or
    a refused admission."""
    return out_of_memory_error(exc) is not None or isinstance(exc, GpuAdmissionRefused)


def _oom_words(exc: BaseException) -> str:
    """The first line of an out-of-memory error or a refused admission, as the job's reason says it."""
    if not isinstance(exc, GpuAdmissionRefused):
        exc = out_of_memory_error(exc) or exc
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return first if isinstance(exc, GpuAdmissionRefused) else f"CUDA out of memory ({first[:200]})"


#: The working GPU memory measured per model in this process, and the check before each GPU run.
_admission = GpuAdmission()


def _admitted(name: str, model: Model, registry: ModelRegistry, voxels: int,
              run: Callable[[], Prediction]) -> Prediction:
    """``run()`` once ``model``'s measured need fits on its GPU (see :mod:`inference.gpu_memory`); measured."""
    device = cuda_device(model)  # first: a model on the CPU never needs torch imported for this
    if device is not None and not _admission.present():
        device = None
    if device is not None:
        _admission.admit(name, device, voxels, lambda: registry.unload_other(name, device))
    with _admission.measured(name, device, voxels):
        return run()


def _release_gpu_memory() -> None:
    """Give cached CUDA memory back after an out-of-memory error, so the next job starts clean."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _in_source_order(prediction: Prediction, frame_of_source: tuple[tuple[int, int], ...]) -> Prediction:
    """Put a multi-frame source's label map back into the object's frame order.

    The volume's slices are sorted by position; an Enhanced CT/MR object may
    store its frames in any order, and its SEG must reference each frame.
    """
    lm = prediction.labelmap
    if lm is None or not frame_of_source or frame_of_source[0][1] == 0:
        return prediction
    reordered = np.zeros_like(lm)
    for z, (_, frame) in enumerate(frame_of_source):
        reordered[frame - 1] = lm[z]
    return replace(prediction, labelmap=reordered)


def _encode(task: InferTask, prediction: Prediction, sources: list[Dataset], spool: Spool,
            outputs: Any, changes: Sequence[Change] = (), parallel: bool = False,
            ready: Callable[[list[ProducedObject]], None] | None = None) -> list[ProducedObject]:
    """Build and write the job's result objects; returns them in sending order (SEG, SR, overlays, PDF).

    ``parallel``: part of the work runs in a forked child process beside the
    rest (:mod:`dicom_node.scheduler.forked`): the overlay series and the PDF
    when asked for, else the SR (from the SEG's outline,
    :func:`~dicom_node.results.seg.seg_outline`) while the SEG is built and
    written.  The objects are the same.

    ``ready``: when the job also makes an overlay series or a PDF, it is
    called with the SEG and SR as soon as both are written, before those are
    finished (they take longer: a drawn RGB image per slice), so that they
    can be sent meanwhile.
    """
    card = prediction.card
    result = result_words(prediction)

    def identity(kind: str, series: OutputKind | None = None) -> Any:
        conf = getattr(outputs, (series or OutputKind(kind)).value)
        return derive_identity(outputs.uid_root, task.series_uid, task.model, card.version, kind,
                               conf.series_number, conf.description_for(task.model, result))

    def write(kind: str, ds: Dataset, index: int | None = None, unsynced: list[int] | None = None) -> ProducedObject:
        """Write one object to the spool, synced; with ``unsynced`` its descriptor goes there to be synced later."""
        kind = str(kind)  # an OutputKind is its value
        path = (spool.result_path(task.series_uid, task.model, kind) if index is None
                else spool.result_part_path(task.series_uid, task.model, kind, index))
        record_changes(ds, changes)
        data = part10_bytes(ds)  # save_as's bytes, in a quarter of its time
        if unsynced is None:
            spool.write_atomic(path, data)
        else:
            unsynced.append(spool.write_unsynced(path, data))
        return ProducedObject(kind, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), spool.relative(path))

    present = bool(prediction.present_segments())  # one pass over the label map for every output
    replaces = set(task.replaces)
    style = OverlayStyle(banner=outputs.banner, fill_opacity=outputs.fill_opacity)

    def side_objects(report: Callable[[list[ProducedObject]], None] | None = None) -> list[ProducedObject]:
        """The overlay series and the PDF: they need neither the SEG nor the SR.

        ``report`` gets the overlay images written so far (synced) every
        :data:`HAND_OVER_S`, to be sent while the rest are drawn; the list
        returned holds every object all the same.
        """
        produced: list[ProducedObject] = []
        if OutputKind.SC in task.outputs and (present or replaces):
            # Each image is written at once and synced with the others of its batch (one directory sync).
            unsynced: list[int] = []
            batch: list[ProducedObject] = []
            since = time.monotonic()
            try:
                for image in iter_overlays(prediction, sources, identity(OutputKind.SC), style=style,
                                           replaces=replaces):
                    batch.append(write(OutputKind.SC, image, int(image.InstanceNumber) - 1, unsynced))
                    if report is not None and time.monotonic() - since >= HAND_OVER_S:
                        spool.settle(unsynced, {spool.absolute(batch[0].path).parent})
                        report(batch)
                        produced.extend(batch)
                        batch, since = [], time.monotonic()
                if batch:
                    spool.settle(unsynced, {spool.absolute(batch[0].path).parent})
                    produced.extend(batch)
            finally:
                for fd in unsynced:  # an error half-way: the job fails, its files are rewritten by a re-run
                    os.close(fd)
        if OutputKind.PDF in task.outputs:
            produced.append(write(OutputKind.PDF, build_pdf(prediction, sources, identity(OutputKind.PDF),
                                                            style=style, paper=outputs.paper)))
        return produced

    wants_side = (OutputKind.SC in task.outputs and (present or replaces)) or OutputKind.PDF in task.outputs
    with contextlib.ExitStack() as stack:
        side = (stack.enter_context(Forked(side_objects, "the overlay series and the PDF", reports=ready is not None))
                if parallel and wants_side else None)
        seg_ds: Dataset | None = None
        segment_numbers: dict[int, int] | None = None
        seg_objects: list[ProducedObject] = []
        sr_building: Forked[list[ProducedObject]] | None = None

        def sr_objects_of(seg_ds: Dataset | None, segment_numbers: dict[int, int] | None) -> list[ProducedObject]:
            made = []
            for kind, form in ((OutputKind.SR.value, "viewer"), (SR_MEASUREMENTS, "measurements")):
                if kind in task.outputs:  # each form its own object (own UIDs): a destination gets one of them
                    made.append(write(kind, build_sr(prediction, sources, identity(kind, OutputKind.SR),
                                                     seg=seg_ds, segment_numbers=segment_numbers, form=form)))
            return made

        if OutputKind.SEG in task.outputs and (card.task is Task.SEGMENTATION or prediction.labelmap is not None):
            seg_identity = identity(OutputKind.SEG)
            if present:
                shape = {"segmentation_type": outputs.seg_type.upper(),
                         "omit_empty_segments": outputs.empty_segments == "drop"}
                outline: SegResult | None = None
                if parallel and side is None and (OutputKind.SR in task.outputs or SR_MEASUREMENTS in task.outputs):
                    # The SR needs of the SEG only its identity and its segments' numbers and tracking UIDs: it is
                    # built from that outline and written in a child while this process builds and writes the
                    # SEG (the larger part), and checked against the SEG once it is built.
                    outline = seg_outline(prediction, sources, seg_identity, **shape)
                    planned = outline
                    sr_building = stack.enter_context(
                        Forked(lambda: sr_objects_of(planned.dataset, dict(planned.segment_numbers)), "the SR"))
                seg = build_seg(prediction, sources, seg_identity, **shape)
                seg_ds, segment_numbers = seg.dataset, dict(seg.segment_numbers)
                differs = outline_differs(outline, seg) if outline is not None else None
                if differs is not None and sr_building is not None:
                    sr_building.result()  # the SR it wrote is written again below, from the SEG itself
                    sr_building = None
                    logger.error("Job %d: the SR built from the SEG's outline would not match the SEG (%s); "
                                 "it is built again from the SEG", task.job_id, differs)
                seg_objects.append(write(OutputKind.SEG, seg_ds))
            elif seg_identity.sop_instance_uid in replaces:
                # An earlier run's SEG showed segments this run does not find: replace it with an empty one.
                cleared = build_seg(prediction, sources, seg_identity, segmentation_type=outputs.seg_type.upper(),
                                    clearing=True)
                seg_objects.append(write(OutputKind.SEG, cleared.dataset))
                logger.warning("Job %d: no segment present any more; an empty SEG replaces the earlier one",
                               task.job_id)
            else:
                logger.info("Job %d: no segment present; no SEG produced", task.job_id)
        sr_objects = sr_building.result() if sr_building is not None else sr_objects_of(seg_ds, segment_numbers)
        if ready is not None and wants_side and (seg_objects or sr_objects):
            ready([*seg_objects, *sr_objects])  # on their way while the overlay series / PDF are made
        side_produced = side.result(progress=ready) if side is not None else side_objects(ready)
    return [*seg_objects, *sr_objects, *side_produced]


def warm_up(outputs: Any, scratch: Path | None = None) -> float:
    """Run a job's non-model path once on a tiny synthetic CT, off the spool; returns the seconds it took.

    A worker's first job otherwise pays the one-time costs of that path in
    its own latency (measured on a 200 x 512x512 CT on 2 cores: load 0.60 s
    instead of 0.38 s, encode 1.35 s instead of 0.94 s): pydicom's and
    highdicom's lazily built tables, the IOD attribute map the header check
    reads, first imports inside highdicom.  The worker calls this once at
    start, after it has said it is ready: a job that arrives meanwhile waits
    at most this long, as it would have in its own run.  Three 16x16 slices
    of a made-up patient in a temporary folder go through the series load,
    the header check and the SEG + SR encoders and writers (the built-in
    ``lungs-ct`` model's card, two small segments); nothing is sent, no
    model runs.

    ``scratch``: where that folder is made (``warm-up-*``; the worker passes
    its spool's ``tmp/``, so that a folder left by a worker killed during
    its warm-up is removed by :meth:`Spool.clean_tmp` at the next start);
    default the system's temporary directory.

    Raises
    ------
    Exception
        Whatever that path raises on the synthetic series (a defect: the
        worker logs it and serves on).
    """
    import tempfile

    from dicom_node.imaging.synthetic import write_ct_series
    from inference.models.lungs_ct_card import LUNGS_CT_CARD

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=WARM_UP_PREFIX, dir=scratch) as tmp_name:
        spool = Spool(Path(tmp_name))
        hu = np.full((3, 16, 16), -1000, np.int16)
        hu[:, 2:14, 2:14] = 40
        files = write_ct_series(hu, (2.0, 1.0, 1.0), spool.incoming / "warm-up", patient_id="WARMUP",
                                patient_name="Warm^Up", series_description="dicom-node warm-up")
        sv = load_series(files)
        labelmap = np.zeros(hu.shape, np.uint8)
        labelmap[1, 3:7, 3:7] = 1
        labelmap[1:3, 9:13, 9:13] = 2
        prediction = Prediction(card=LUNGS_CT_CARD, labelmap=labelmap)
        sources, changes = check_sources(list(sv.sources))
        task = InferTask(0, str(sources[0].SeriesInstanceUID), "warm-up", tuple(spool.relative(f) for f in files),
                         (OutputKind.SEG.value, OutputKind.SR.value))
        _encode(task, prediction, sources, spool, outputs, changes)
    return time.perf_counter() - t0


__all__ = ["InferOutcome", "InferTask", "ProducedObject", "run_infer", "study_inputs", "warm_up"]
