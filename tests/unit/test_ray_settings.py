"""``workers.engine: ray`` configuration, GPU shares and the cluster as operators read it (no Ray needed)."""

from __future__ import annotations

import pytest

from dicom_node.scheduler.ray_engine import _gpu_fraction, describe_cluster
from tests.unit.test_settings import BASE, assert_problem, problem

RAY = BASE + """\
workers:
  engine: ray
  ray:
    address: 10.0.0.5:6379
    pools:
      lungs: {min_actors: 1, max_actors: 4, num_gpus: 0.25}
"""


def test_a_ray_engine_config_loads() -> None:
    from dicom_node.settings import load_settings_text

    settings = load_settings_text(RAY, source="node.yaml")
    ray = settings.workers.ray
    assert settings.workers.engine == "ray" and ray.address == "10.0.0.5:6379"
    assert ray.pool("lungs").num_gpus == 0.25 and ray.pool("lungs").max_actors == 4
    assert ray.pool("other").num_gpus == "auto"  # the default pool


def test_engine_ray_needs_an_address() -> None:
    message = problem(RAY.replace("    address: 10.0.0.5:6379\n", ""))
    assert_problem(message, 17, "workers.ray.address", "engine ray needs the address of the cluster's head")


def test_a_pool_names_a_configured_model() -> None:
    message = problem(RAY.replace("      lungs: {", "      liver: {"))
    assert_problem(message, 20, "workers.ray.pools.liver", "pool for unknown model 'liver' (models: lungs)")


def test_min_actors_above_max_is_refused() -> None:
    message = problem(RAY.replace("min_actors: 1, max_actors: 4", "min_actors: 5, max_actors: 4"))
    assert "min_actors (5) must be <= max_actors (4)" in message and "workers.ray.pools.lungs" in message


@pytest.mark.parametrize(("peak_gib", "total_gib", "share"), [
    (0, 80, 1.0),       # not measured yet: a whole GPU
    (6, 80, 0.125),     # 7.5 GiB with the margin: one eighth
    (20, 80, 0.375),    # 25 GiB: three eighths
    (70, 80, 1.0),      # too big to share
])
def test_gpu_share_follows_the_measured_peak(peak_gib: float, total_gib: float, share: float) -> None:
    assert _gpu_fraction(peak_gib * 2**30, total_gib * 2**30) == share


def test_cluster_lines_say_where_each_actor_runs_and_what_waits() -> None:
    snapshot = {"address": "10.0.0.5:6379", "connected": True, "at": 100.0,
                "nodes": [{"node_id": "a" * 56, "ip": "10.0.0.5", "hostname": "gpu1", "alive": True, "cpus": 32,
                           "gpus": 1}],
                "models": {"lungs": {"min_actors": 1, "max_actors": 4, "starting": 0, "waiting": 2, "actors": [
                    {"name": "lungs-1234abcd-00000001", "node_id": "a" * 56, "where": "gpu1 (10.0.0.5, GPU 0)",
                     "busy": True, "jobs": 7, "num_gpus": 0.25, "gpu_ids": ["0"], "peak_gpu_bytes": 3 * 2**30,
                     "gpu_total_bytes": 80 * 2**30}]}}}
    lines = describe_cluster(snapshot, {"lungs": {"waiting": 3, "running": 1}}, now=104.0)
    assert lines[0] == "Ray cluster at 10.0.0.5:6379: connected, as seen 4 s ago"
    assert lines[1] == "  machine gpu1 (10.0.0.5): alive, 32 CPU, 1 GPU"
    assert lines[2] == "  model lungs: 1 actor(s) (min 1, max 4), 3 job(s) waiting, 1 running"
    assert lines[3] == ("    lungs-1234abcd-00000001 on gpu1 (10.0.0.5, GPU 0): busy, 7 job(s), 0.25 GPU, "
                        "peak 3072 of 81920 MiB")
    assert describe_cluster(None, {})[0].startswith("Ray cluster: not seen yet")
