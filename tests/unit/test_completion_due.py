"""The node ticks when the earliest receiving series can complete, not a tick interval later."""

from __future__ import annotations

from pathlib import Path

from dicom_node.scheduler.completion import SeriesCompletion
from dicom_node.settings import load_settings_text
from dicom_node.store import Database, ReceivedInstance, SeriesStore


def _inst(series: str, sop: str) -> ReceivedInstance:
    return ReceivedInstance(study_uid="1.2.3", series_uid=series, sop_uid=sop,
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
                            modality="CT", path=f"incoming/{sop}.dcm", size=1, sha256=sop, calling_ae="M",
                            called_ae="N", source_host="127.0.0.1")


def test_next_due_is_the_earliest_series_end_of_quiet(tmp_path: Path) -> None:
    settings = load_settings_text("completion: {quiet_seconds: 30}")
    series = SeriesStore(Database(tmp_path / "s.sqlite3"))
    completion = SeriesCompletion(lambda: settings, series, lambda row: None)  # type: ignore[arg-type,return-value]
    assert completion.next_due(0.0) is None
    series.record_instance(_inst("1.2.3.1", "1.2.3.1.1"), 100.0)
    series.record_instance(_inst("1.2.3.2", "1.2.3.2.1"), 110.0)
    assert completion.next_due(105.0) == 130.0
    assert completion.complete(129.9) == []
    assert completion.complete(130.0) == ["1.2.3.1"]
    assert completion.next_due(130.0) == 140.0
    # Overdue (e.g. after a pause): now, never in the past.
    assert completion.next_due(500.0) == 500.0
