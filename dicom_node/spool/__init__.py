"""The spool: received instances and produced results on the local filesystem.

Layout (under ``storage.path``)::

    spool/incoming/<study_uid>/<series_uid>/<sop_uid>.dcm
    spool/results/<source_series_uid>/<model>/<kind>.dcm
    spool/tmp/                       temp files, renamed into place

Every path component is a validated DICOM UID (or a validated model name),
never a raw value from the network.  Writes are atomic: temp file on the
same filesystem, fsync, rename, fsync of the directory.
"""

from dicom_node.spool.layout import Spool, validate_uid

__all__ = ["Spool", "validate_uid"]
