"""Durable state: series, instances, jobs and results in SQLite."""

from dicom_node.store.database import Database, open_database
from dicom_node.store.jobs import Job, JobStore
from dicom_node.store.series import InstanceOutcome, ReceivedInstance, SeriesStore

__all__ = ["Database", "open_database", "InstanceOutcome", "Job", "JobStore", "ReceivedInstance", "SeriesStore"]
