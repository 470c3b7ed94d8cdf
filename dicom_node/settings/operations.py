"""``send:`` (retries), ``workers:`` (inference processes), ``http:`` and ``logging:``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from dicom_node.settings.base import FROZEN, Flag, Float, Host, Int, Port, Seconds


class SendSettings(BaseModel):
    """Retry policy of SEND jobs (``send:``): exponential backoff, then dead-letter.

    A job is dead after ``max_attempts`` attempts or once it is older than
    ``max_age_hours`` (whichever comes first).  Every ``health_check_s`` seconds
    the destinations with jobs waiting for a retry are probed (C-ECHO, or an
    HTTP GET for DICOMweb); one that answers gets its waiting jobs at once.
    """

    model_config = FROZEN

    max_attempts: Annotated[Int, Field(ge=1)] = 20
    max_age_hours: Annotated[Float, Field(gt=0)] = 72.0
    backoff_initial_s: Seconds = 10.0
    backoff_max_s: Seconds = 600.0
    health_check_s: Seconds = 30.0

    @model_validator(mode="after")
    def _ordered(self) -> SendSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_initial_s ({self.backoff_initial_s})"
            )
        return self


class RayPoolSettings(BaseModel):
    """The Ray actors of one model (``workers.ray.pools.NAME``, or ``workers.ray.default_pool``).

    ``num_gpus: auto`` gives a model whose ``device`` is ``cpu`` no GPU and
    any other model one whole GPU, until an actor of it has measured its
    peak GPU memory: later actors then ask for the fraction of a GPU that
    peak (+25 %) needs, in eighths, so several share one GPU by what they
    were seen to use.  A number is used as given (0.25: four per GPU).
    """

    model_config = FROZEN

    # Actors started with the node (warm weights); more are started while jobs wait, up to max_actors.
    min_actors: Annotated[Int, Field(ge=0, le=256)] = 1
    max_actors: Annotated[Int, Field(ge=1, le=256)] = 2
    num_gpus: Annotated[Float, Field(ge=0, le=64)] | Literal["auto"] = "auto"
    num_cpus: Annotated[Float, Field(ge=0, le=256)] = 1.0
    # Ray's memory reservation of each actor (MiB); 0: none.
    memory_mb: Annotated[Int, Field(ge=0)] = 0
    # Custom Ray resources each actor needs (nodes started with `ray start --resources '{"ct": 1}'`).
    resources: dict[Annotated[str, Field(min_length=1, max_length=64)], Annotated[Float, Field(gt=0)]] = {}
    # spread: actors over as many Ray nodes as possible; pack: fill one node first.
    placement: Literal["spread", "pack"] = "spread"

    @model_validator(mode="after")
    def _sizes(self) -> RayPoolSettings:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) must be <= max_actors ({self.max_actors})")
        return self


class RaySettings(BaseModel):
    """An existing Ray cluster the models run on (``workers.ray:``, with ``workers.engine: ray``)."""

    model_config = FROZEN

    # The cluster's GCS address, HOST:PORT (what `ray start --head` printed); required with engine: ray.
    address: Annotated[str, Field(pattern=r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$")] | None = None
    namespace: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")] = "dicom-node"
    connect_timeout_s: Seconds = 60.0
    # From asking for an actor to its model being loaded (placement waits for free resources).
    actor_start_timeout_s: Seconds = 600.0
    # Jobs handed to the cluster at once (each is loaded and encoded on this node).
    max_jobs: Annotated[Int, Field(ge=1, le=1024)] = 8
    default_pool: RayPoolSettings = RayPoolSettings()
    pools: dict[Annotated[str, Field(min_length=1, max_length=64)], RayPoolSettings] = {}

    def pool(self, model: str) -> RayPoolSettings:
        return self.pools.get(model, self.default_pool)


class WorkersSettings(BaseModel):
    """Inference worker processes (``workers:``)."""

    model_config = FROZEN

    # local: worker processes on this machine (infer: how many); ray: model actors on a Ray cluster (ray:).
    engine: Literal["local", "ray"] = "local"
    ray: RaySettings = RaySettings()

    # "auto": one worker per visible GPU (one on a machine without GPU).
    infer: Annotated[Int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    infer_timeout_s: Seconds = 1800.0
    max_warm_models: Annotated[Int, Field(ge=1, le=64)] = 4
    shutdown_grace_s: Seconds = 600.0
    # A model's CUDA out-of-memory error: retry the job after gpu_retry_s (the GPU is shared; counted as an
    # attempt, failed after the last), run it again on the CPU at once, or fail the job.
    gpu_out_of_memory: Literal["retry", "cpu", "fail"] = "retry"
    gpu_retry_s: Seconds = 60.0
    # Load the rules' models when a worker starts (not after a restart), at most max_warm_models.
    preload_models: bool = True
    # MiB of decoded slices an idle worker holds of receiving series, read while they arrive (0: off).
    prefetch_mb: Annotated[Int, Field(ge=0, le=1_048_576)] = 1024
    # Encode part of a job's result objects in a forked child process beside the rest (2+ CPUs).
    parallel_encode: Flag = True


class HttpSettings(BaseModel):
    """Health, metrics and status page (``http:``)."""

    model_config = FROZEN

    enabled: Flag = True
    host: Host = "127.0.0.1"
    port: Port = 8080
    # Every endpoint but /healthz requires it (Bearer, or Basic with it as password) when set.
    token: Annotated[str, Field(min_length=16, max_length=256, pattern=r"^[\x21-\x7e]+$")] | None = None
    # Patient name, ID, birth date, study date and descriptions on the status page.
    show_phi: Flag = False
    # Studies listed on the status page.
    status_studies: Annotated[Int, Field(ge=1, le=1000)] = 50
    # From connecting to the end of the request headers, and per socket read/write (slowloris).
    request_timeout_s: Annotated[Float, Field(gt=0, le=300)] = 10.0
    # Connections served at once; more are closed at once (each costs a thread).
    max_connections: Annotated[Int, Field(ge=1, le=10000)] = 64


class LoggingSettings(BaseModel):
    """Log level and journald format (``logging:``)."""

    model_config = FROZEN

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    journald: Flag = False

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value
