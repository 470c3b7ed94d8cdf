"""``workers.engine: ray`` on a real local Ray cluster: two machines on loopback with logical GPUs.

``ray.cluster_utils.Cluster`` starts a head and worker raylets as separate
processes (each its own object store, raised above a CT volume).  The node
joins it as a driver, as it joins a hospital's cluster by ``workers.ray.address``.
The model is a ``type: python`` callable whose answer is computable (voxels
above 0 HU) and which records, per call, which process ran it; a delay file
makes it slow enough to be killed mid-job.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from dicom_node.domain import JobKind, JobState
from dicom_node.scheduler.ray_engine import RayEngine, RayRunner
from dicom_node.scheduler.service import Pipeline
from dicom_node.send.deliver import deliver
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from dicom_node.store import Database
from tests.integration.conftest import free_port, node_config, start_node, storescu, wait_until
from tests.phantoms import write_ct_series
from tests.spooled import spool_series
from tests.tools import node_cli, require_tool, unavailable

pytestmark = pytest.mark.integration

MODEL_PY = '''
import os
import time
from pathlib import Path

import numpy as np

MARKS = Path({marks!r})


def above_zero(array, geometry):
    """Voxels above 0 HU; each call leaves a file naming its process, then waits the delay file's seconds."""
    (MARKS / f"call-{{os.getpid()}}-{{time.time_ns()}}").write_text(str(os.getpid()))
    array += 0  # in place, as a function may: the array it gets is writable on a Ray actor too
    delay = MARKS / "delay"
    time.sleep(float(delay.read_text()) if delay.exists() else 0.0)
    return (array > 0).astype(np.uint8)
