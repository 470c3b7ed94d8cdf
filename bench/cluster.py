"""``workers.engine: ray``: throughput over 1 vs 2 machines, and the per-job overhead Ray adds.

``python -m bench cluster [--series 40] [--cost 2.0] [--overhead-jobs 20]``

- Throughput: ``--series`` CT series (32 x 128 x 128) through a local Ray
  cluster (``ray.cluster_utils.Cluster``) of one, then two simulated
  machines, each a raylet with 2 logical CPUs and its own object store; the
  model is a CPU ``type: python`` model with a fixed per-series cost (a
  sleep of ``--cost`` s, so the simulated machines do not compete for this
  machine's real cores), one actor per logical CPU.  The node's side (load,
  SEG encode) runs as it does in production, in the node's process.
  Target: 2 machines >= 1.8x the throughput of 1.  The node's side runs in
  one process (threads): its load + encode time per job (printed) caps the
  cluster's throughput whatever the machines; a cheaper model than that
  scales less.
- Overhead: the same job (64 x 256 x 256 CT, a model of no cost) run
  ``--overhead-jobs`` times by a local worker process (``engine: local``,
  the default) and by one warm Ray actor; the difference of the medians is
  what Ray adds per job (object store round trip, actor call).  Target < 100 ms.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL_PY = '''
import time

import numpy as np


def fixed_cost(array, geometry):
    time.sleep({cost})
    return (array > 0).astype(np.uint8)


def no_cost(array, geometry):
    return (array > 0).astype(np.uint8)
'''

LABELS = [{"value": 1, "name": "Liver", "snomed": {"value": "10200004", "meaning": "Liver"}}]


def _phantom(shape: tuple[int, int, int], i: int) -> np.ndarray:
    hu = np.full(shape, -100, np.int16)
    z, y, x = shape
    hu[z // 4: 3 * z // 4, y // 4 + i % 8: y // 2 + i % 8, x // 4: x // 2] = 60
    return hu


def _settings(tmp: Path, code: Path, engine: str, address: str | None, pool: dict[str, Any]) -> Any:
    from dicom_node.settings import Settings

    model = {"type": "python", "path": str(code), "labels": LABELS, "device": "cpu"}
    workers: dict[str, Any] = {"engine": engine, "infer": 1}
    if engine == "ray":
        workers["ray"] = {"address": address, "max_jobs": 16, "default_pool": pool}
    return Settings.model_validate({
        "storage": {"path": str(tmp / "state"), "min_free_mb": 10}, "workers": workers,
        "models": {"fixed": {**model, "callable": "bench_models:fixed_cost"},
                   "free": {**model, "callable": "bench_models:no_cost"}},
        "rules": []})


def _node(tmp: Path, settings: Any) -> tuple[Any, Any, Any]:
    from dicom_node.scheduler.service import Pipeline
    from dicom_node.spool import Spool
    from dicom_node.store import Database

    spool, db = Spool(tmp / "state"), Database(tmp / "state.sqlite3")
    return spool, db, lambda runner: Pipeline(settings, db, spool, runner, lambda *a, **k: None)


def throughput(tmp: Path, code: Path, machines: int, series: int, cost: float) -> float:
    """Seconds for ``series`` jobs through a cluster of ``machines`` simulated machines."""
    import ray
    from ray.cluster_utils import Cluster

    from dicom_node.domain import JobKind, JobState
    from dicom_node.scheduler.ray_engine import RayEngine, RayRunner
    from tests.spooled import spool_series

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 256 << 20})
    for _ in range(machines - 1):
        cluster.add_node(num_cpus=2, object_store_memory=256 << 20)
    cluster.wait_for_nodes()
    work = tmp / f"throughput-{machines}"
    settings = _settings(work, code, "ray", cluster.address, {"min_actors": 2 * machines,
                                                              "max_actors": 2 * machines, "num_cpus": 1})
    spool, db, pipeline_for = _node(work, settings)
    engine = RayEngine(settings)
    try:
        engine.connect()
        engine.pools["fixed"].fill()
        uids = [spool_series(spool, db, f"s{i}", _phantom((32, 128, 128), i)) for i in range(series)]
        pipeline = pipeline_for(RayRunner(engine, spool, settings.outputs))
        jobs = [pipeline.jobs.enqueue(JobKind.INFER, uid, 0.0, model="fixed", payload={"outputs": ["seg"]})
                for uid in uids]
        drains = [threading.Thread(target=pipeline.drain_infer,
                                   kwargs={"runner": RayRunner(engine, spool, settings.outputs)})
                  for _ in range(settings.workers.ray.max_jobs)]
        t0 = time.perf_counter()
        for t in drains:
            t.start()
        for t in drains:
            t.join()
        seconds = time.perf_counter() - t0
        states = {pipeline.jobs.get(j).state for j in jobs}  # type: ignore[union-attr]
        if states != {JobState.DONE}:
            raise RuntimeError(f"jobs not all done: {states}")
        node_side = [sum(pipeline.jobs.get(j).payload["seconds"].get(k, 0.0)  # type: ignore[union-attr]
                         for k in ("load", "encode")) for j in jobs]
        per_node: dict[str, int] = {}
        for a in engine.snapshot()["models"]["fixed"]["actors"]:
            per_node[a["node_id"][:8]] = per_node.get(a["node_id"][:8], 0) + a["jobs"]
        print(f"  {machines} machine(s), {2 * machines} actors: {series} series in {seconds:.2f} s "
              f"({series / seconds:.2f} series/s); jobs per machine {sorted(per_node.values())}; node side "
              f"(load + encode, wall time of threads sharing the node's process) "
              f"{statistics.mean(node_side) * 1000:.0f} ms/job")
        return seconds
    finally:
        engine.close()
        db.close()
        ray.shutdown()
        cluster.shutdown()


def _time_jobs(pipeline: Any, uid: str, jobs: int) -> list[float]:
    from dicom_node.domain import JobKind, JobState

    times = []
    for _ in range(jobs + 1):  # the first loads the model (warm-up), not counted
        job = pipeline.jobs.enqueue(JobKind.INFER, uid, 0.0, model="free", payload={"outputs": ["seg"]})
        t0 = time.perf_counter()
        pipeline.drain_infer(max_jobs=1)
        times.append(time.perf_counter() - t0)
        if pipeline.jobs.get(job).state != JobState.DONE:
            raise RuntimeError(f"job failed: {pipeline.jobs.get(job).reason}")
    return times[1:]


def overhead(tmp: Path, code: Path, jobs: int) -> tuple[float, float]:
    """Median seconds per job: local worker process, then one warm Ray actor."""
    import ray
    from ray.cluster_utils import Cluster

    from dicom_node.scheduler.ray_engine import RayEngine, RayRunner
    from dicom_node.scheduler.worker import WorkerProcess
    from tests.spooled import spool_series

    shape = (64, 256, 256)
    local_settings = _settings(tmp / "local", code, "local", None, {})
    spool, db, pipeline_for = _node(tmp / "local", local_settings)
    uid = spool_series(spool, db, "ct", _phantom(shape, 0))
    worker = WorkerProcess(local_settings)
    worker.start()
    try:
        local = _time_jobs(pipeline_for(worker), uid, jobs)
    finally:
        worker.stop()
        db.close()

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 512 << 20})
    ray_settings = _settings(tmp / "ray", code, "ray", cluster.address, {"min_actors": 1, "max_actors": 1,
                                                                        "num_cpus": 1})
    spool, db, pipeline_for = _node(tmp / "ray", ray_settings)
    uid = spool_series(spool, db, "ct", _phantom(shape, 0))
    engine = RayEngine(ray_settings)
    try:
        engine.connect()
        engine.pools["free"].fill()
        on_ray = _time_jobs(pipeline_for(RayRunner(engine, spool, ray_settings.outputs)), uid, jobs)
    finally:
        engine.close()
        db.close()
        ray.shutdown()
        cluster.shutdown()
    return statistics.median(local), statistics.median(on_ray)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench cluster")
    parser.add_argument("--series", type=int, default=40)
    parser.add_argument("--cost", type=float, default=2.0, help="fixed model seconds per series")
    parser.add_argument("--overhead-jobs", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        import ray
    except ImportError:
        print("ray is not installed: .venv/bin/pip install -c constraints.txt -e '.[ray]' (make bench does)")
        return 2
    print(f"machine: {platform.node()}, {os.cpu_count()} cores; ray {ray.__version__}; simulated machines are "
          "raylets on this one (2 logical CPUs each)")
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp_name:
        tmp = Path(tmp_name)
        code = tmp / "code"
        code.mkdir()
        (code / "bench_models.py").write_text(MODEL_PY.format(cost=args.cost))
        print(f"throughput: {args.series} series of 32x128x128, model cost {args.cost:.2f} s each, SEG encoded "
              "on the node")
        one = throughput(tmp, code, 1, args.series, args.cost)
        two = throughput(tmp, code, 2, args.series, args.cost)
        print(f"  2 machines / 1 machine throughput: {one / two:.2f}x (target >= 1.8x)")
        print(f"overhead: 64x256x256 CT, model of no cost, median of {args.overhead_jobs} jobs each")
        local, on_ray = overhead(tmp, code, args.overhead_jobs)
        print(f"  local worker process (engine: local) {local * 1000:.0f} ms/job; Ray actor (engine: ray) "
              f"{on_ray * 1000:.0f} ms/job; Ray adds {(on_ray - local) * 1000:.0f} ms/job (target < 100 ms)")
    return 0
