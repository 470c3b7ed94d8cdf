"""Rules in the scheduler: completion by per-rule timers and C-FIND, priorities, study rules
(grouping, waiting, a series that never came), replay, and rules reload (broken file rejected)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml

from dicom_node.domain import JobKind, JobState, SeriesState
from dicom_node.rules.replay import parse_duration, replay
from dicom_node.scheduler.completion import PeerUnavailable, SeriesCompletion, cfind_series_count
from dicom_node.scheduler.service import Pipeline
from dicom_node.scheduler.study import WAITING
from dicom_node.settings import CFindPeerSettings, Settings, load_settings_text
from dicom_node.spool import Spool
from dicom_node.store import Database, ReceivedInstance
from tests.phantoms import write_ct_series

STUDY = "1.2.826.0.1.3680043.10.1"


def settings_with(rules: list[dict[str, Any]], **completion: Any) -> Settings:
    return Settings.model_validate({
        "models": {"lungs": {"type": "builtin", "name": "lungs-ct"},
                   # A study rule's model takes several series: a python model (never loaded here).
                   "phases": {"type": "python", "callable": "phases:segment",
                              "labels": [{"value": 1, "name": "Liver",
                                          "snomed": {"value": "10200004", "meaning": "Liver"}}]}},
        "completion": {"quiet_seconds": 30, **completion},
        "rules": rules,
    })


class _NoRunner:
    def run(self, task: Any, timeout_s: float, ready: Any = None) -> Any:
        raise AssertionError("no model runs in these tests")


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, Any]:
    db = Database(tmp_path / "state.sqlite3")
    yield {"db": db, "spool": Spool(tmp_path), "tmp": tmp_path}
    db.close()


def pipeline(env: dict[str, Any], settings: Settings) -> Pipeline:
    return Pipeline(settings, env["db"], env["spool"], _NoRunner(), lambda *a, **k: None)


def receive(p: Pipeline, *, description: str, now: float, series_uid: str, slices: int = 3,
            calling_ae: str = "PACS", thickness: float = 1.0) -> str:
    """Write a small CT series into the spool and record it as received at ``now``."""
    folder = p.spool.incoming / STUDY / series_uid
    files = write_ct_series(np.zeros((slices, 4, 4), dtype=np.int16), (thickness, 1.0, 1.0), folder,
                            study_uid=STUDY, series_uid=series_uid, series_description=description)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        p.series.record_instance(ReceivedInstance(
            study_uid=STUDY, series_uid=series_uid, sop_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
            transfer_syntax=ds.file_meta.TransferSyntaxUID, modality="CT", path=p.spool.relative(f), size=1,
            sha256=ds.SOPInstanceUID, calling_ae=calling_ae, called_ae="DICOMNODE", source_host="127.0.0.1"), now)
    return series_uid


# --------------------------------------------------------------------------- completion


def test_cfind_confirmation_completes_before_the_timer(env: dict[str, Any]) -> None:
    peer = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104, "after_seconds": 2, "interval_seconds": 10}
    settings = settings_with([{"name": "ct", "when": {"Modality": "CT"}, "run": ["lungs"]}],
                             quiet_seconds=600, cfind=[peer])
    p = pipeline(env, settings)
    asked: list[tuple[str, str, str]] = []
    answer = {"count": 2}

    def count(peer: CFindPeerSettings, calling: str, study: str, series: str) -> int | None:
        asked.append((peer.ae_title, calling, series))
        return answer["count"]

    completion = SeriesCompletion(lambda: settings, p.series, p.summary, count)
    uid = receive(p, description="Thorax", now=100.0, series_uid="1.2.826.0.1.3680043.10.2", slices=3)
    other = receive(p, description="Thorax", now=100.0, series_uid="1.2.826.0.1.3680043.10.3", calling_ae="MOD")
    assert completion.complete(101.0) == [] and asked == [], "not asked before after_seconds"
    # The PACS answers 2 while we hold 3 (it is still receiving, or another copy): not complete.
    assert completion.complete(102.0) == []
    assert asked == [("PACS", "DICOMNODE", uid)], "only series from the configured peer are asked"
    answer["count"] = 3
    assert completion.complete(105.0) == [], "asked again only after interval_seconds"
    assert completion.complete(112.0) == [uid]
    assert p.series.get(uid)["state"] == SeriesState.COMPLETE
    assert p.series.get(other)["state"] == SeriesState.RECEIVING
    assert completion.complete(700.0) == [other], "the timer still completes what no peer confirms"


def test_a_released_association_asks_the_peer_at_once(env: dict[str, Any]) -> None:
    peers = [{"ae_title": "PACS", "host": "127.0.0.1", "port": 104, "after_seconds": 2, "interval_seconds": 10},
             {"ae_title": "OLDPACS", "host": "127.0.0.1", "port": 105, "after_seconds": 2, "on_release": False}]
    settings = settings_with([], quiet_seconds=600, cfind=peers)
    p = pipeline(env, settings)
    asked: list[str] = []
    answer = {"count": 3}

    def count(peer: CFindPeerSettings, calling: str, study: str, series: str) -> int | None:
        asked.append(series)
        return answer["count"]

    completion = SeriesCompletion(lambda: settings, p.series, p.summary, count)
    routed = receive(p, description="x", now=100.0, series_uid="1.2.826.0.1.3680043.10.20")
    old = receive(p, description="x", now=100.0, series_uid="1.2.826.0.1.3680043.10.21", calling_ae="OLDPACS")
    modality = receive(p, description="x", now=100.0, series_uid="1.2.826.0.1.3680043.10.22", calling_ae="MOD")
    assert not completion.released("MOD", [modality], 100.1), "not a C-FIND peer: nothing to ask"
    assert not completion.released("OLDPACS", [old], 100.1), "on_release: false"
    assert completion.released("PACS", [routed], 100.1)
    assert completion.complete(100.2) == [routed] and asked == [routed], "asked at once, not after 2 s"
    assert completion.complete(102.5) == [old], "the other peer is asked after after_seconds, as before"
    asked.clear()

    # A count that disagrees: the release was only a moment to ask; later releases wait for the interval.
    second = receive(p, description="x", now=200.0, series_uid="1.2.826.0.1.3680043.10.23", slices=2)
    assert completion.released("PACS", [second], 200.1)
    assert completion.complete(200.2) == [] and asked == [second]
    receive(p, description="x", now=200.5, series_uid=second, slices=1)  # one more, in a new association
    assert completion.released("PACS", [second], 200.6)
    assert completion.complete(200.7) == [] and asked == [second], "interval_seconds still spaces the queries"
    assert completion.complete(210.3) == [second] and asked == [second, second]
    assert p.series.get(modality)["state"] == SeriesState.RECEIVING, "only the timer completes it"


def test_cfind_failure_falls_back_to_the_timer(env: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_with([], quiet_seconds=60, cfind=[{"ae_title": "PACS", "host": "127.0.0.1", "port": 1}])

    def broken(*args: Any) -> int | None:
        raise OSError("connection refused")

    p = pipeline(env, settings)
    completion = SeriesCompletion(lambda: settings, p.series, p.summary, broken)
    uid = receive(p, description="x", now=0.0, series_uid="1.2.826.0.1.3680043.10.4")
    with caplog.at_level(logging.WARNING):
        assert completion.complete(5.0) == []
    assert "falls back to the timer" in caplog.text
    assert completion.complete(60.0) == [uid]


def test_an_unavailable_peer_is_asked_once_per_interval_and_timers_do_not_wait_for_it(
        env: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """Each query to a peer that drops packets waits its whole timeout: after one fails to associate, the peer's
    other series are not asked until interval_seconds have passed, and series whose timer fired are completed
    before any query is made."""
    peer = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104, "after_seconds": 2, "interval_seconds": 10}
    settings = settings_with([{"name": "stat", "when": {"SeriesDescription": {"regex": "STAT"}}, "run": ["lungs"],
                               "quiet_seconds": 1}], quiet_seconds=60, cfind=[peer])
    p = pipeline(env, settings)
    calls: list[tuple[str, list[str]]] = []
    up = {"now": False}

    def count(peer: CFindPeerSettings, calling: str, study: str, series: str) -> int | None:
        calls.append((series, [row["series_uid"] for row in p.series.in_state(SeriesState.COMPLETE)]))
        if not up["now"]:
            raise PeerUnavailable("no answer within 10 s")
        return 3

    completion = SeriesCompletion(lambda: settings, p.series, p.summary, count)
    first = receive(p, description="x", now=100.0, series_uid="1.2.826.0.1.3680043.10.30")
    second = receive(p, description="x", now=100.0, series_uid="1.2.826.0.1.3680043.10.31")
    # received after the peer's series (so after them in the pass), and its 1 s timer fired
    timed = receive(p, description="STAT", now=101.5, series_uid="1.2.826.0.1.3680043.10.32", calling_ae="MOD")
    with caplog.at_level(logging.WARNING):
        assert completion.complete(103.0) == [timed]
    assert calls == [(first, [timed])], "one query for the peer, after the timer's completion"
    assert caplog.text.count("unavailable") == 1
    assert completion.complete(108.0) == [] and len(calls) == 1, "not asked again within interval_seconds"
    up["now"] = True
    assert completion.complete(113.5) == [first, second]
    assert [series for series, _ in calls] == [first, first, second]
    assert "answers again" in caplog.text


def test_a_peer_that_drops_packets_is_given_up_on_after_its_timeout(tmp_path: Path) -> None:
    """A listening socket whose backlog is full drops the SYNs of new connections, as a firewalled PACS does:
    without a TCP connection timeout the query waited for the kernel's SYN retries (134.6 s here for a peer
    configured with 2 s)."""
    import socket
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(server.getsockname())
        fillers.append(filler)
    time.sleep(0.2)
    peer = CFindPeerSettings(ae_title="PACS", host="127.0.0.1", port=server.getsockname()[1], timeout_s=1)
    started = time.monotonic()
    try:
        with pytest.raises(PeerUnavailable):
            cfind_series_count(peer, "DICOMNODE", "1.2.3", "1.2.3.4")
        assert time.monotonic() - started < 30, "the connection timeout was not applied"
    finally:
        for s in [*fillers, server]:
            s.close()


def test_a_late_instance_after_the_query_keeps_the_series_open(env: dict[str, Any]) -> None:
    settings = settings_with([], quiet_seconds=600, cfind=[{"ae_title": "PACS", "host": "h", "port": 1}])
    p = pipeline(env, settings)
    uid = receive(p, description="x", now=0.0, series_uid="1.2.826.0.1.3680043.10.5", slices=2)
    row = p.series.get(uid)
    receive(p, description="x", now=3.0, series_uid=uid, slices=1)  # arrives between query and transition
    assert not p.series.mark_complete(uid, 4.0, row["last_received"])
    assert p.series.get(uid)["state"] == SeriesState.RECEIVING


def test_per_rule_quiet_seconds(env: dict[str, Any]) -> None:
    settings = settings_with([{"name": "stat-ct", "when": {"SeriesDescription": {"regex": "STAT"}},
                               "run": ["lungs"], "quiet_seconds": 5, "priority": "stat"},
                              {"name": "other", "when": {"Modality": "CT"}, "run": ["lungs"], "priority": "low"}],
                             quiet_seconds=30)
    p = pipeline(env, settings)
    stat = receive(p, description="STAT head", now=0.0, series_uid="1.2.826.0.1.3680043.10.6")
    routine = receive(p, description="routine", now=0.0, series_uid="1.2.826.0.1.3680043.10.7")
    assert p.tick(4.0) == []
    # stat-ct and other both match the STAT series: the longest quiet time (other: the default 30 s) wins.
    assert p.tick(6.0) == []
    assert set(p.tick(30.0)) == {stat, routine}
    jobs = {(j.rule, j.priority) for uid in (stat, routine) for j in p.jobs.for_series(uid)}
    assert jobs == {("stat-ct", 10), ("other", -10)}


def test_a_stop_rule_shortens_the_quiet_time_and_orders_the_queue(env: dict[str, Any]) -> None:
    settings = settings_with([{"name": "stat-ct", "when": {"SeriesDescription": {"regex": "STAT"}},
                               "run": ["lungs"], "quiet_seconds": 5, "priority": "stat", "mode": "stop"},
                              {"name": "other", "when": {"Modality": "CT"}, "run": ["lungs"], "priority": "low"}])
    p = pipeline(env, settings)
    routine = receive(p, description="routine", now=0.0, series_uid="1.2.826.0.1.3680043.10.8")
    stat = receive(p, description="STAT head", now=40.0, series_uid="1.2.826.0.1.3680043.10.9")
    assert p.tick(30.0) == [routine]
    assert p.tick(44.0) == []
    assert p.tick(45.0) == [stat], "only stat-ct applies (mode: stop): its 5 s quiet time"
    assert [j.rule for j in p.jobs.for_series(stat)] == ["stat-ct"]
    first = p.jobs.claim(JobKind.INFER, 46.0)
    assert first is not None and first.series_uid == stat, "the stat job runs before the older low one"


# --------------------------------------------------------------------------- study rules

PHASES = {"name": "phases", "when": {"Modality": "CT"}, "run": ["phases"], "priority": "stat",
          "study": {"series": {"arterial": {"SeriesDescription": {"regex": "(?i)arterial"}},
                               "venous": {"SeriesDescription": {"regex": "(?i)venous"}}},
                    "quiet_seconds": 20, "max_wait_seconds": 300}}


def test_study_rule_waits_for_all_series_then_queues_one_job_with_every_input(env: dict[str, Any]) -> None:
    p = pipeline(env, settings_with([PHASES], quiet_seconds=10))
    art = receive(p, description="Arterial 1mm", now=0.0, series_uid="1.2.826.0.1.3680043.10.20")
    native = receive(p, description="Native", now=0.0, series_uid="1.2.826.0.1.3680043.10.21")
    p.tick(10.0)
    assert p.series.get(art)["state"] == SeriesState.COMPLETE
    assert p.series.get(art)["reason"].startswith(WAITING)
    assert p.series.get(native)["state"] == SeriesState.IGNORED
    assert p.jobs.for_series(art) == []
    ven = receive(p, description="Venous 1mm", now=40.0, series_uid="1.2.826.0.1.3680043.10.22")
    p.tick(50.0)  # venous complete, but the study is not quiet for 20 s yet
    assert p.jobs.for_series(art) == []
    p.tick(60.0)
    jobs = p.jobs.for_series(art)
    assert len(jobs) == 1 and jobs[0].rule == "phases" and jobs[0].priority == 10
    assert jobs[0].payload["inputs"] == {"arterial": art, "venous": ven}
    assert jobs[0].payload["study_uid"] == STUDY
    assert p.series.get(art)["state"] == SeriesState.QUEUED
    assert p.series.get(ven)["state"] == SeriesState.IGNORED
    assert "input of study rule 'phases'" in p.series.get(ven)["reason"]
    p.tick(100.0)
    assert len(p.jobs.for_series(art)) == 1, "fired once for the same inputs"


def test_study_rule_records_a_required_series_that_never_came(env: dict[str, Any]) -> None:
    p = pipeline(env, settings_with([PHASES], quiet_seconds=10))
    art = receive(p, description="Arterial", now=0.0, series_uid="1.2.826.0.1.3680043.10.30")
    p.tick(10.0)
    p.tick(299.0)
    assert p.jobs.for_series(art) == []
    p.tick(300.0)
    (job,) = p.jobs.for_series(art)
    assert job.state == JobState.FAILED
    assert job.reason == "study rule 'phases': required series venous never came (waited 300 s; present: arterial)"
    assert job.payload["missing"] == ["venous"]
    row = p.series.get(art)
    assert row["state"] == SeriesState.FAILED and "venous never came" in row["reason"]
    p.tick(400.0)
    assert len(p.jobs.for_series(art)) == 1, "recorded once"
    # The venous phase arrives after all: the rule runs with both.
    ven = receive(p, description="Venous", now=500.0, series_uid="1.2.826.0.1.3680043.10.31")
    p.tick(510.0)
    p.tick(530.0)
    latest = p.jobs.for_series(art)[-1]
    assert latest.state == JobState.QUEUED and latest.payload["inputs"] == {"arterial": art, "venous": ven}


# --------------------------------------------------------------------------- replay


def test_replay_is_a_dry_run_unless_applied(env: dict[str, Any]) -> None:
    assert parse_duration("24h") == 86400 and parse_duration("30m") == 1800 and parse_duration("2") == 2
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("yesterday")
    old = settings_with([{"name": "thin", "when": {"SliceThickness": {"max": 1.5}}, "run": ["lungs"]}],
                        quiet_seconds=10)
    p = pipeline(env, old)
    thin = receive(p, description="thin", now=0.0, series_uid="1.2.826.0.1.3680043.10.40", thickness=1.0)
    thick = receive(p, description="thick", now=0.0, series_uid="1.2.826.0.1.3680043.10.41", thickness=5.0)
    p.tick(10.0)
    assert p.series.get(thick)["state"] == SeriesState.IGNORED
    new = settings_with([{"name": "any-ct", "when": {"Modality": "CT"}, "run": ["lungs"]}])
    items = replay(new, env["db"], env["spool"], since=-1.0, now=20.0)
    by_uid = {i.row["series_uid"]: i for i in items}
    assert by_uid[thick].changed and by_uid[thick].before_rules == () and by_uid[thick].now_rules == ("any-ct",)
    assert by_uid[thin].before_rules == ("thin",) and by_uid[thin].changed
    assert p.series.get(thick)["state"] == SeriesState.IGNORED, "dry run changes nothing"
    replay(new, env["db"], env["spool"], since=-1.0, now=20.0, apply=True)
    assert p.series.get(thick)["state"] == SeriesState.COMPLETE
    p.settings = new
    p.tick(21.0)
    assert [j.rule for j in p.jobs.for_series(thick)] == ["any-ct"]


# --------------------------------------------------------------------------- reload


def test_reload_takes_valid_rules_and_rejects_a_broken_file(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from dicom_node.app import Node

    config = {"node": {"port": 11112}, "storage": {"path": str(tmp_path / "state"), "min_free_mb": 0},
              "http": {"enabled": False},
              "models": {"lungs": {"type": "builtin", "name": "lungs-ct"}},
              "rules": [{"name": "ct", "when": {"Modality": "CT"}, "run": ["lungs"]}]}
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    node = Node(load_settings_text(path.read_text()), config_path=path)
    try:
        assert node.reload_rules_if_changed() is False, "unchanged file: nothing to do"
        config["rules"].append({"name": "mr", "when": {"Modality": "MR"}, "run": ["lungs"], "priority": "stat"})
        path.write_text(yaml.safe_dump(config) + "\n")
        assert node.reload_rules_if_changed() is True
        assert [r.name for r in node.pipeline.settings.rules] == ["ct", "mr"]
        path.write_text(yaml.safe_dump(config).replace("Modality: MR", "Modalty: MR") + "\n\n")
        with caplog.at_level(logging.ERROR):
            assert node.reload_rules_if_changed() is False
        assert "Modalty" in caplog.text and "keeping the current rules" in caplog.text
        assert [r.name for r in node.pipeline.settings.rules] == ["ct", "mr"], "the old rules stay"
        caplog.clear()
        assert node.reload_rules_if_changed() is False and caplog.text == "", "a broken file is reported once"
    finally:
        node.db.close()


# --------------------------------------------------------------------------- command line


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from dicom_node.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0), capsys.readouterr().out


def test_rules_test_and_replay_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {"storage": {"path": str(tmp_path / "state"), "min_free_mb": 0},
              "completion": {"quiet_seconds": 10},
              "models": {"lungs": {"type": "builtin", "name": "lungs-ct"}},
              "rules": [{"name": "thin", "when": {"Modality": "CT", "slice_spacing": {"max": 1.5}},
                         "run": ["lungs"], "priority": "stat", "mode": "stop"},
                        {"name": "rest", "when": {}, "run": ["lungs"], "default": True, "priority": "low"}]}
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load_settings_text(path.read_text())
    db = Database(tmp_path / "state" / "dicom-node.sqlite3")
    p = Pipeline(settings, db, Spool(tmp_path / "state"), _NoRunner(), lambda *a, **k: None)
    thick = receive(p, description="thick", now=1e9, series_uid="1.2.826.0.1.3680043.10.50", thickness=5.0)
    p.tick(1e9 + 10)
    db.close()

    code, out = _cli(["rules", "test", "--config", str(path), str(p.spool.incoming)], capsys)
    assert code == 0
    assert '"thick"  3 instance(s)  (orientation axial, slice_spacing 5.0)' in out
    assert "  no match thin: slice_spacing 5.0 > max 1.5\n" in out
    assert "  MATCH    rest: run lungs (priority low)\n" in out

    code, out = _cli(["rules", "replay", "--config", str(path), "--since", "99999d"], capsys)
    assert code == 0 and "dry run: 0 of 1 series would change" in out, out
    config["rules"][0]["when"]["slice_spacing"]["max"] = 6.0
    path.write_text(yaml.safe_dump(config))
    code, out = _cli(["rules", "replay", "--config", str(path), "--since", "99999d"], capsys)
    assert "  MATCH    thin: run lungs (priority stat, stop)" in out
    assert "  CHANGED: ran rest; would now run thin" in out and "dry run: 1 of 1" in out
    code, out = _cli(["rules", "replay", "--config", str(path), "--since", "99999d", "--apply"], capsys)
    assert "1 series put back to 'complete'" in out
    db = Database(tmp_path / "state" / "dicom-node.sqlite3")
    assert dict(db.query("SELECT state FROM series WHERE series_uid=?", (thick,))[0])["state"] == "complete"
    db.close()
    code, _ = _cli(["rules", "replay", "--config", str(path), "--since", "soon"], capsys)
    assert code == 2


def test_read_ahead_wants_the_receiving_series_the_rules_match_so_far(env: dict[str, Any]) -> None:
    settings = settings_with([
        {"name": "chest", "when": {"SeriesDescription": "Chest", "instance_count": {"min": 5}}, "run": ["lungs"]},
        {"name": "phases", "study": {"series": {"arterial": {"SeriesDescription": "Arterial"},
                                                "venous": {"SeriesDescription": "Venous"}}},
         "when": {"Modality": "CT"}, "run": ["phases"]},
    ])
    p = pipeline(env, settings)
    receive(p, description="Chest", now=100.0, series_uid="1.2.826.0.1.3680043.10.2", slices=3)
    receive(p, description="Chest", now=100.0, series_uid="1.2.826.0.1.3680043.10.3", slices=6)
    receive(p, description="Arterial", now=100.0, series_uid="1.2.826.0.1.3680043.10.4")
    receive(p, description="Scout", now=100.0, series_uid="1.2.826.0.1.3680043.10.5")
    found = {uid: (len(paths), wanted) for uid, paths, wanted in p.receiving()}
    assert found == {
        "1.2.826.0.1.3680043.10.2": (3, False),  # not yet: 3 of the 5 instances the rule needs
        "1.2.826.0.1.3680043.10.3": (6, True),
        "1.2.826.0.1.3680043.10.4": (3, True),  # a series the study rule will wait for
        "1.2.826.0.1.3680043.10.5": (3, False),  # no rule for it
    }
    assert pipeline(env, settings_with([])).receiving()[0][2] is False  # no rules: nothing is read ahead


def test_geometry_read_while_a_series_arrives_is_dropped_once_it_completes(env: dict[str, Any]) -> None:
    """The cache of instance geometry serves the completion summary, then lets the series go (no growth)."""
    p = pipeline(env, settings_with([{"name": "all", "when": {"Modality": "CT", "frames": {"min": 1}},
                                      "run": ["lungs"]}], quiet_seconds=5))  # a fact of every header
    first = receive(p, description="Chest", now=0.0, series_uid="1.2.826.0.1.3680043.10.21", slices=4)
    p.receiving()
    assert len(p._geometry) == 3  # every instance but the first (the summary reads that one whole)
    receive(p, description="Chest", now=3.0, series_uid="1.2.826.0.1.3680043.10.22", slices=4)
    p.receiving()
    assert len(p._geometry) == 6
    assert p.tick(6.0) == [first]  # the first series completes; the second is still within its quiet time
    assert len(p._geometry) == 3  # only the second series' instances are left
    assert p.jobs.for_series(first)


def test_rules_without_a_fact_of_every_header_read_the_first_instance_alone(
        env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """No rule uses slice_spacing, orientation, image_type or frames: one header per series is read, not all."""
    import pydicom

    from dicom_node.rules import summary as summary_module

    reads: list[str] = []
    real = pydicom.dcmread

    def counting(path: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(summary_module.pydicom, "dcmread", counting)
    rules = [{"name": "ct", "when": {"Modality": "CT", "instance_count": {"min": 3},
                                      "any": [{"SeriesDescription": "Chest"}, {"not": {"Modality": "MR"}}]},
              "run": ["lungs"]}]
    p = pipeline(env, settings_with(rules, quiet_seconds=5))
    assert p.needs_every_header() is False
    first = receive(p, description="Chest", now=0.0, series_uid="1.2.826.0.1.3680043.10.31", slices=6)
    reads.clear()  # (the helper's own reads)
    p.receiving()
    assert len(p._geometry) == 0 and len(set(reads)) == 1  # the first instance, for the read-ahead hint
    assert p.tick(6.0) == [first]
    assert p.jobs.for_series(first)  # matched as before
    assert len(set(reads)) == 1, reads

    # The same series with a rule on a fact of every header: every instance's header is read.
    p = pipeline(env, settings_with([{**rules[0], "when": {"Modality": "CT", "slice_spacing": {"max": 5}}}],
                                    quiet_seconds=5))
    assert p.needs_every_header() is True
    second = receive(p, description="Chest", now=10.0, series_uid="1.2.826.0.1.3680043.10.32", slices=6)
    reads.clear()
    p.receiving()
    assert p.tick(16.0) == [second]
    assert len(set(reads)) == 6 and p.jobs.for_series(second)


def test_keys_used_walks_groups_and_study_selectors() -> None:
    from dicom_node.rules.matcher import keys_used, needs_every_header

    rules = settings_with([
        {"name": "a", "when": {"Modality": "CT", "all": [{"BodyPartExamined": "CHEST"}, {"not": {"image_type": {
            "contains": "LOCALIZER"}}}]}, "run": ["lungs"]},
        {"name": "b", "study": {"series": {"arterial": {"SeriesDescription": "Arterial", "any": [
            {"orientation": "axial"}, {"calling_ae": "PACS"}]}}}, "when": {}, "run": ["phases"]},
    ]).rules
    assert keys_used(rules) == {"Modality", "BodyPartExamined", "image_type", "SeriesDescription", "orientation",
                                "calling_ae"}
    assert needs_every_header(rules)
    assert not needs_every_header(settings_with([{"name": "c", "when": {"Modality": "CT", "instance_count": {
        "min": 10}, "calling_ae": "PACS"}, "run": ["lungs"]}]).rules)
    assert not needs_every_header(())
