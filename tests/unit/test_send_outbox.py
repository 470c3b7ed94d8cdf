"""The outbox: SEND job transitions driven by the pipeline, with time as a parameter and a scripted sender."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dicom_node.domain import JobKind, JobState, SeriesState
from dicom_node.errors import SendError
from dicom_node.scheduler.service import Pipeline
from dicom_node.send import SendReport
from dicom_node.settings import load_settings_text
from dicom_node.spool import Spool
from dicom_node.store import Database, JobStore, ReceivedInstance, SeriesStore
from dicom_node.store.jobs import state_label

SERIES = "1.2.3.4"
CONFIG = """
destinations:
  pacs: {ae_title: PACS, host: 127.0.0.1, port: 104}
  web: {type: dicomweb, url: "http://127.0.0.1:8042/dicom-web"}
send: {max_attempts: 4, max_age_hours: 1, backoff_initial_s: 10, backoff_max_s: 40, health_check_s: 5}
"""


class ScriptedSender:
    """Answers each call with the next scripted outcome: a SendReport or a SendError to raise."""

    def __init__(self) -> None:
        self.script: list[SendReport | SendError] = []
        self.calls: list[tuple[str, list[Path]]] = []

    def __call__(self, files: list[Path], destination: Any, node_ae_title: str) -> SendReport:
        self.calls.append((destination.type, list(files)))
        outcome = self.script.pop(0) if self.script else SendReport(sent=len(files))
        if isinstance(outcome, SendError):
            raise outcome
        return outcome


class NoRunner:
    def run(self, task: Any, timeout_s: float, ready: Any = None) -> Any:
        raise AssertionError("no INFER job in these tests")


@pytest.fixture()
def outbox(tmp_path: Path) -> tuple[Pipeline, ScriptedSender]:
    db = Database(tmp_path / "state.sqlite3")
    spool = Spool(tmp_path)
    for name in ("seg.dcm", "sr.dcm"):
        (spool.results / name).write_bytes(b"result")
    series = SeriesStore(db)
    series.record_instance(ReceivedInstance(
        study_uid="1.2.3", series_uid=SERIES, sop_uid="1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1", modality="CT", path="incoming/1.1.dcm", size=10, sha256="a",
        calling_ae="MOD", called_ae="NODE", source_host="127.0.0.1"), 0)
    series.complete_quiet(100, 30)
    sender = ScriptedSender()
    return Pipeline(load_settings_text(CONFIG), db, spool, NoRunner(), sender), sender


def _enqueue(p: Pipeline, now: float, destination: str = "pacs", model: str = "lungs") -> int:
    return p.jobs.enqueue(JobKind.SEND, SERIES, now, model=model, destination=destination,
                          payload={"files": ["results/seg.dcm", "results/sr.dcm"]})


def _clock(t: float) -> Callable[[], float]:
    return lambda: t


def test_a_sent_job_is_done_and_shown_as_sent(outbox: tuple[Pipeline, ScriptedSender]) -> None:
    p, sender = outbox
    job = _enqueue(p, 100)
    assert p.drain_send(_clock(101)) == 1
    assert p.jobs.get(job).state == JobState.DONE
    assert state_label(JobKind.SEND, JobState.DONE) == "sent"
    assert state_label(JobKind.SEND, JobState.RETRYING) == "failed-retrying"
    assert state_label(JobKind.SEND, JobState.RUNNING) == "sending"
    assert state_label(JobKind.INFER, JobState.DONE) == "done"
    assert [len(files) for _, files in sender.calls] == [2], "one delivery (association) per job"
    assert p.series.get(SERIES)["state"] == SeriesState.DONE


def test_unreachable_destination_backs_off_and_skips_its_other_jobs(outbox: tuple[Pipeline, ScriptedSender]) -> None:
    p, sender = outbox
    first, second, web = _enqueue(p, 100), _enqueue(p, 100, "pacs", "liver"), _enqueue(p, 100, "web")
    sender.script = [SendError("PACS is unreachable", retryable=True)]
    p.drain_send(_clock(101))
    assert [t for t, _ in sender.calls] == ["dimse", "dicomweb"], "the second pacs job waits, web goes on"
    job = p.jobs.get(first)
    assert job.state == JobState.RETRYING and job.reason == "PACS is unreachable"
    assert 101 + 5 <= job.next_attempt_at <= 101 + 10  # backoff_initial_s with jitter in [1/2, 1]
    assert p.jobs.get(second).state == JobState.QUEUED and p.jobs.get(web).state == JobState.DONE
    assert p.series.get(SERIES)["state"] == SeriesState.SENDING


def test_refused_object_is_dead_at_once_and_retry_delivers(outbox: tuple[Pipeline, ScriptedSender]) -> None:
    p, sender = outbox
    job = _enqueue(p, 100)
    sender.script = [SendError("PACS refused Segmentation Storage with status 0xC000", retryable=False)]
    p.drain_send(_clock(101))
    dead = p.jobs.get(job)
    assert dead.state == JobState.DEAD and "0xC000" in dead.reason and dead.attempts == 1
    row = p.series.get(SERIES)
    assert row["state"] == SeriesState.FAILED and "0xC000" in row["reason"]
    assert p.drain_send(_clock(10_000)) == 0, "a dead job is never retried by itself"
    assert p.jobs.requeue([j.id for j in p.jobs.in_state(JobState.DEAD)], 200) == 1
    p.drain_send(_clock(201))
    assert p.jobs.get(job).state == JobState.DONE and len(sender.calls) == 2


def test_attempts_exhausted_make_the_job_dead(outbox: tuple[Pipeline, ScriptedSender]) -> None:
    p, sender = outbox
    job = _enqueue(p, 100)
    sender.script = [SendError("busy (0xA700)", retryable=True)] * 4
    t = 100.0
    for _ in range(4):
        t = max(t, p.jobs.get(job).next_attempt_at) + 1
        p.drain_send(_clock(t))
    dead = p.jobs.get(job)
    assert dead.state == JobState.DEAD and dead.attempts == 4
    assert dead.reason == "gave up after 4 attempt(s): busy (0xA700)"


def test_max_age_makes_the_job_dead_before_its_attempts_run_out(outbox: tuple[Pipeline, ScriptedSender]) -> None:
    p, sender = outbox
    job = _enqueue(p, 100)
    sender.script = [SendError("unreachable", retryable=True)] * 3
    p.drain_send(_clock(101))
    assert p.jobs.get(job).state == JobState.RETRYING
    p.drain_send(_clock(100 + 3600))  # one hour after creation (max_age_hours: 1), attempt 2 of 4
    dead = p.jobs.get(job)
    assert dead.state == JobState.DEAD and dead.attempts == 2 and dead.reason.startswith("gave up after 1.0 h")
    # An operator's retry restarts the clock: the next failure is retried, not dead.
    p.jobs.requeue([job], 10_000)
    p.drain_send(_clock(10_001))
    assert p.jobs.get(job).state == JobState.RETRYING


def test_health_check_releases_the_backlog_of_a_destination_that_answers_again(
        outbox: tuple[Pipeline, ScriptedSender]) -> None:
    p, sender = outbox
    jobs = [_enqueue(p, 100), _enqueue(p, 100, model="liver")]
    p.jobs.enqueue(JobKind.SEND, SERIES, 100, model="other", destination="web", payload={"files": []})
    sender.script = [SendError("unreachable", retryable=True)]
    p.drain_send(_clock(101))  # the first fails, the second is skipped: both wait (one queued, one retrying)
    sender.script = [SendError("unreachable", retryable=True)]
    p.drain_send(_clock(101.5))
    assert {p.jobs.get(j).state for j in jobs} == {JobState.RETRYING}
    probed: list[str] = []

    def down(dest: Any, ae: str) -> str:
        probed.append(dest.type)
        return "no association"

    assert p.check_destinations(102, down) == []
    assert probed == ["dimse"], "only destinations with waiting jobs are probed"
    assert p.drain_send(_clock(102)) == 0
    assert p.check_destinations(103, lambda dest, ae: "") == ["pacs"]
    assert p.drain_send(_clock(103)) == 2, "the whole backlog goes at once, long before its backoff"
    assert {p.jobs.get(j).state for j in jobs} == {JobState.DONE}


def test_a_send_interrupted_by_a_crash_is_sent_again_after_restart(outbox: tuple[Pipeline, ScriptedSender]) -> None:
    p, sender = outbox
    job = _enqueue(p, 100)
    claimed = p.jobs.claim(JobKind.SEND, 101)  # the node dies while this job is sending
    assert claimed is not None and claimed.id == job
    p.recover(500)
    assert p.jobs.get(job).state == JobState.RETRYING
    assert p.drain_send(_clock(500)) == 1
    assert p.jobs.get(job).state == JobState.DONE and len(sender.calls) == 1


def test_an_identical_send_waiting_in_the_outbox_is_not_queued_twice(outbox: tuple[Pipeline, ScriptedSender]) -> None:
    p, sender = outbox
    first = _enqueue(p, 100)
    p.jobs.retry_later(first, "unreachable", 100, 900, max_attempts=5)
    assert _enqueue(p, 200) == first, "an INFER job re-run after a crash re-queues its sends"
    assert p.jobs.get(first).next_attempt_at == 200
    assert len(p.jobs.for_series(SERIES)) == 1
    p.drain_send(_clock(201))
    assert _enqueue(p, 300) != first, "once sent, a new result set is a new job"


def test_destination_removed_from_the_configuration_is_dead(outbox: tuple[Pipeline, ScriptedSender]) -> None:
    p, sender = outbox
    job = _enqueue(p, 100, "gone")
    p.drain_send(_clock(101))
    assert p.jobs.get(job).state == JobState.DEAD and "no longer configured" in p.jobs.get(job).reason
    assert sender.calls == []


def test_jobs_table_rows_are_readable(tmp_path: Path) -> None:
    jobs = JobStore(Database(tmp_path / "s.sqlite3"))
    assert jobs.waiting_destinations(0) == [] and jobs.release("pacs", 0) == 0


def test_a_retry_sends_only_what_the_destination_had_not_confirmed(outbox: tuple[Pipeline, ScriptedSender]) -> None:
    """The first attempt stores the SEG, then the PACS is busy: the next attempt sends the SR alone; the job's files
    stay the whole set (what was sent), the payload records what was confirmed."""
    p, sender = outbox
    job = _enqueue(p, 100)
    calls: list[list[str]] = []

    def busy_after_one(files: list[Path], destination: Any, node_ae_title: str) -> SendReport:
        calls.append([f.name for f in files])
        if len(calls) == 1:
            raise SendError("PACS is out of resources (0xA700)", retryable=True, stored=files[:1])
        return SendReport(sent=len(files))

    p.sender = busy_after_one
    p.drain_send(_clock(101))
    assert p.jobs.get(job).state == JobState.RETRYING
    assert p.jobs.get(job).payload == {"files": ["results/seg.dcm", "results/sr.dcm"], "confirmed": ["results/seg.dcm"]}
    p.drain_send(_clock(200))
    assert calls == [["seg.dcm", "sr.dcm"], ["sr.dcm"]]
    assert p.jobs.get(job).state == JobState.DONE
