"""Study rules give their models every series: arterial and venous phase in, one SEG on the primary out.

A ``python`` model under a study rule is called as ``func(arrays, geometries)``
(dicts by role, primary first); a model type that takes one series is refused
at config load, and fails the job with the reason if it gets there anyway.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.errors import ConfigError
from dicom_node.scheduler.pipeline import InferTask, run_infer, study_inputs
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from inference.registry import ModelRegistry
from tests.phantoms import write_ct_series

#: The model of these tests: voxels that enhance by more than 50 HU from the arterial to the venous phase.
#: It checks what it is given, so a wrong call fails the job with the reason.
MODEL_PY = '''
import numpy as np

def enhancing(arrays, geometries):
    if not isinstance(arrays, dict):
        raise TypeError("expected the arrays of a study rule, got one array")
    if list(arrays) != list(geometries) or set(arrays) != {"arterial", "venous"}:
        raise ValueError(f"unexpected roles {list(arrays)} / {list(geometries)}")
    if arrays["venous"].shape != arrays["arterial"].shape:
        raise ValueError("phases on different grids")
    return ((arrays["venous"] - arrays["arterial"]) > 50).astype(np.uint8)
'''

LABEL = {"value": 1, "name": "Enhancing", "snomed": {"value": "10200004", "meaning": "Liver"}}
SHAPE, SPACING = (6, 16, 16), (2.0, 1.5, 1.5)


def settings_for(tmp: Path, model: dict[str, Any] | None = None, **study_rule: Any) -> Settings:
    models = {"enhancing": {"type": "python", "callable": "study_phase_model:enhancing", "path": str(tmp / "code"),
                            "labels": [LABEL], "modality": "CT"},
              "lungs": {"type": "builtin", "name": "lungs-ct"}}
    rule = {"name": "phases", "when": {"Modality": "CT"}, "run": ["enhancing"],
            "study": {"series": {"arterial": {"SeriesDescription": {"regex": "(?i)arterial"}},
                                 "venous": {"SeriesDescription": {"regex": "(?i)venous"}}}}, **study_rule}
    return Settings.model_validate({"storage": {"path": str(tmp / "state")}, "models": models, "rules": [rule],
                                    **(model or {})})


@pytest.fixture()
def phases(tmp_path: Path) -> dict[str, Any]:
    """Two CT phases of one study on one grid, in the spool; the venous one enhances in two boxes."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "study_phase_model.py").write_text(MODEL_PY)
    rng = np.random.default_rng(4)
    arterial = rng.integers(-100, 200, SHAPE).astype(np.int16)
    venous = arterial.copy()
    venous[1:4, 2:8, 3:9] += 80   # enhances: in the label
    venous[3:5, 10:14, 10:14] += 30  # enhances too little: not in the label
    spool = Spool(tmp_path / "state")
    study, frame = generate_uid(), generate_uid()
    series: dict[str, tuple[str, tuple[str, ...]]] = {}
    for number, (role, hu) in enumerate((("arterial", arterial), ("venous", venous)), start=1):
        uid = generate_uid()
        files = write_ct_series(hu, SPACING, spool.incoming / study / uid, study_uid=study, series_uid=uid,
                                frame_of_reference_uid=frame, series_description=f"Liver {role}",
                                series_number=number)
        series[role] = (uid, tuple(spool.relative(f) for f in files))
    expected = ((venous.astype(int) - arterial.astype(int)) > 50).astype(np.uint8)
    assert 0 < expected.sum() < expected.size
    return {"spool": spool, "series": series, "expected": expected, "tmp": tmp_path, "study": study}


def task_for(phases: dict[str, Any], primary: str = "arterial", model: str = "enhancing",
             outputs: tuple[str, ...] = ("seg", "sr")) -> InferTask:
    series = phases["series"]
    inputs = study_inputs(series[primary][0], {role: uid for role, (uid, _) in series.items()},
                          lambda uid: next(paths for u, paths in series.values() if u == uid))
    return InferTask(7, series[primary][0], model, series[primary][1], outputs, inputs=inputs, rule="phases")


def read_seg(spool: Spool, path: str) -> hd.seg.Segmentation:
    return hd.seg.segread(io.BytesIO(spool.absolute(path).read_bytes()))