'''

LABELS = [{"value": 1, "name": "Liver", "snomed": {"value": "10200004", "meaning": "Liver"}}]
OBJECT_STORE = 512 * 1024 * 1024  # above a 300 x 512 x 512 float32 CT (300 MiB)
FAST_FAILURE_DETECTION = {"health_check_period_ms": 500, "health_check_timeout_ms": 1000,
                          "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 500}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    try:
        from ray.cluster_utils import Cluster
    except ImportError:
        unavailable("ray not installed: make test installs the optional extra .[ray]")
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "num_gpus": 1, "object_store_memory": OBJECT_STORE, "_system_config": FAST_FAILURE_DETECTION})
    c.add_node(num_cpus=4, num_gpus=1, object_store_memory=OBJECT_STORE)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def _model_dir(tmp: Path) -> tuple[Path, Path]:
    code, marks = tmp / "code", tmp / "marks"
    code.mkdir(exist_ok=True)
    marks.mkdir(exist_ok=True)
    (code / "cluster_models.py").write_text(MODEL_PY.format(marks=str(marks)))
    return code, marks


def _model(code: Path) -> dict[str, Any]:
    return {"type": "python", "path": str(code), "callable": "cluster_models:above_zero", "labels": LABELS,
            "device": "cpu"}


def _settings(tmp: Path, address: str, pool: dict[str, Any], destinations: dict[str, Any] | None = None) -> Settings:
    code, _ = _model_dir(tmp)
    return Settings.model_validate({
        "storage": {"path": str(tmp / "state"), "min_free_mb": 10},
        "destinations": destinations or {},
        "workers": {"engine": "ray", "ray": {"address": address, "actor_start_timeout_s": 120,
                                             "pools": {"seg": pool}}},
        "models": {"seg": _model(code)},
        "rules": [],
    })


def _calls(marks: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(marks.glob("call-*"))]


def _phantom(i: int) -> np.ndarray:
    hu = np.full((6, 24, 24), -100, np.int16)
    hu[1:5, 4 + i % 8:12 + i % 8, 6:14] = 60
    return hu


def _segments(path: Path, sources: list[Path]) -> np.ndarray:
    """The SEG's mask on every source slice, in slice order (frames the SEG omits are empty)."""
    import highdicom as hd

    seg = hd.seg.segread(path)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in sources]
    return np.asarray(seg.get_pixels_by_source_instance(uids, segment_numbers=[1],
                                                        assert_missing_frames_are_empty=True))[..., 0]


def test_actors_pack_by_gpu_share_and_jobs_spread_over_both_machines(cluster: Any, tmp_path: Path) -> None:
    """8 actors at 0.25 GPU: 4 on each machine's one GPU; 8 jobs run on both machines; SEG voxel-exact."""
    settings = _settings(tmp_path, cluster.address, {"min_actors": 8, "max_actors": 8, "num_gpus": 0.25,
                                                     "num_cpus": 0.5})
    spool, db = Spool(tmp_path / "state"), Database(tmp_path / "state.sqlite3")
    engine = RayEngine(settings)
    engine.connect()
    try:
        engine.pools["seg"].fill()  # what the node's start does in the background
        snap = engine.snapshot()
        actors = snap["models"]["seg"]["actors"]
        assert len(actors) == 8
        per_node: dict[str, int] = {}
        for a in actors:
            per_node[a["node_id"]] = per_node.get(a["node_id"], 0) + 1
            assert a["num_gpus"] == 0.25 and len(a["gpu_ids"]) == 1
        assert sorted(per_node.values()) == [4, 4], per_node
        assert {a["node_id"] for a in actors} == {n["node_id"] for n in snap["nodes"] if n["alive"]}

        (tmp_path / "marks" / "delay").write_text("1.0")
        pipeline = Pipeline(settings, db, spool, RayRunner(engine, spool, settings.outputs), lambda *a, **k: None)
        series = [spool_series(spool, db, f"s{i}", _phantom(i)) for i in range(8)]
        jobs = [pipeline.jobs.enqueue(JobKind.INFER, uid, 100.0, model="seg", payload={"outputs": ["seg"]})
                for uid in series]
        drains = [threading.Thread(target=pipeline.drain_infer, kwargs={
            "runner": RayRunner(engine, spool, settings.outputs)}) for _ in range(8)]
        for t in drains:
            t.start()
        for t in drains:
            t.join(120)
        jobs_per_node: dict[str, int] = {}
        for a in engine.snapshot()["models"]["seg"]["actors"]:
            jobs_per_node[a["node_id"]] = jobs_per_node.get(a["node_id"], 0) + a["jobs"]
        assert sum(jobs_per_node.values()) == 8 and len([n for n in jobs_per_node.values() if n]) == 2, jobs_per_node
        for i, (job_id, uid) in enumerate(zip(jobs, series)):
            job = pipeline.jobs.get(job_id)
            assert job is not None and job.state == JobState.DONE, job
            seg_files = [spool.absolute(p) for p in job.payload["files"]]
            assert len(seg_files) == 1
            sources = sorted((spool.incoming / f"s{i}").glob("*.dcm"))
            np.testing.assert_array_equal(_segments(seg_files[0], sources), (_phantom(i) > 0).astype(np.uint8))
            assert pydicom.dcmread(seg_files[0]).SeriesInstanceUID != uid
        assert len(set(_calls(tmp_path / "marks"))) >= 2  # several actor processes took jobs
    finally:
        engine.close()
        db.close()


def test_model_error_fails_the_job_and_the_actor_goes_on(cluster: Any, tmp_path: Path) -> None:
    code, marks = _model_dir(tmp_path)
    (code / "cluster_models.py").write_text((code / "cluster_models.py").read_text() + '''

def broken(array, geometry):
    raise ValueError("weights do not fit this input")
