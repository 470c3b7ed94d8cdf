"""A job's SEG and SR go out while its overlay series is still being made.

With an overlay series (or a PDF) among a job's outputs, the worker tells the
node as soon as the SEG and SR are written; the node queues their SEND at once
(its send loop is woken) and the overlay images follow in a SEND job of their
own.  Checked here: the moment of the call (before any overlay file exists,
on the serial path), no call without an overlay series, the SEND jobs the
node makes from it (a destination with a SEG fallback waits for the whole
job when the job makes the fallback's overlay series, and goes early with the
fallback rendered on refusal when it does not), a send that really happens
while the job runs, and a job that fails after its SEG and SR went out (they
stand; the job is failed with its reason).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from dicom_node.domain import JobKind, JobState
from dicom_node.errors import ResultError
from dicom_node.scheduler import pipeline as pipeline_module
from dicom_node.scheduler.pipeline import InferOutcome, InferTask, ProducedObject, run_infer
from dicom_node.scheduler.service import Pipeline
from dicom_node.send import SendReport
from dicom_node.spool import Spool
from dicom_node.store import Database, ReceivedInstance
from inference.registry import ModelRegistry
from tests.spooled import python_model_case

MODEL_PY = '''
import numpy as np

def bright(array, geometry):
    return (array > 500).astype(np.uint8)
'''

@pytest.fixture()
def case(tmp_path: Path) -> dict[str, Any]:
    hu = np.full((6, 40, 40), 40, np.int16)
    hu[1:5, 8:30, 8:30] = 900
    return python_model_case(tmp_path, MODEL_PY, hu, destinations={
        "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
        "old": {"ae_title": "OLD", "host": "127.0.0.1", "port": 105, "seg_fallback": "sc", "outputs": ["seg", "sr"]}},
        rules=[{"name": "all", "when": {"Modality": "CT"}, "run": ["bright"], "outputs": ["seg", "sr", "sc"],
                "send_to": ["pacs"]}])


def _overlay_files(spool: Spool) -> list[Path]:
    return [p for p in spool.results.rglob("*.dcm") if "sc" in p.name.lower()]


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "forked"])
def test_seg_and_sr_are_handed_over_before_the_overlay_series(case: dict[str, Any], parallel: bool) -> None:
    spool: Spool = case["spool"]
    calls: list[tuple[list[ProducedObject], list[Path]]] = []

    def ready(objects: list[ProducedObject]) -> None:
        assert all(spool.absolute(o.path).is_file() for o in objects), "handed over only once written"
        calls.append((objects, _overlay_files(spool)))

    task = InferTask(1, case["series"], "bright", case["paths"], ("seg", "sr", "sc"))
    outcome = run_infer(task, ModelRegistry(case["settings"].models), spool, case["settings"].outputs,
                        parallel_encode=parallel, ready=ready)
    assert outcome.ok, outcome.error
    assert len(calls) == 1
    early, overlays_then = calls[0]
    assert [o.kind for o in early] == ["seg", "sr"]
    assert [o.kind for o in outcome.objects[:2]] == ["seg", "sr"] and outcome.objects[:2] == early
    assert {o.kind for o in outcome.objects[2:]} == {"sc"} and len(outcome.objects) > 2
    if not parallel:  # the overlay series is drawn after the call, in this process
        assert overlays_then == [], "called before the first overlay image was written"


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "forked"])
def test_overlay_images_are_handed_over_in_batches_while_the_rest_are_drawn(
        case: dict[str, Any], parallel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline_module, "HAND_OVER_S", 0.0)  # every image its own batch
    spool: Spool = case["spool"]
    calls: list[tuple[list[ProducedObject], int]] = []

    def ready(objects: list[ProducedObject]) -> None:
        for o in objects:  # synced and whole when handed over: read back as DICOM
            assert pydicom.dcmread(spool.absolute(o.path), stop_before_pixels=True).SOPInstanceUID == o.sop_uid
        calls.append((objects, len(_overlay_files(spool))))

    task = InferTask(1, case["series"], "bright", case["paths"], ("seg", "sr", "sc", "pdf"))
    outcome = run_infer(task, ModelRegistry(case["settings"].models), spool, case["settings"].outputs,
                        parallel_encode=parallel, ready=ready)
    assert outcome.ok, outcome.error
    assert [o.kind for o in calls[0][0]] == ["seg", "sr"]
    overlays = [o for o in outcome.objects if o.kind == "sc"]
    batches = [objects for objects, _ in calls[1:]]
    assert all(len(b) == 1 and b[0].kind == "sc" for b in batches), "the PDF is not handed over early"
    assert [b[0] for b in batches] == overlays[:len(batches)] and len(batches) >= len(overlays) - 1
    assert outcome.objects[-1].kind == "pdf"
    if not parallel:  # drawn in this process: each image handed over before the next one is written
        assert [written for _, written in calls[1:]] == list(range(1, len(batches) + 1))


def test_an_overlay_series_that_would_fail_fails_before_its_first_image(case: dict[str, Any]) -> None:
    from dicom_node.errors import ResultError as Refused
    from dicom_node.results.identity import derive_identity
    from dicom_node.results.sc import iter_overlays
    from inference.models.lungs_ct_card import LUNGS_CT_CARD as card
    from inference.types import Prediction

    sources = [pydicom.dcmread(f) for f in case["files"]]
    labels = np.zeros((len(sources), 40, 40), np.uint8)
    labels[:, 10:20, 10:20] = 1
    labels[-1, 30:35, 30:35] = 9  # a label the card does not declare, on the last slice only
    identity = derive_identity("2.25.", case["series"], "bright", "1", "sc", 9, "overlay")
    images = iter_overlays(Prediction(card=card, labelmap=labels), sources, identity)
    with pytest.raises(Refused, match=r"labels \[9\]"):
        next(images)  # not after drawing the slices before it
    labels[-1] = 0
    del sources[-2].PixelData
    with pytest.raises(Refused, match="no pixel data"):
        next(iter_overlays(Prediction(card=card, labelmap=labels), sources, identity))


def test_without_an_overlay_series_nothing_is_handed_over_early(case: dict[str, Any]) -> None:
    calls: list[Any] = []
    task = InferTask(1, case["series"], "bright", case["paths"], ("seg", "sr"))
    outcome = run_infer(task, ModelRegistry(case["settings"].models), case["spool"], case["settings"].outputs,
                        parallel_encode=True, ready=calls.append)
    assert outcome.ok and [o.kind for o in outcome.objects] == ["seg", "sr"]
    assert calls == [], "SEG and SR are the whole job: they go with its end"


class Sender:
    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.calls: list[tuple[str, list[str], int]] = []  # destination, files, overlay files on disk then

    refuse: set[str] = set()  # SOP classes the destination accepts no presentation context for

    def __call__(self, files: list[Path], destination: Any, node_ae_title: str, **options: Any) -> SendReport:
        self.calls.append((destination.ae_title, sorted(p.name for p in files), len(_overlay_files(self.spool))))
        classes = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files]
        refused = tuple(dict.fromkeys(c for c in classes if c in self.refuse))
        if refused and not options.get("skip_refused"):
            raise AssertionError("a refused SOP class sent without skip_refused")
        return SendReport(sent=sum(c not in self.refuse for c in classes), refused=refused)


class InlineRunner:
    """Runs the job in this process, serially; between the early hand-over and the overlays the node's send
    loop runs once, as the node's own send thread would while the worker draws."""

    def __init__(self, case: dict[str, Any]) -> None:
        self.case = case
        self.pipeline: Pipeline | None = None
        self.sent_during_job: int = 0

    def run(self, task: InferTask, timeout_s: float, ready: Any = None) -> InferOutcome:
        def handed_over(objects: list[ProducedObject]) -> None:
            ready(objects)
            assert self.pipeline is not None
            self.sent_during_job = self.pipeline.drain_send(lambda: 101.0)

        return run_infer(task, ModelRegistry(self.case["settings"].models), self.case["spool"],
                         self.case["settings"].outputs, ready=handed_over)


