"""A synthetic CT series in a node's spool, recorded in its state database as the receiver records one;
or beside a ``type: python`` test model, for a job run without a database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from dicom_node.settings import Settings
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


#: The segment of a ``bright`` test model: one label, a SNOMED code any card accepts.
BRIGHT_LABEL = {"value": 1, "name": "Bright", "color": [255, 0, 0], "snomed": {"value": "10200004", "meaning": "Liver"}}


def python_model_case(tmp_path: Path, model_py: str, hu: np.ndarray, *, labels: list[dict[str, Any]] | None = None,
                      **settings: Any) -> dict[str, Any]:
    """A ``type: python`` model ``bright`` (``bright_model:bright`` from ``model_py``) and a CT series ``hu`` in a
    spool under ``tmp_path/state``, not recorded in any database.

    ``settings`` are added to the node settings (``destinations``, ``rules``...; default: one rule running the
    model on every CT).  Returns ``spool``, ``settings``, ``code`` (the model's folder), ``series`` (its UID),
    ``files`` and ``paths`` (relative to the spool).
    """
    code = tmp_path / "code"
    code.mkdir()
    (code / "bright_model.py").write_text(model_py)
    spool = Spool(tmp_path / "state")
    files = write_ct_series(hu, (2.0, 1.0, 1.0), spool.incoming / "study" / "series")
    node_settings = Settings.model_validate({
        "storage": {"path": str(tmp_path / "state")},
        "models": {"bright": {"type": "python", "callable": "bright_model:bright", "path": str(code),
                              "labels": labels or [BRIGHT_LABEL]}},
        "rules": [{"name": "all", "when": {"Modality": "CT"}, "run": ["bright"]}],
        **settings,
    })
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    return {"spool": spool, "settings": node_settings, "code": code, "series": series_uid, "files": files,
            "paths": tuple(spool.relative(f) for f in files)}