''')
    settings = Settings.model_validate({
        "storage": {"path": str(tmp_path / "state"), "min_free_mb": 10},
        "workers": {"engine": "ray", "ray": {"address": cluster.address, "default_pool": {
            "min_actors": 0, "max_actors": 1, "num_cpus": 0.5}}},
        "models": {"seg": _model(code), "broken": {**_model(code), "callable": "cluster_models:broken"}},
        "rules": [],
    })
    spool, db = Spool(tmp_path / "state"), Database(tmp_path / "state.sqlite3")
    engine = RayEngine(settings)
    engine.connect()
    try:
        pipeline = Pipeline(settings, db, spool, RayRunner(engine, spool, settings.outputs), lambda *a, **k: None)
        uid = spool_series(spool, db, "s", _phantom(0))
        bad = pipeline.jobs.enqueue(JobKind.INFER, uid, 100.0, model="broken", payload={"outputs": ["seg"]})
        good = pipeline.jobs.enqueue(JobKind.INFER, uid, 100.0, model="seg", payload={"outputs": ["seg"]})
        assert pipeline.drain_infer(lambda: 101.0) == 2
        failed = pipeline.jobs.get(bad)
        assert failed is not None and failed.state == JobState.FAILED and failed.attempts == 1
        assert "ValueError: weights do not fit this input" in failed.reason  # the model's own error, unwrapped
        done = pipeline.jobs.get(good)
        assert done is not None and done.state == JobState.DONE
        assert len(engine.snapshot()["models"]["broken"]["actors"]) == 1  # the actor that raised serves on
    finally:
        engine.close()
        db.close()


def _storescp(tmp: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    exe = require_tool("storescp")
    port, received = free_port(), tmp / "pacs"
    received.mkdir()
    proc = subprocess.Popen([exe, "-aet", "PACS", "-od", str(received), "-uf", str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(up, 30, "storescp to listen")
    return proc, port, received


def _received(received: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in received.iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out.setdefault(str(ds.Modality), []).append(str(ds.SOPInstanceUID))
    return out


def test_machine_lost_mid_job_runs_it_on_another_and_the_pacs_gets_one_seg(cluster: Any, tmp_path: Path) -> None:
    """The only machine that may run the model dies mid-job; a replacement joins; the job runs there."""
    pacs, pacs_port, received = _storescp(tmp_path)
    dest = {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}}
    settings = _settings(tmp_path, cluster.address, {"min_actors": 1, "max_actors": 1, "num_gpus": 0,
                                                     "num_cpus": 1, "resources": {"spare": 1}}, dest)
    marks = tmp_path / "marks"
    (marks / "delay").write_text("30")
    first = cluster.add_node(num_cpus=2, num_gpus=0, resources={"spare": 1}, object_store_memory=OBJECT_STORE)
    spool, db = Spool(tmp_path / "state"), Database(tmp_path / "state.sqlite3")
    engine = RayEngine(settings)
    engine.connect()
    pipeline = Pipeline(settings, db, spool, RayRunner(engine, spool, settings.outputs), deliver)
    engine.on_placed = lambda job, where: pipeline.jobs.note_running(job, where, time.time())
    replacement = None
    try:
        uid = spool_series(spool, db, "s", _phantom(3))
        job_id = pipeline.jobs.enqueue(JobKind.INFER, uid, time.time(), model="seg",
                                       payload={"outputs": ["seg"], "destinations": ["pacs"]})
        drain = threading.Thread(target=pipeline.drain_infer)
        drain.start()
        wait_until(lambda: _calls(marks), 120, "the model to start on the first machine")
        running = pipeline.jobs.get(job_id)
        assert running is not None and running.state == JobState.RUNNING
        assert running.reason.startswith("on Ray actor seg-") and "GPU" not in running.reason
        (marks / "delay").write_text("0")
        cluster.remove_node(first, allow_graceful=False)  # the machine is gone mid-job
        replacement = cluster.add_node(num_cpus=2, num_gpus=0, resources={"spare": 1},
                                       object_store_memory=OBJECT_STORE)
        drain.join(180)
        assert not drain.is_alive()
        job = pipeline.jobs.get(job_id)
        assert job is not None and job.state == JobState.DONE, job
        assert job.attempts == 2
        calls = _calls(marks)
        assert len(calls) == 2 and calls[0] != calls[1]  # run again by another process, on the new machine
        assert pipeline.drain_send() == 1
        got = _received(received)
        assert len(got.get("SEG", [])) == 1, got
    finally:
        engine.close()
        db.close()
        pacs.terminate()
        pacs.wait(10)
        if replacement is not None:
            cluster.remove_node(replacement)


def test_node_killed_mid_job_restarts_and_resolves_the_running_job(cluster: Any, tmp_path: Path) -> None:
    """SIGKILL the node while its job runs on an actor; the restarted node resolves the job; one SEG arrives."""
    import ray

    pacs, pacs_port, received = _storescp(tmp_path)
    code, marks = _model_dir(tmp_path)
    (marks / "delay").write_text("20")
    config = node_config(tmp_path, destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1",
                                                          "port": pacs_port}},
                         quiet_seconds=1.0)
    config["models"] = {"seg": _model(code)}
    config["rules"][0]["run"] = ["seg"]
    config["rules"][0]["outputs"] = ["seg"]
    config["workers"] = {"engine": "ray", "ray": {"address": cluster.address, "max_jobs": 2,
                                                  "pools": {"seg": {"min_actors": 1, "max_actors": 1,
                                                                    "num_cpus": 1}}}}
    files = write_ct_series(_phantom(5), (2.0, 1.0, 1.0), tmp_path / "ct")
    node = start_node(tmp_path / "n1", config)
    ray.init(address=cluster.address, namespace="dicom-node", logging_level="WARNING")
    try:
        out = storescu(node.port, files, "DICOMNODE")
        assert out.returncode == 0, out.stderr

        def running_job() -> dict[str, Any] | None:
            for s in node.status_json():
                for j in s["jobs"]:
                    if j["kind"] == "infer" and j["state"] == "running" and j["reason"].startswith("on Ray actor"):
                        return j
            return None

        job = wait_until(running_job, 120, "the job to run on a Ray actor")
        wait_until(lambda: _calls(marks), 60, "the model to start")
        actor_name = job["reason"].split()[3]
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(30)

        def actor_gone() -> bool:
            try:
                ray.get_actor(actor_name, namespace="dicom-node")
            except ValueError:
                return True
            except AssertionError:  # named still, its class gone with the killed driver: Ray is ending it
                return False
            return False

        wait_until(actor_gone, 60, "Ray to end the killed node's actor")
        (marks / "delay").write_text("0")
        node = start_node(tmp_path / "n1", config)
        wait_until(lambda: _received(received).get("SEG"), 180, "the SEG in the PACS")

        def settled() -> bool:
            jobs = [j for s in node.status_json() for j in s["jobs"]]
            return bool(jobs) and all(j["state"] == "done" for j in jobs)

        wait_until(settled, 60, "every job done")
        jobs = [j for s in node.status_json() for j in s["jobs"] if j["kind"] == "infer"]
        assert len(jobs) == 1 and jobs[0]["id"] == job["id"] and jobs[0]["attempts"] == 2
        assert len(_received(received)["SEG"]) == 1
        assert "was running on Ray actor" in node.log()
        text = node_cli("status", "--config", str(node.config_path)).stdout
        assert f"Ray cluster at {cluster.address}: connected" in text
        assert "model seg: 1 actor(s) (min 1, max 1), 0 job(s) waiting, 0 running" in text
        import requests

        metrics = requests.get(f"http://127.0.0.1:{config['http']['port']}/metrics", timeout=10).text
        assert 'dicomnode_ray_actors{busy="false",model="seg"' in metrics
        assert 'dicomnode_ray_nodes{alive="true"} ' in metrics
        page = requests.get(f"http://127.0.0.1:{config['http']['port']}/status", timeout=10).text
        assert "Inference cluster" in page and "model seg: 1 actor(s)" in page
    finally:
        ray.shutdown()
        node.stop()
        pacs.terminate()
        pacs.wait(10)


def test_engine_ray_without_ray_installed_fails_check_config_with_the_install_command(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(json.dumps({"workers": {"engine": "ray", "ray": {"address": "10.0.0.5:6379"}}}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    python = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"
    # As if the extra were not installed: the import system finds no ray.
    out = subprocess.run([str(python), "-c", "import sys; sys.modules['ray'] = None\n"
                          "from dicom_node.cli import main; main(['check-config', sys.argv[1]])", str(config)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out
    assert "workers.engine" in out.stderr and "pip install -c constraints.txt -e '.[ray]'" in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 2, out.stderr


def test_a_pool_no_machine_can_place_fails_its_job_saying_what_it_asked_for(cluster: Any, tmp_path: Path) -> None:
    code, _ = _model_dir(tmp_path)
    settings = Settings.model_validate({
        "storage": {"path": str(tmp_path / "state"), "min_free_mb": 10},
        "workers": {"engine": "ray", "ray": {"address": cluster.address, "actor_start_timeout_s": 3,
                                             "pools": {"seg": {"min_actors": 0, "num_gpus": 8}}}},
        "models": {"seg": _model(code)}, "rules": []})
    spool, db = Spool(tmp_path / "state"), Database(tmp_path / "state.sqlite3")
    engine = RayEngine(settings)
    engine.connect()
    try:
        pipeline = Pipeline(settings, db, spool, RayRunner(engine, spool, settings.outputs), lambda *a, **k: None)
        job_id = pipeline.jobs.enqueue(JobKind.INFER, spool_series(spool, db, "s", _phantom(0)), 100.0, model="seg",
                                       payload={"outputs": ["seg"]})
        assert pipeline.drain_infer(lambda: 101.0) == 1
        job = pipeline.jobs.get(job_id)
        assert job is not None and job.state == JobState.FAILED
        assert "no Ray machine offered 8 GPU, 1 CPU within 3 s (workers.ray.pools.seg)" in job.reason
    finally:
        engine.close()
        db.close()


def test_a_cluster_that_does_not_answer_stops_the_start_with_one_line(tmp_path: Path) -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        unavailable("ray not installed: make test installs the optional extra .[ray]")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = node_config(tmp_path)
    config["workers"] = {"engine": "ray", "ray": {"address": f"127.0.0.1:{port}", "connect_timeout_s": 5}}
    path = tmp_path / "node.yaml"
    path.write_text(json.dumps(config))
    out = node_cli("serve", "--config", str(path), timeout=120)
    assert out.returncode == 2, out
    lines = [line for line in out.stderr.splitlines() if line.startswith("cannot start")]
    assert lines == [f"cannot start: workers.ray.address: cannot join the Ray cluster at 127.0.0.1:{port}: "
                     "no answer within 5 s"], out.stderr


def test_a_model_with_its_own_interpreter_runs_in_that_interpreter_under_its_actor(cluster: Any,
                                                                                   tmp_path: Path) -> None:
    """``environment: PATH``: the actor starts that interpreter's model process, as a local worker does."""
    code, marks = _model_dir(tmp_path)
    python = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"
    settings = Settings.model_validate({
        "storage": {"path": str(tmp_path / "state"), "min_free_mb": 10},
        "workers": {"engine": "ray", "ray": {"address": cluster.address,
                                             "pools": {"seg": {"min_actors": 1, "max_actors": 1}}}},
        "models": {"seg": {**_model(code), "environment": str(python)}}, "rules": []})
    spool, db = Spool(tmp_path / "state"), Database(tmp_path / "state.sqlite3")
    engine = RayEngine(settings)
    engine.connect()
    try:
        pipeline = Pipeline(settings, db, spool, RayRunner(engine, spool, settings.outputs), lambda *a, **k: None)
        job_id = pipeline.jobs.enqueue(JobKind.INFER, spool_series(spool, db, "s", _phantom(2)), 100.0,
                                       model="seg", payload={"outputs": ["seg"]})
        assert pipeline.drain_infer(lambda: 101.0) == 1
        job = pipeline.jobs.get(job_id)
        assert job is not None and job.state == JobState.DONE, job
        assert any(n.startswith("model ran with") and str(python) in n for n in job.payload["notes"])
        actor_pid = engine.pools["seg"].actors[0].info["pid"]
        (model_pid,) = _calls(marks)
        assert model_pid != actor_pid  # the model ran in the environment's process, the actor's child
        assert Path(f"/proc/{model_pid}/exe").resolve() == python.resolve()
    finally:
        engine.close()
        db.close()