def _pipeline(case: dict[str, Any], tmp_path: Path, destinations: list[str],
              outputs: list[str] | None = None) -> tuple[Pipeline, InlineRunner, Sender]:
    db = Database(tmp_path / "state.sqlite3")
    spool: Spool = case["spool"]
    runner = InlineRunner(case)
    sender = Sender(spool)
    p = Pipeline(case["settings"], db, spool, runner, sender)
    runner.pipeline = p
    for path in case["files"]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        p.series.record_instance(ReceivedInstance(
            study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID, sop_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID, transfer_syntax=ds.file_meta.TransferSyntaxUID, modality="CT",
            path=spool.relative(path), size=1, sha256=ds.SOPInstanceUID, calling_ae="MOD", called_ae="NODE",
            source_host="127.0.0.1"), 90.0)
    p.series.complete_quiet(100, 5)
    rule = case["settings"].rules[0].model_copy(update={"send_to": destinations,
                                                        **({"outputs": outputs} if outputs else {})})
    p._queue_rule(case["series"], rule, 100.0, {})
    return p, runner, sender


def test_the_node_sends_seg_and_sr_while_the_job_draws_its_overlays(case: dict[str, Any], tmp_path: Path) -> None:
    p, runner, sender = _pipeline(case, tmp_path, ["pacs"])
    assert p.drain_infer(lambda: 101.0) == 1
    assert runner.sent_during_job == 1, "one SEND job went out while the job ran"
    assert sender.calls[0][0] == "PACS" and len(sender.calls[0][1]) == 2
    assert sender.calls[0][2] == 0, "sent before any overlay image existed"
    assert p.drain_send(lambda: 102.0) == 1
    overlays = sender.calls[1][1]
    assert len(overlays) == len(_overlay_files(case["spool"])) > 0, "the overlay series in its own SEND job"
    sends = [j for j in p.jobs.in_state(JobState.DONE) if j.kind == JobKind.SEND]
    assert [len(j.payload["files"]) for j in sorted(sends, key=lambda j: j.id)] == [2, len(overlays)]
    infer = next(j for j in p.jobs.in_state(JobState.DONE) if j.kind == JobKind.INFER)
    assert len(infer.payload["files"]) == 2 + len(overlays), "the job still lists every object"
    kinds = {r["kind"] for r in p.db.query("SELECT kind FROM results")}
    assert kinds == {"seg", "sr", "sc"}


