"""``workers.engine: ray``: each model runs as long-lived Ray actors on an existing cluster.

What runs where:

- On this node (the Ray driver): receive, state (SQLite stays the truth),
  loading the series into a volume, encoding SEG / SR / overlays / PDF, and
  sending.  Each job is run by a :class:`RayRunner` in a thread of the node's
  scheduler, as :func:`~dicom_node.scheduler.pipeline.run_infer` runs in a
  local worker process.
- On the cluster: the model's ``predict`` in a :class:`inference.actor.ModelActor`,
  placed by its pool's resources (``num_gpus``, fractional to share a GPU;
  ``num_cpus``; custom resources), kept warm between jobs.  The volume
  travels through Ray's object store and the label map comes back the same way.

A job handed to an actor is ``running`` with the actor's id and machine in
its reason.  An actor or machine lost mid-job re-queues the job (counted as
an attempt, failed after ``max_infer_attempts``); the actor is replaced.
Actors belong to this node's process (not detached): when the node dies,
Ray ends them, and the next start re-queues the jobs they were running
(:meth:`RayEngine.resolve_interrupted`).  Result UIDs are deterministic, so a
re-run never puts a second copy into the PACS.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.errors import JobInterrupted, StartupError
from dicom_node.scheduler.pipeline import InferOutcome, InferTask, ProducedObject, run_infer
from dicom_node.settings import Settings
from dicom_node.settings.operations import RayPoolSettings
from dicom_node.spool import Spool
from inference import wire
from inference.types import Model, Prediction, Volume

logger = logging.getLogger(__name__)

#: A job's reason while an actor runs it; ``resolve_interrupted`` finds these after a crash.
ON_ACTOR = "on Ray actor "
#: The cluster as this node last saw it, in the state directory (``dicom-node status`` reads it).
SNAPSHOT = "ray-cluster.json"


class ActorLost(JobInterrupted):
    """The actor, its worker process or its machine ended while it ran the job: the job is queued again."""


@dataclass
class _Actor:
    handle: Any
    info: dict[str, Any]
    name: str
    num_gpus: float
    busy: bool = False
    jobs: int = 0
    started: float = field(default_factory=time.time)

    @property
    def where(self) -> str:
        gpus = f", GPU {','.join(self.info['gpu_ids'])}" if self.info.get("gpu_ids") else ""
        return f"{self.info['hostname']} ({self.info['ip']}{gpus})"


class _Pool:
    """The actors of one model: started up to ``max_actors`` while jobs wait, replaced when lost."""

    def __init__(self, engine: RayEngine, model: str, conf: RayPoolSettings) -> None:
        self.engine = engine
        self.model = model
        self.conf = conf
        self.actors: list[_Actor] = []
        self.starting = 0
        self.waiting = 0
        self.cond = threading.Condition()

    def acquire(self, timeout_s: float) -> _Actor:
        """A free actor (the one with fewest jobs, so work spreads over machines), starting one if allowed."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            self.waiting += 1
            try:
                while True:
                    free = [a for a in self.actors if not a.busy]
                    if free:
                        actor = min(free, key=lambda a: a.jobs)
                        actor.busy = True
                        return actor
                    if len(self.actors) + self.starting < self.conf.max_actors:
                        self.starting += 1
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"model {self.model}: no actor free within {timeout_s:.0f} s "
                                           f"({len(self.actors)} busy, max_actors {self.conf.max_actors})")
                    self.cond.wait(min(left, 5.0))
            finally:
                self.waiting -= 1
        try:
            actor = self.engine.start_actor(self.model, self.conf)
        finally:
            with self.cond:
                self.starting -= 1
        with self.cond:
            actor.busy = True
            self.actors.append(actor)
        self.engine.changed()
        return actor

    def release(self, actor: _Actor) -> None:
        with self.cond:
            actor.busy = False
            actor.jobs += 1
            self.cond.notify()

    def drop(self, actor: _Actor, why: str) -> None:
        """Forget (and kill) an actor that timed out or was lost; the next job starts a new one."""
        with self.cond:
            if actor in self.actors:
                self.actors.remove(actor)
            self.cond.notify()
        logger.warning("Model %s: Ray actor %s on %s dropped: %s", self.model, actor.info["actor_id"][:12],
                       actor.where, why)
        self.engine.kill(actor)
        self.engine.changed()

    def fill(self) -> None:
        """Start actors until ``min_actors`` (at start, and after a loss)."""
        while True:
            with self.cond:
                if len(self.actors) + self.starting >= self.conf.min_actors:
                    return
                self.starting += 1
            try:
                actor = self.engine.start_actor(self.model, self.conf)
            except Exception as exc:
                logger.error("Model %s: a Ray actor could not be started: %s", self.model, exc)
                return
            finally:
                with self.cond:
                    self.starting -= 1
            with self.cond:
                self.actors.append(actor)
                self.cond.notify()
            self.engine.changed()


