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


class WorkersSettings(BaseModel):
    """Inference worker processes (``workers:``)."""

    model_config = FROZEN

    # "auto": one worker per visible GPU (one on a machine without GPU).
    infer: Annotated[Int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    infer_timeout_s: Seconds = 1800.0
    max_warm_models: Annotated[Int, Field(ge=1, le=64)] = 4
    shutdown_grace_s: Seconds = 600.0
    # A model's CUDA out-of-memory error: retry the job after gpu_retry_s (the GPU is shared; counted as an
    # attempt, failed after the last), run it again on the CPU at once, or fail the job.
    gpu_out_of_memory: Literal["retry", "cpu", "fail"] = "retry"
    gpu_retry_s: Seconds = 60.0


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