def test_python_model_gets_both_phases_and_the_seg_is_on_the_primary_series(phases: dict[str, Any]) -> None:
    settings = settings_for(phases["tmp"])
    spool: Spool = phases["spool"]
    outcome = run_infer(task_for(phases), ModelRegistry(settings.models), spool, settings.outputs)
    assert outcome.ok, outcome.error
    assert sorted(o.kind for o in outcome.objects) == ["seg", "sr"]
    seg_path = next(o.path for o in outcome.objects if o.kind == "seg")
    seg = read_seg(spool, seg_path)
    art_uid, art_paths = phases["series"]["arterial"]
    sources = [pydicom.dcmread(spool.absolute(p), stop_before_pixels=True) for p in art_paths]
    sources.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert seg.StudyInstanceUID == phases["study"]
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [art_uid]
    referenced = {str(ref.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence
                  for ref in s.ReferencedInstanceSequence}
    assert referenced <= {str(ds.SOPInstanceUID) for ds in sources}
    pixels = seg.get_pixels_by_source_instance([str(ds.SOPInstanceUID) for ds in sources], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[..., 0], phases["expected"])
    # The result UIDs are those of the primary series: the same inputs give the same objects again.
    again = run_infer(task_for(phases), ModelRegistry(settings.models), spool, settings.outputs)
    assert [o.sop_uid for o in again.objects] == [o.sop_uid for o in outcome.objects]


def test_the_primary_role_comes_first_and_the_seg_follows_it(phases: dict[str, Any]) -> None:
    settings = settings_for(phases["tmp"])
    spool: Spool = phases["spool"]
    task = task_for(phases, primary="venous", outputs=("seg",))
    assert [role for role, _ in task.inputs] == ["venous", "arterial"]
    outcome = run_infer(task, ModelRegistry(settings.models), spool, settings.outputs)
    assert outcome.ok, outcome.error
    (seg_obj,) = outcome.objects
    seg = read_seg(spool, seg_obj.path)
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [phases["series"]["venous"][0]]


def test_a_single_input_model_type_on_a_study_rule_is_refused_at_config_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rules\[0\]\.run\[0\]: study rule 'phases' gives model 'lungs' 2 "
                                          r"series \(arterial, venous\) but a builtin model takes one series"):
        settings_for(tmp_path, run=["lungs"])
    one_role = {"series": {"venous": {"SeriesDescription": {"regex": "(?i)venous"}}}}
    assert settings_for(tmp_path, run=["lungs"], study=one_role).rules[0].run == ("lungs",), \
        "one series: any model takes it"


def test_a_single_input_model_given_two_series_fails_the_job_with_the_reason(phases: dict[str, Any]) -> None:
    settings = settings_for(phases["tmp"])  # the rule is checked at load; the job may come from an older config
    outcome = run_infer(task_for(phases, model="lungs"), ModelRegistry(settings.models), phases["spool"],
                        settings.outputs)
    assert not outcome.ok and outcome.objects == []
    assert outcome.error == ("model lungs takes one series; rule 'phases' gives it 2 (arterial, venous): "
                             "use a type: python model for this study rule")


def test_a_missing_input_fails_the_job_with_the_reason(phases: dict[str, Any]) -> None:
    settings = settings_for(phases["tmp"])
    task = task_for(phases)
    gone = InferTask(task.job_id, task.series_uid, task.model, task.paths, task.outputs,
                     inputs=(task.inputs[0], ("venous", ())), rule="phases")
    outcome = run_infer(gone, ModelRegistry(settings.models), phases["spool"], settings.outputs)
    assert not outcome.ok
    assert outcome.error.startswith("study rule 'phases': input 'venous' has no instances in the spool")


def test_a_model_returning_a_label_map_off_the_primary_grid_fails_the_job(phases: dict[str, Any]) -> None:
    (phases["tmp"] / "code" / "study_phase_cropped.py").write_text(
        MODEL_PY + "\ndef cropped(arrays, geometries):\n    return enhancing(arrays, geometries)[1:]\n")
    settings = settings_for(phases["tmp"], model={"models": {
        "enhancing": {"type": "python", "callable": "study_phase_cropped:cropped",
                      "path": str(phases["tmp"] / "code"), "labels": [LABEL]}}})
    outcome = run_infer(task_for(phases), ModelRegistry(settings.models), phases["spool"], settings.outputs)
    assert not outcome.ok
    assert "expected (6, 16, 16) (z, y, x) (the grid of the primary series 'arterial')" in outcome.error


