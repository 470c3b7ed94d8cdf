"""Rules: which models run on a complete series, and why the other rules do not apply.

Pure functions over :class:`~dicom_node.domain.SeriesSummary`; the rule schema
itself is :class:`dicom_node.settings.RuleSettings`, the key grammar
:mod:`dicom_node.rules.keys`.
"""

from __future__ import annotations

from dicom_node.rules.matcher import (
    check_condition,
    explain,
    first_failure,
    match,
    quiet_seconds_for,
    study_roles,
    value_of,
)
from dicom_node.rules.summary import (
    DERIVED_MODALITIES,
    OWN_MANUFACTURER,
    attributes_from_dataset,
    instance_geometry,
    never_process_reason,
    read_series,
    scan_paths,
    series_facts,
)

__all__ = [
    "DERIVED_MODALITIES",
    "OWN_MANUFACTURER",
    "attributes_from_dataset",
    "check_condition",
    "explain",
    "first_failure",
    "instance_geometry",
    "match",
    "never_process_reason",
    "quiet_seconds_for",
    "read_series",
    "scan_paths",
    "series_facts",
    "study_roles",
    "value_of",
]