def test_a_destination_with_a_seg_fallback_waits_for_the_whole_job(case: dict[str, Any], tmp_path: Path) -> None:
    # "old" takes SEG + SR with an overlay fallback; "pacs" takes SEG + SR + overlays and gets them early.
    p, runner, sender = _pipeline(case, tmp_path, ["pacs", "old"])
    route = p.jobs.in_state(JobState.QUEUED)[0].payload["routes"]
    assert route["old"]["seg_fallback"] == "sc" and route["pacs"]["seg_fallback"] is None
    p.drain_infer(lambda: 101.0)
    assert [c[0] for c in sender.calls] == ["PACS"], "only the destination without a fallback went early"
    p.drain_send(lambda: 102.0)
    old = [c for c in sender.calls if c[0] == "OLD"]
    assert len(old) == 1 and len(old[0][1]) == 2, "OLD: SEG + SR in one SEND job after the job"
    assert sum(c[0] == "PACS" for c in sender.calls) == 2


def test_a_seg_fallback_the_job_does_not_make_goes_early_with_the_seg(case: dict[str, Any], tmp_path: Path) -> None:
    """A job with a PDF and no overlay series: the destinations' SEG fallback (``seg_fallback: sc``, the
    default) is an overlay series rendered on a first refusal, so their SEG + SR need not wait for the PDF."""
    from pydicom.uid import SegmentationStorage

    p, runner, sender = _pipeline(case, tmp_path, ["pacs", "old"], outputs=["seg", "sr", "pdf"])
    routes = p.jobs.in_state(JobState.QUEUED)[0].payload["routes"]
    assert routes["old"]["seg_fallback"] == "sc" and routes["pacs"]["seg_fallback"] == "sc"
    p.drain_infer(lambda: 101.0)
    assert runner.sent_during_job == 2 and sorted(c[0] for c in sender.calls) == ["OLD", "PACS"]
    early = sorted((j for j in p.jobs.in_state(JobState.DONE) if j.kind == JobKind.SEND), key=lambda j: j.id)
    for job in early:  # the SEG's SEND job carries the same fallback as at the job's end: rendered when refused
        assert [Path(f).name for f in job.payload["files"]] == ["seg.dcm", "sr.dcm"]
        assert job.payload["fallback"] == {"seg": [], "kind": "sc"}
    p.drain_send(lambda: 102.0)
    assert sender.calls[2:] == [("PACS", ["pdf.dcm"], 0)], "the PDF after the job, without the SEG or its fallback"

    # A destination that refuses the SEG in negotiation: the early SEND job queues the overlay's rendering.
    refusing, runner2, sender2 = _pipeline(case, tmp_path / "again", ["pacs"], outputs=["seg", "sr", "pdf"])
    sender2.refuse = {str(SegmentationStorage)}
    refusing.drain_infer(lambda: 101.0)
    assert runner2.sent_during_job == 1
    assert sender2.calls[0][1] == ["seg.dcm", "sr.dcm"], "the SEG and SR went early, the SEG refused"
    seg_send = next(j for j in refusing.jobs.in_state(JobState.DONE) if j.kind == JobKind.SEND)
    render = seg_send.payload["seg_fallback"]["rendering_job"]
    renders = [j for j in refusing.jobs.in_state(JobState.DONE) if j.kind == JobKind.INFER and j.id == render]
    assert len(renders) == 1 and renders[0].payload["outputs"] == ["sc"]  # run by the same drain_infer
    waiting = sorted(tuple(Path(f).name for f in j.payload["files"])
                     for j in refusing.jobs.in_state(JobState.QUEUED) if j.kind == JobKind.SEND)
    assert waiting[0] == ("pdf.dcm",) and len(waiting[1]) == 4 and all(n.startswith("sc-") for n in waiting[1])


