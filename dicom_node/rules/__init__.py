"""Rules: which models run on a complete series, and why the other rules do not apply.

Pure functions over :class:`~dicom_node.domain.SeriesSummary`; the rule schema
itself is :class:`dicom_node.settings.RuleSettings`.
"""

from __future__ import annotations

from dicom_node.rules.matcher import check_condition, explain, match
from dicom_node.rules.summary import (
    DERIVED_MODALITIES,
    OWN_MANUFACTURER,
    attributes_from_dataset,
    never_process_reason,
    scan_paths,
)

__all__ = [
    "DERIVED_MODALITIES",
    "OWN_MANUFACTURER",
    "attributes_from_dataset",
    "check_condition",
    "explain",
    "match",
    "never_process_reason",
    "scan_paths",
]
