"""Prometheus metrics of one node (own registry: no module-global state)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The node's counters, histograms and gauges, in a registry of their own.

    Counters move from the places that do the work (:meth:`on_stored`,
    :meth:`on_association`, :meth:`on_event`); gauges are refreshed from
    the database just before each scrape.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances = Counter("dicomnode_instances_received", "Instances stored by C-STORE", ["outcome"],
                                 registry=r)
        self.bytes = Counter("dicomnode_bytes_received", "Bytes stored by C-STORE", registry=r)
        self.rules = Counter("dicomnode_rule_matches", "Rule matches", ["rule"], registry=r)
        self.inference = Histogram("dicomnode_inference_seconds", "Model run time per job", ["model"],
                                   buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900), registry=r)
        self.infer_failures = Counter("dicomnode_inference_failures", "Failed INFER jobs", ["model"], registry=r)
        self.sent = Counter("dicomnode_objects_sent", "Result objects delivered", ["destination"], registry=r)
        self.send_failures = Counter("dicomnode_send_failures", "Failed send attempts", ["destination"],
                                     registry=r)
        self.jobs = Gauge("dicomnode_jobs", "Jobs by kind and state", ["kind", "state"], registry=r)
        self.spool_free = Gauge("dicomnode_spool_free_bytes", "Free space on the spool filesystem", registry=r)
        self.associations = Counter("dicomnode_associations", "DICOM associations by outcome", ["outcome"],
                                    registry=r)
        self.series_completed = Counter("dicomnode_series_completed", "Series found complete (quiet period over)",
                                        registry=r)
        self.queue = Gauge("dicomnode_queue_depth", "Jobs waiting to run (queued or retrying), by kind", ["kind"],
                           registry=r)
        self.series = Gauge("dicomnode_series", "Series in the state database, by state", ["state"], registry=r)
        self.infer_queue = Gauge("dicomnode_infer_jobs", "INFER jobs waiting (queued or retrying) or running, by "
                                 "model", ["model", "state"], registry=r)
        self.ray_nodes = Gauge("dicomnode_ray_nodes", "Machines of the Ray cluster, alive or dead", ["alive"],
                               registry=r)
        self.ray_actors = Gauge("dicomnode_ray_actors", "Ray actors of each model, by machine and busy/idle",
                                ["model", "node", "busy"], registry=r)
        self.ray_gpu_peak = Gauge("dicomnode_ray_actor_gpu_peak_bytes", "Peak GPU memory a model's actor used",
                                  ["model", "actor", "node"], registry=r)
        self.ray_gpu_share = Gauge("dicomnode_ray_actor_gpus", "GPUs (fraction) a model's actor holds",
                                   ["model", "actor", "node"], registry=r)
        self.purged = Counter("dicomnode_retention_series_purged", "Finished series removed by retention",
                              ["reason"], registry=r)
        self.purged_bytes = Counter("dicomnode_retention_bytes_freed", "Spool bytes freed by retention", registry=r)

    def on_stored(self, size: int, outcome: str) -> None:
        self.instances.labels(outcome=outcome).inc()
        self.bytes.inc(size)

    def on_association(self, accepted: bool, ae_title: str, host: str, reason: str) -> None:
        self.associations.labels(outcome="accepted" if accepted else "refused").inc()

    def on_event(self, name: str, data: dict[str, Any]) -> None:
        if name == "series_completed":
            self.series_completed.inc()
        elif name == "rule_matched":
            self.rules.labels(rule=data["rule"]).inc()
        elif name == "infer_finished":
            if data["ok"]:
                self.inference.labels(model=data["model"]).observe(data["seconds"].get("model", 0.0))
            else:
                self.infer_failures.labels(model=data["model"]).inc()
        elif name == "sent":
            self.sent.labels(destination=data["destination"]).inc(data["count"])
        elif name == "send_failed":
            self.send_failures.labels(destination=data["destination"]).inc()