def _gpu_fraction(peak_bytes: float, total_bytes: float) -> float:
    """The share of a GPU a model needs by its measured peak (+25 %), rounded up to eighths."""
    if peak_bytes <= 0 or total_bytes <= 0:
        return 1.0
    return min(1.0, math.ceil(peak_bytes * 1.25 / total_bytes * 8) / 8)


class RayEngine:
    """The node's connection to a Ray cluster and the actor pools of its models.

    Parameters
    ----------
    settings:
        The node's settings (``workers.ray``, the models).
    on_placed:
        ``(job_id, reason)``: called when an actor takes a job (the job's
        reason shows where it runs).
    """

    def __init__(self, settings: Settings, on_placed: Callable[[int, str], None] = lambda job, text: None) -> None:
        self.settings = settings
        self.conf = settings.workers.ray
        self.on_placed = on_placed
        self.state_dir = settings.storage.resolved_path()
        self.pools = {name: _Pool(self, name, self.conf.pool(name)) for name in settings.models}
        self._remote: Any = None
        self._ray: Any = None
        self._lock = threading.Lock()
        self._peaks: dict[str, tuple[float, float]] = {}  # model -> (peak bytes, GPU total bytes)
        self.connected = False
        self.node_id = uuid.uuid4().hex[:8]  # this node process: its actors' names carry it

    # -- lifecycle -----------------------------------------------------------
    def connect(self) -> None:
        """Join the cluster as a driver; one line naming ``workers.ray.address`` when it cannot."""
        try:
            import ray as ray_module
        except ImportError:
            raise StartupError("workers.engine: ray is not installed: .venv/bin/pip install -c constraints.txt "
                               "-e '.[ray]'") from None
        ray: Any = ray_module  # used untyped: ray's own overloads are not what this module checks
        self._ray = ray
        address = self.conf.address
        outcome: dict[str, Any] = {}

        def init() -> None:
            try:
                ray.init(address=address, namespace=self.conf.namespace, logging_level=logging.WARNING,
                         log_to_driver=True, include_dashboard=False, ignore_reinit_error=True)
                outcome["ok"] = True
            except Exception as exc:  # noqa: BLE001 - reported as the start-up error
                outcome["error"] = exc

        thread = threading.Thread(target=init, name="ray-connect", daemon=True)
        thread.start()
        thread.join(self.conf.connect_timeout_s)
        if not outcome.get("ok"):
            why = outcome.get("error") or f"no answer within {self.conf.connect_timeout_s:.0f} s"
            first = str(why).strip().splitlines()[0] if str(why).strip() else type(why).__name__
            raise StartupError(f"workers.ray.address: cannot join the Ray cluster at {address}: {first}")
        from inference.actor import ModelActor

        # One call at a time per actor: a model holds its GPU memory for one volume.
        self._remote = ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=1)(ModelActor)
        self.connected = True
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        logger.info("Ray: joined the cluster at %s (%d machine(s), %s GPU(s), %s CPU(s))", address, len(nodes),
                    _fmt(sum(n["Resources"].get("GPU", 0) for n in nodes)),
                    _fmt(sum(n["Resources"].get("CPU", 0) for n in nodes)))

    def warm(self) -> None:
        """Start each pool's ``min_actors`` (in the background: the node serves meanwhile)."""
        def fill_all() -> None:
            for pool in self.pools.values():
                if self.connected:
                    pool.fill()
        threading.Thread(target=fill_all, name="ray-warm", daemon=True).start()

    def close(self) -> None:
        """End every actor and leave the cluster."""
        if not self.connected:
            return
        self.connected = False
        for pool in self.pools.values():
            with pool.cond:
                actors, pool.actors = list(pool.actors), []
            for actor in actors:
                self.kill(actor)
        try:
            self._ray.shutdown()
        except Exception:  # noqa: BLE001
            logger.exception("Ray: shutdown failed")
        self.changed()

    def resolve_interrupted(self, jobs: list[Any]) -> None:
        """At start: jobs an earlier node process left running on Ray actors.

        Their actors were this node's: Ray ends them with the process that
        owned them.  One that is still alive (its process is being torn down)
        is killed, so it does not hold a GPU; the jobs are then queued again
        by the job store's recovery.
        """
        for job in jobs:
            name = job.reason[len(ON_ACTOR):].split(" ", 1)[0] if job.reason.startswith(ON_ACTOR) else ""
            if not name:
                continue
            try:
                handle = self._ray.get_actor(name, namespace=self.conf.namespace)
            except ValueError:
                logger.warning("Job %d was running on Ray actor %s when the node stopped; the actor ended with "
                               "it; the job is queued again", job.id, name)
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. its class went with the driver that defined it
                logger.warning("Job %d was running on Ray actor %s when the node stopped; the actor cannot be "
                               "reached (%s: %s); Ray ends it with its owner; the job is queued again", job.id, name,
                               type(exc).__name__, exc)
                continue
            self._ray.kill(handle, no_restart=True)
            logger.warning("Job %d was running on Ray actor %s when the node stopped; actor killed; the job is "
                           "queued again", job.id, name)

    # -- actors --------------------------------------------------------------
    def num_gpus(self, model: str, conf: RayPoolSettings) -> float:
        if conf.num_gpus != "auto":
            return float(conf.num_gpus)
        spec = self.settings.models.get(model)
        if str(getattr(spec, "device", "auto")) == "cpu":
            return 0.0
        gpus = sum(n["Resources"].get("GPU", 0) for n in self._ray.nodes() if n.get("Alive"))
        if not gpus:
            return 0.0  # a CPU-only cluster: the model runs on the CPU there, as it would on one host
        peak, total = self._peaks.get(model, (0.0, 0.0))
        return _gpu_fraction(peak, total)

    def start_actor(self, model: str, conf: RayPoolSettings) -> _Actor:
        """Place one actor of ``model`` and wait until its model is loaded."""
        ray = self._ray
        gpus = self.num_gpus(model, conf)
        name = f"{model}-{self.node_id}-{uuid.uuid4().hex[:8]}"
        options: dict[str, Any] = {"name": name, "num_gpus": gpus, "num_cpus": conf.num_cpus,
                                   "scheduling_strategy": "SPREAD" if conf.placement == "spread" else "DEFAULT"}
        if conf.resources:
            options["resources"] = dict(conf.resources)
        if conf.memory_mb:
            options["memory"] = conf.memory_mb * 1024 * 1024
        spec = wire.plain(self.settings.models[model])
        handle = self._remote.options(**options).remote(model, spec, str(self.state_dir))
        try:
            info = ray.get(handle.describe.remote(), timeout=self.conf.actor_start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.kill(handle, no_restart=True)
            raise RuntimeError(f"model {model}: no Ray machine offered {_needs(gpus, conf)} within "
                               f"{self.conf.actor_start_timeout_s:.0f} s (workers.ray.pools.{model})") from None
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"model {model}: its Ray actor could not load it: {_cause(exc)}") from None
        from inference.actor import code_version

        if info["code"] != code_version():
            ray.kill(handle, no_restart=True)
            raise RuntimeError(f"model {model}: the Ray machine {info['hostname']} runs other inference code "
                               f"({info['code']}, this node {code_version()}): install the same dicom-node there")
        actor = _Actor(handle, info, name, gpus)
        logger.info("Model %s: Ray actor %s started on %s (%s)", model, name, actor.where, _needs(gpus, conf))
        return actor

    def kill(self, actor: _Actor) -> None:
        try:
            self._ray.kill(actor.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def card(self, model: str) -> tuple[Any, bool]:
        """The model card its actors report, and whether it takes several inputs (starting an actor if none)."""
        pool = self.pools[model]
        with pool.cond:
            known = next((a.info for a in pool.actors), None)
        if known is None:
            actor = pool.acquire(self.conf.actor_start_timeout_s)
            pool.release(actor)
            known = actor.info
        return wire.card_in(known["card"]), bool(known.get("several_inputs"))

    def predict(self, job_id: int, model: str, args: tuple[Any, ...], device: str | None,
                timeout_s: float) -> Prediction:
        """Run ``model`` on an actor of its pool; the job's reason says which while it runs.

        ``args``: ``(volume,)``, or ``(volumes by role, primary role)`` for a study rule's model.

        Raises
        ------
        ActorLost
            The actor or its machine ended during the call (the job is queued again).
        Exception
            The model's own exception, unwrapped (a CUDA out-of-memory error keeps its type).
        """
        ray = self._ray
        pool = self.pools[model]
        actor = pool.acquire(self.conf.actor_start_timeout_s)
        self.on_placed(job_id, f"{ON_ACTOR}{actor.name} on {actor.where}")
        self.changed()
        try:
            if len(args) == 1:
                call = actor.handle.predict.remote(ray.put(args[0]), device)
            else:
                volumes = {role: ray.put(v) for role, v in args[0].items()}
                call = actor.handle.predict_study.remote(volumes, args[1], device)
            prediction, stats = ray.get(call, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            pool.drop(actor, f"timeout after {timeout_s:.0f} s")
            raise TimeoutError(f"model {model} timed out after {timeout_s:.0f} s on Ray actor {actor.name}; "
                               "the actor was killed") from None
        except ray.exceptions.RayTaskError as exc:  # the model raised: its own exception, as on one host
            pool.release(actor)
            raise exc.cause from None
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.NodeDiedError, ray.exceptions.RaySystemError) as exc:
            pool.drop(actor, _cause(exc))
            threading.Thread(target=pool.fill, daemon=True, name=f"ray-refill-{model}").start()
            raise ActorLost(f"model {model}: Ray actor {actor.name} on {actor.where} was lost mid-job "
                            f"({_cause(exc)})") from None
        actor.info["peak_gpu_bytes"] = stats["peak_gpu_bytes"]
        if stats["peak_gpu_bytes"] and actor.info.get("gpu_total_bytes"):
            self._peaks[model] = (max(stats["peak_gpu_bytes"], self._peaks.get(model, (0.0, 0.0))[0]),
                                  float(actor.info["gpu_total_bytes"]))
        pool.release(actor)
        self.changed()
        return prediction

    # -- what operators see ----------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Machines, and per model its actors (where, busy, jobs, GPU memory) and how many jobs wait for one."""
        nodes = []
        if self.connected:
            try:
                nodes = [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "hostname": n["NodeManagerHostname"],
                          "alive": bool(n.get("Alive")), "cpus": n["Resources"].get("CPU", 0),
                          "gpus": n["Resources"].get("GPU", 0)} for n in self._ray.nodes()]
            except Exception:  # noqa: BLE001 - a report, never a failure
                nodes = []
        models = {}
        for name, pool in self.pools.items():
            with pool.cond:
                models[name] = {
                    "min_actors": pool.conf.min_actors, "max_actors": pool.conf.max_actors,
                    "starting": pool.starting, "waiting": pool.waiting,
                    "actors": [{"name": a.name, "node_id": a.info["node_id"], "where": a.where, "busy": a.busy,
                                "jobs": a.jobs, "num_gpus": a.num_gpus, "gpu_ids": a.info.get("gpu_ids", []),
                                "peak_gpu_bytes": a.info.get("peak_gpu_bytes", 0),
                                "gpu_total_bytes": a.info.get("gpu_total_bytes", 0)} for a in pool.actors]}
        return {"address": self.conf.address, "connected": self.connected, "at": time.time(), "nodes": nodes,
                "models": models}

    def changed(self) -> None:
        """Write the snapshot for ``dicom-node status`` (atomically; a failure is only logged)."""
        path = self.state_dir / SNAPSHOT
        try:
            tmp = path.with_name(f".{SNAPSHOT}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps(self.snapshot(), indent=1))
            os.replace(tmp, path)
        except Exception:  # noqa: BLE001
            logger.debug("Ray: cluster snapshot not written", exc_info=True)


def read_snapshot(state_dir: Path) -> dict[str, Any] | None:
    """The cluster as the running node last wrote it (``None``: not on Ray, or never written)."""
    try:
        data: dict[str, Any] = json.loads((state_dir / SNAPSHOT).read_text())
    except (OSError, ValueError):
        return None
    return data


def _needs(gpus: float, conf: RayPoolSettings) -> str:
    parts = [f"{_fmt(gpus)} GPU", f"{_fmt(conf.num_cpus)} CPU"]
    parts += [f"{_fmt(v)} {k}" for k, v in conf.resources.items()]
    if conf.memory_mb:
        parts.append(f"{conf.memory_mb} MiB")
    return ", ".join(parts)


def _fmt(x: float) -> str:
    return f"{x:g}"


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


class _ActorModel(Model):
    """A model seen by :func:`run_infer` whose predictions run on a Ray actor."""

    def __init__(self, engine: RayEngine, job_id: int, name: str, device: str | None, timeout_s: float) -> None:
        self.engine, self.job_id, self.name, self.device, self.timeout_s = engine, job_id, name, device, timeout_s
        self.card, self.takes_several_inputs = engine.card(name)

    def predict(self, volume: Volume) -> Prediction:
        return self.engine.predict(self.job_id, self.name, (volume,), self.device, self.timeout_s)

    def predict_study(self, volumes: Mapping[str, Volume], primary: str) -> Prediction:
        return self.engine.predict(self.job_id, self.name, (dict(volumes), primary), self.device, self.timeout_s)


class _TaskRegistry:
    """What :func:`run_infer` asks for models: actor-backed models of one job."""

    def __init__(self, engine: RayEngine, task: InferTask, timeout_s: float) -> None:
        self.engine, self.task, self.timeout_s = engine, task, timeout_s
        self.specs = engine.settings.models

    def get(self, name: str, device: str | None = None) -> Model:
        return _ActorModel(self.engine, self.task.job_id, name, device, self.timeout_s)


class RayRunner:
    """One job at a time through the engine: the :class:`InferRunner` the node's drains use with ``engine: ray``."""

    def __init__(self, engine: RayEngine, spool: Spool, outputs: Any) -> None:
        self.engine, self.spool, self.outputs = engine, spool, outputs

    @property
    def alive(self) -> bool:
        return self.engine.connected

    def start(self) -> None:
        """Nothing per runner: the engine joins the cluster once."""

    def stop(self, force: bool = False) -> None:
        """Nothing per runner: the node closes the engine."""

    def close(self) -> None:
        """Nothing per runner: the node closes the engine."""

    def run(self, task: InferTask, timeout_s: float,
            ready: Callable[[list[ProducedObject]], None] | None = None) -> InferOutcome:
        spec = self.engine.settings.models.get(task.model)
        timeout_s = float(getattr(spec, "timeout_s", None) or timeout_s)
        outcome = run_infer(task, _TaskRegistry(self.engine, task, timeout_s), self.spool,  # type: ignore[arg-type]
                            self.outputs, ready=ready)
        return outcome


def infer_queue(db: Any) -> dict[str, dict[str, int]]:
    """INFER jobs per model: how many wait (queued or retrying) and how many run."""
    rows = db.query("SELECT model, state, COUNT(*) AS n FROM jobs WHERE kind='infer' AND state IN "
                    "('queued','retrying','running') GROUP BY model, state")
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        entry = out.setdefault(r["model"], {"waiting": 0, "running": 0})
        entry["running" if r["state"] == "running" else "waiting"] += r["n"]
    return out


def describe_cluster(snapshot: dict[str, Any] | None, queue: dict[str, dict[str, int]],
                     now: float | None = None) -> list[str]:
    """The cluster as lines for ``dicom-node status`` and the status page."""
    if snapshot is None:
        return ["Ray cluster: not seen yet (the node writes what it sees while it runs)"]
    now = time.time() if now is None else now
    age = max(0.0, now - float(snapshot.get("at", now)))
    state = "connected" if snapshot.get("connected") else "not connected (node stopped)"
    lines = [f"Ray cluster at {snapshot.get('address')}: {state}, as seen {age:.0f} s ago"]
    for n in snapshot.get("nodes", []):
        lines.append(f"  machine {n['hostname']} ({n['ip']}): {'alive' if n['alive'] else 'DEAD'}, "
                     f"{_fmt(n['cpus'])} CPU, {_fmt(n['gpus'])} GPU")
    for model, m in sorted(snapshot.get("models", {}).items()):
        q = queue.get(model, {"waiting": 0, "running": 0})
        lines.append(f"  model {model}: {len(m['actors'])} actor(s) (min {m['min_actors']}, max {m['max_actors']}"
                     f"{', starting ' + str(m['starting']) if m['starting'] else ''}), {q['waiting']} job(s) "
                     f"waiting, {q['running']} running")
        for a in m["actors"]:
            gpu = ""
            if a["num_gpus"]:
                gpu = f", {_fmt(a['num_gpus'])} GPU"
                if a.get("gpu_total_bytes"):
                    gpu += (f", peak {a['peak_gpu_bytes'] / 2**20:.0f} of "
                            f"{a['gpu_total_bytes'] / 2**20:.0f} MiB")
            lines.append(f"    {a['name']} on {a['where']}: {'busy' if a['busy'] else 'idle'}, "
                         f"{a['jobs']} job(s){gpu}")
    return lines
