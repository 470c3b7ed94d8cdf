"""Durable state: series, instances, jobs and results in SQLite."""

from dicom_node.store.database import Database
from dicom_node.store.jobs import Job, JobStore
from dicom_node.store.series import InstanceOutcome, ReceivedInstance, SeriesStore

__all__ = ["Database", "InstanceOutcome", "Job", "JobStore", "ReceivedInstance", "SeriesStore"]
