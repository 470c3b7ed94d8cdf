"""A synthetic CT series in a node's spool, recorded in its state database as the receiver records one."""

from __future__ import annotations

import numpy as np
import pydicom

from dicom_node.spool import Spool
from dicom_node.store import Database, ReceivedInstance, SeriesStore
from tests.phantoms import write_ct_series


def spool_series(spool: Spool, db: Database, name: str, hu: np.ndarray | None = None,
                 spacing: tuple[float, float, float] = (2.0, 1.0, 1.0), now: float = 0.0) -> str:
    """Write ``hu`` (default: a small box phantom) as a CT series under the spool and record it; its UID."""
    if hu is None:
        hu = np.full((4, 16, 16), -100, np.int16)
        hu[1:3, 4:10, 4:10] = 80
    files = write_ct_series(hu, spacing, spool.incoming / name)
    store = SeriesStore(db)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        store.record_instance(ReceivedInstance(
            study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID), sop_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID), transfer_syntax="1.2.840.10008.1.2.1", modality="CT",
            path=spool.relative(f), size=f.stat().st_size, sha256=f.name, calling_ae="MOD", called_ae="NODE",
            source_host="127.0.0.1"), now)
    return str(ds.SeriesInstanceUID)
