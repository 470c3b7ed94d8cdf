"""Encode predictions as DICOM result objects (SEG, TID 1500 SR) in the source study.

``build_seg`` and ``build_sr`` are pure functions: datasets and arrays in, a
dataset out; writing and sending are other modules' work.
"""

from dicom_node.results import iod_lookup
from dicom_node.results.identity import (
    DEFAULT_UID_ROOT,
    MANUFACTURER,
    SOFTWARE_NAME,
    SOFTWARE_VERSION,
    OutputIdentity,
    derive_identity,
)
from dicom_node.results.seg import SegResult, build_seg
from dicom_node.results.sr import build_sr

iod_lookup.install()  # every process that builds result objects asks highdicom's IOD tables once per question

__all__ = [
    "DEFAULT_UID_ROOT",
    "MANUFACTURER",
    "SOFTWARE_NAME",
    "SOFTWARE_VERSION",
    "OutputIdentity",
    "SegResult",
    "build_seg",
    "build_sr",
    "derive_identity",
]