def test_a_job_failing_after_its_seg_and_sr_went_out(case: dict[str, Any], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ResultError("overlay drawing failed")

    monkeypatch.setattr(pipeline_module, "iter_overlays", broken)
    p, runner, sender = _pipeline(case, tmp_path, ["pacs"])
    with caplog.at_level(logging.WARNING, logger="dicom_node.scheduler.service"):
        p.drain_infer(lambda: 101.0)
    infer = [j for j in p.jobs.in_state(JobState.FAILED) if j.kind == JobKind.INFER]
    assert len(infer) == 1 and "overlay drawing failed" in infer[0].reason
    assert runner.sent_during_job == 1 and len(sender.calls[0][1]) == 2, "SEG + SR stand"
    assert "after 2 of its objects were queued for sending to pacs" in caplog.text
    assert p.drain_send(lambda: 102.0) == 0, "nothing else is sent for the failed job"


def test_a_worker_process_hands_seg_and_sr_over_through_its_pipe(case: dict[str, Any]) -> None:
    from dicom_node.scheduler.worker import WorkerProcess

    settings = case["settings"].model_copy(update={"workers": case["settings"].workers.model_copy(
        update={"infer": 1})})
    worker = WorkerProcess(settings)
    worker.start()
    handed: list[list[ProducedObject]] = []
    try:
        task = InferTask(1, case["series"], "bright", case["paths"], ("seg", "sr", "sc"))
        outcome = worker.run(task, 120, ready=handed.append)
    finally:
        worker.close()
    assert outcome.ok, outcome.error
    assert len(handed) == 1 and [o.kind for o in handed[0]] == ["seg", "sr"]
    assert outcome.objects[:2] == handed[0] and len(outcome.objects) > 2


def test_a_jobs_sends_are_announced_once_committed_before_the_next_job_runs(case: dict[str, Any],
                                                                              tmp_path: Path) -> None:
    """A rule running two models: the first job's SEND jobs wake the node's send loop (``results_ready``) as
    soon as they are committed, not when this worker has run its other jobs (or at the next interval)."""
    settings = case["settings"]
    models = {**settings.models, "bright2": settings.models["bright"]}
    case = {**case, "settings": settings.model_copy(update={"models": models})}
    p, runner, sender = _pipeline(case, tmp_path, ["pacs"], outputs=["seg", "sr"])
    rule = case["settings"].rules[0].model_copy(update={"send_to": ["pacs"], "outputs": ["seg", "sr"],
                                                        "run": ["bright2"]})
    p._queue_rule(case["series"], rule, 100.0, {})
    seen: list[tuple[str, list[tuple[str, str]]]] = []

    def on_event(name: str, data: dict[str, Any]) -> None:
        if name in ("results_ready", "infer_finished"):
            jobs = p.jobs.for_series(case["series"])
            seen.append((name, [(str(j.kind), str(j.state)) for j in jobs]))

    p.on_event = on_event
    assert p.drain_infer(lambda: 101.0) == 2
    names = [name for name, _ in seen]
    assert names == ["infer_finished", "results_ready", "infer_finished", "results_ready"]
    first_ready = seen[1][1]
    assert ("send", "queued") in first_ready, "the SEND job is committed when it is announced"
    assert first_ready.count(("infer", "queued")) == 1, "announced before the second model's job ran"