def test_a_model_that_takes_one_series_says_so_when_given_several() -> None:
    from inference.models.builtin import LungsCT
    from inference.types import SingleInputError, Volume

    volume = Volume(np.zeros((2, 4, 4), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "CT")
    model = LungsCT()
    assert not model.takes_several_inputs
    with pytest.raises(SingleInputError, match=r"model lungs-ct takes one series; it was given 2 \(arterial, "
                                                r"venous\): use a model that takes several inputs"):
        model.predict_study({"arterial": volume, "venous": volume}, "arterial")


# --- Input channels: the study's series stacked as one model's channels (any model that takes a tensor) ---

CHANNELS_PY = '''
import numpy as np

def brighter(array, geometry):
    if array.ndim != 4 or geometry.get("channels") != ["venous", "arterial"]:
        raise ValueError(f"expected channels venous, arterial; got {array.shape} {geometry.get('channels')}")
    return ((array[0] - array[1]) > 50).astype(np.uint8)
'''


def _channel_settings(tmp: Path, where: str) -> Settings:
    (tmp / "code" / "channel_model.py").write_text(CHANNELS_PY)
    model = {"type": "python", "callable": "channel_model:brighter", "path": str(tmp / "code"), "labels": [LABEL]}
    rule: dict[str, Any] = {"name": "phases", "when": {"Modality": "CT"}, "run": ["brighter"],
                            "study": {"series": {"arterial": {"SeriesDescription": {"regex": "(?i)arterial"}},
                                                 "venous": {"SeriesDescription": {"regex": "(?i)venous"}}}}}
    (model if where == "model" else rule)["channels"] = ["venous", "arterial"]
    return Settings.model_validate({"storage": {"path": str(tmp / "state")}, "models": {"brighter": model},
                                    "rules": [rule]})


@pytest.mark.parametrize("where", ["model", "rule"])
def test_channels_stack_the_study_series_in_the_declared_order(phases: dict[str, Any], where: str) -> None:
    settings = _channel_settings(phases["tmp"], where)
    task = task_for(phases, model="brighter")
    task = InferTask(task.job_id, task.series_uid, task.model, task.paths, task.outputs, inputs=task.inputs,
                     rule=task.rule, channels=settings.channels_for(settings.rules[0], "brighter"))
    outcome = run_infer(task, ModelRegistry(settings.models), phases["spool"], settings.outputs)
    assert outcome.ok, outcome.error
    seg = read_seg(phases["spool"], next(o.path for o in outcome.objects if o.kind == "seg"))
    # The results are on the first channel's series (venous) and equal the model's answer there.
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == phases["series"]["venous"][0]
    assert int(seg.get_segment_numbers()[0]) == 1 and not any("resampled" in n for n in outcome.notes)


def _rewrite(spool: Spool, paths: tuple[str, ...], **changes: Any) -> None:
    for rel in paths:
        ds = pydicom.dcmread(spool.absolute(rel))
        for keyword, value in changes.items():
            if keyword == "shift_mm":
                ds.ImagePositionPatient = [float(v) + value for v in ds.ImagePositionPatient]
            else:
                setattr(ds, keyword, value)
        ds.save_as(spool.absolute(rel))


def test_a_channel_on_another_grid_of_the_same_frame_is_resampled(phases: dict[str, Any]) -> None:
    settings = _channel_settings(phases["tmp"], "rule")
    _rewrite(phases["spool"], phases["series"]["arterial"][1], shift_mm=0.75)  # half a pixel off, same frame
    task = task_for(phases, model="brighter")
    task = InferTask(task.job_id, task.series_uid, task.model, task.paths, task.outputs, inputs=task.inputs,
                     rule=task.rule, channels=("venous", "arterial"))
    outcome = run_infer(task, ModelRegistry(settings.models), phases["spool"], settings.outputs)
    assert outcome.ok, outcome.error
    assert any("channel 'arterial' resampled onto the grid of channel 'venous'" in n for n in outcome.notes)


def test_a_channel_in_another_frame_of_reference_is_refused(phases: dict[str, Any]) -> None:
    settings = _channel_settings(phases["tmp"], "rule")
    _rewrite(phases["spool"], phases["series"]["arterial"][1], FrameOfReferenceUID=generate_uid())
    task = task_for(phases, model="brighter")
    task = InferTask(task.job_id, task.series_uid, task.model, task.paths, task.outputs, inputs=task.inputs,
                     rule=task.rule, channels=("venous", "arterial"))
    outcome = run_infer(task, ModelRegistry(settings.models), phases["spool"], settings.outputs)
    assert not outcome.ok and not outcome.objects
    assert "channel 'arterial' is not in the frame of reference of channel 'venous'" in outcome.error


def test_channels_are_checked_at_config_load(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    base = {"storage": {"path": str(tmp_path / "state")},
            "models": {"ts": {"type": "torchscript", "path": str(tmp_path / "m.ts"), "labels": [LABEL]}}}
    study = {"series": {"t1": {"SeriesDescription": "T1"}, "t2": {"SeriesDescription": "T2"}}}
    rule = {"name": "brain", "when": {"Modality": "MR"}, "run": ["ts"], "study": study}
    with pytest.raises(ConfigError, match="list them as its input channels"):
        Settings.model_validate({**base, "rules": [rule]})
    with pytest.raises(ValueError, match="not series of this study rule"):
        Settings.model_validate({**base, "rules": [{**rule, "channels": ["t1", "flair"]}]})
    with pytest.raises(ValueError, match="this rule has no study"):
        Settings.model_validate({**base, "rules": [{"name": "r", "when": {}, "run": ["ts"], "channels": ["t1"]}]})
    ok = Settings.model_validate({**base, "rules": [{**rule, "channels": ["t2", "t1"]}]})
    assert ok.channels_for(ok.rules[0], "ts") == ("t2", "t1")
