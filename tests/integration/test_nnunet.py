"""nnU-Net v2 models through the node: nnunetv2's own predictor, in a managed environment, kept warm.

``dicom-node models install`` builds the environment the way a user would (torch as the node's,
nnunetv2 as the node pins it; the index's torchvision, which cannot load beside a CPU torch build,
removed and said).  Tiny trained-model folders are built in the test with nnU-Net's own trainer
class from their plans (tests/nnunet_factory.py), with weights whose answer is computable from the
input, so the label maps are checked voxel for voxel: through the registry (folds, resampling,
orientation), and end to end, C-STORE into Orthanc, routed to ``dicom-node serve``, SEG and SR back
in Orthanc, for a merged two-folder task on one CT and for a two-channel model on two CT phases.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from inference.registry import ModelRegistry
from inference.types import Volume
from tests.integration.conftest import dciodvfy_errors, free_port, node_config, storescu, wait_until
from tests.nnunet_factory import build_checkpoints, prepare_nnunet_folder
from tests.phantoms import write_ct_series
from tests.tools import node_cli, require_node_cli, unavailable

pytestmark = pytest.mark.integration

SPACING = (2.5, 1.5, 1.5)

#: One-channel parts of a merged task: part A writes spleen / left kidney, part B liver (values of its own).
PART_A = {"labels": {"background": 0, "spleen": 1, "kidney_left": 2},
          "logits": {"matrix": [[0.0], [1.0], [0.5]], "bias": [0.0, -100.5, -20.25]}}
PART_B = {"labels": {"background": 0, "liver": 1},
          "logits": {"matrix": [[0.0], [1.0]], "bias": [0.0, 300.5]}}
#: Two channels (arterial, venous): liver where venous - arterial > 50, spleen where arterial > 150.
TWO_PHASE = {"labels": {"background": 0, "liver": 1, "spleen": 2},
             "logits": {"matrix": [[0.0, 0.0], [-1.0, 1.0], [1.0, 0.0]], "bias": [0.0, -50.5, -150.25]}}


def expected(channels: list[np.ndarray], logits: dict[str, Any], lower: float = -1000.0,
             upper: float = 3000.0) -> np.ndarray:
    """The label map the computable network gives: argmax of W @ clip(x) + b (nnU-Net's CT normalisation)."""
    x = np.stack([np.clip(c.astype(np.float64), lower, upper) for c in channels])
    scores = np.einsum("kc,c...->k...", np.asarray(logits["matrix"]), x) + np.asarray(logits["bias"])[:, None, None,
                                                                                                       None]
    return np.argmax(scores, axis=0).astype(np.uint8)


@pytest.fixture(scope="module")
def nnunet_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The managed environment, built by ``models install``, and the model folders built with it."""
    require_node_cli()
    tmp = tmp_path_factory.mktemp("nnunet")
    placeholder = tmp / "models" / "placeholder"
    placeholder.mkdir(parents=True)
    config = tmp / "install.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"path": str(tmp / "state")},
        "models": {"organs": {"type": "nnunet", "path": str(placeholder), "environment": "managed"}}}))
    listed = node_cli("models", "list", "--config", str(config))
    assert "missing" in listed.stdout, listed.stdout + listed.stderr
    started = time.monotonic()
    built = node_cli("models", "install", "organs", "--config", str(config), timeout=1500)
    if built.returncode != 0 and "No matching distribution" in built.stderr + built.stdout:
        unavailable(f"the package registry does not serve nnunetv2==2.8.1: {built.stderr[-300:]}")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    lines = built.stdout.splitlines()
    assert any("nnunetv2==2.8.1" in line and "nnU-Net v2's predictor" in line for line in lines), built.stdout
    done = next(line for line in lines if line.startswith("[done]"))
    assert "nnunetv2 2.8.1" in done, done
    python = next((tmp / "state" / "environments").glob("*/bin/python"))
    torchvision_ok = subprocess.run([str(python), "-c", "import torchvision"], capture_output=True).returncode == 0
    # Either it imports here (a matching build), or the install took it out and said so.
    assert torchvision_ok or any("left out: torchvision" in line for line in lines), built.stdout
    prepared = {
        "a": prepare_nnunet_folder(tmp / "a", channels=["CT"], labels=PART_A["labels"], logits=PART_A["logits"],
                                   folds=(0, 1), dataset="Dataset901_PartA"),
        "b": prepare_nnunet_folder(tmp / "b", channels=["CT"], labels=PART_B["labels"], logits=PART_B["logits"],
                                   dataset="Dataset902_PartB"),
        "coarse": prepare_nnunet_folder(tmp / "coarse", channels=["CT"], labels=PART_B["labels"],
                                        logits=PART_B["logits"], spacing=(3.0, 2.0, 2.0), dataset="Dataset903_Coarse"),
        "phases": prepare_nnunet_folder(tmp / "phases", channels=["arterial", "venous"], labels=TWO_PHASE["labels"],
                                        logits=TWO_PHASE["logits"], dataset="Dataset904_Phases"),
    }
    build_checkpoints(python, list(prepared.values()))  # nnU-Net's own trainer class builds each network
    folders = {key: folder for key, (folder, _spec) in prepared.items()}
    return {"tmp": tmp, "config": config, "python": python, "folders": folders,
            "install_seconds": time.monotonic() - started}


def _ns(**kw: Any) -> Any:
    from dicom_node.settings import load_settings

    path = Path(kw.pop("tmp")) / "spec.yaml"
    path.write_text(yaml.safe_dump({"storage": {"path": kw.pop("state")}, "models": kw}))
    return load_settings(path)


def _volume(hu: np.ndarray, direction: np.ndarray | None = None) -> Volume:
    return Volume(hu.astype(np.float32), SPACING, (-30.0, -40.0, 10.0),
                  np.eye(3)[::-1] if direction is None else direction, "CT")


def test_models_list_and_check_config_say_ready_once_installed(nnunet_env: dict[str, Any]) -> None:
    out = node_cli("models", "list", "--config", str(nnunet_env["config"])).stdout
    assert "ready" in out.split("organs", 1)[1].splitlines()[0], out


def test_warm_predictor_gives_the_computable_answer_with_folds_and_codes(nnunet_env: dict[str, Any]) -> None:
    settings = _ns(tmp=nnunet_env["tmp"], state=str(nnunet_env["tmp"] / "state"),
                   a={"type": "nnunet", "path": str(nnunet_env["folders"]["a"]), "environment": "managed"})
    # The plan of "a" is the one "organs" was built with: the same environment (keyed by its contents).
    registry = ModelRegistry(settings.models, state_dir=settings.storage.resolved_path())
    try:
        model = registry.get("a")
        card = model.card
        assert [(s.label, s.name, s.type.value, s.modifier.value if s.modifier else None) for s in card.segments] == [
            (1, "Spleen", "78961009", None), (2, "Left kidney", "64033007", "7771000")]
        assert card.modality == "CT"  # CT normalisation in the plans
        assert "nnUNetTrainer__nnUNetPlans__3d_fullres, folds 0,1, checkpoint_final.pth sha256:" in card.runtime
        assert "nnunetv2 2.8.1" in card.runtime and "managed environment" in card.runtime
        rng = np.random.default_rng(4)
        hu = rng.integers(-1100, 1400, (18, 40, 36)).astype(np.int16)
        hu[:, :2] = -1000  # air at the border, as around a patient
        for _ in range(2):  # warm: one process, loaded once
            prediction = model.predict(_volume(hu))
            np.testing.assert_array_equal(prediction.labelmap, expected([hu], PART_A["logits"]))
        pid = model._proc.pid  # type: ignore[attr-defined]
        model.predict(_volume(hu))
        assert model._proc.pid == pid  # type: ignore[attr-defined]
        volumes = {label: m[0].value for label, m in prediction.measurements.items()}
        voxel_ml = np.prod(SPACING) / 1000
        assert volumes[1] == pytest.approx(np.count_nonzero(expected([hu], PART_A["logits"]) == 1) * voxel_ml)
    finally:
        registry.close()


def test_resampled_model_and_orientation_keep_the_grid(nnunet_env: dict[str, Any]) -> None:
    """A model planned at another spacing resamples and comes back on the series' grid; RAS input is mirrored back."""
    folders = nnunet_env["folders"]
    settings = _ns(tmp=nnunet_env["tmp"], state=str(nnunet_env["tmp"] / "state"),
                   coarse={"type": "nnunet", "path": str(folders["coarse"]), "environment": "managed",
                           "mirroring": False},
                   ras={"type": "nnunet", "path": str(folders["b"]), "environment": "managed", "orientation": "RAS",
                        "tile_step": 0.75})
    registry = ModelRegistry(settings.models, state_dir=settings.storage.resolved_path())
    try:
        z, y, x = np.mgrid[0:20, 0:48, 0:40]
        hu = np.where((z - 10) ** 2 / 40 + (y - 24) ** 2 / 200 + (x - 20) ** 2 / 150 < 1, -800, 200).astype(np.int16)
        truth = expected([hu], PART_B["logits"])
        coarse = registry.get("coarse").predict(_volume(hu)).labelmap
        assert coarse is not None and coarse.shape == hu.shape
        dice = 2 * np.count_nonzero((coarse == 1) & (truth == 1)) / (np.count_nonzero(coarse == 1) +
                                                                    np.count_nonzero(truth == 1))
        assert dice > 0.9, dice
        # LPS axes with x pointing left and z down: the RAS model sees it flipped, the node flips the answer back.
        ras = registry.get("ras")
        for odd in (np.array([[0, 0, -1.0], [0, 1.0, 0], [1.0, 0, 0]]),  # z inferior, x left: flips
                    np.array([[0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]])):  # array axes along y and z: a permutation
            np.testing.assert_array_equal(ras.predict(_volume(hu, odd)).labelmap, truth)
    finally:
        registry.close()


def _seg_in_orthanc(orthanc: Any, study_uid: str) -> list[dict[str, Any]]:
    return [s for s in orthanc.series_of_study(study_uid) if s["MainDicomTags"].get("Modality") in ("SEG", "SR")]


def _download(orthanc: Any, series_id: str, dest: Path) -> pydicom.Dataset:
    instances = orthanc.get(f"/series/{series_id}/instances")
    assert len(instances) == 1
    dest.write_bytes(orthanc.get_bytes(f"/instances/{instances[0]['ID']}/file"))
    assert dciodvfy_errors(dest) == [], dest
    return pydicom.dcmread(dest)


def _results(orthanc: Any, study_uid: str, tmp: Path) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    found = wait_until(lambda: (lambda s: s if len(s) == 2 else None)(_seg_in_orthanc(orthanc, study_uid)), 300,
                       "SEG and SR in Orthanc")
    by = {s["MainDicomTags"]["Modality"]: s["ID"] for s in found}
    return _download(orthanc, by["SEG"], tmp / "seg.dcm"), _download(orthanc, by["SR"], tmp / "sr.dcm")


def _texts(ds: pydicom.Dataset) -> list[str]:
    """Every TEXT value of an SR's content tree."""
    out: list[str] = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            out.append(str(item.TextValue))
        out.extend(_texts(item))
    return out


def _masks(seg: pydicom.Dataset, sources: list[Path]) -> dict[str, np.ndarray]:
    """Each segment's mask on the source grid, by segment label."""
    parsed = hd.seg.Segmentation.from_dataset(seg)
    headers = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in sources),
                     key=lambda ds: float(ds.ImagePositionPatient[2]))
    uids = [str(ds.SOPInstanceUID) for ds in headers]
    out = {}
    for number in parsed.segment_numbers:
        pixels = parsed.get_pixels_by_source_instance(uids, segment_numbers=[number], assert_missing_frames_are_empty=True)
        out[parsed.get_segment_description(number).segment_label] = pixels[..., 0]
    return out


def test_merged_task_end_to_end_one_seg_with_every_label(nnunet_env: dict[str, Any], tmp_path: Path,
                                                         orthanc_factory: Any, node_factory: Any) -> None:
    python, folders = str(nnunet_env["python"]), nnunet_env["folders"]
    pacs_port = free_port()
    models = {
        "part-a": {"type": "nnunet", "path": str(folders["a"]), "environment": python},
        "part-b": {"type": "nnunet", "path": str(folders["b"]), "environment": python, "folds": [0]},
        "total": {"type": "merge", "models": ["part-a", "part-b"], "version": "2.0"},
    }
    rules = [{"name": "ct", "when": {"Modality": "CT"}, "run": ["total"], "outputs": ["seg", "sr"],
              "send_to": ["pacs"]}]
    node = node_factory(node_config(tmp_path, destinations={
        "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}}, models=models, rules=rules))
    orthanc = orthanc_factory(node.port, dicom_port=pacs_port)
    rng = np.random.default_rng(8)
    hu = rng.integers(-1000, 900, (12, 32, 30)).astype(np.int16)
    files = write_ct_series(hu, SPACING, tmp_path / "ct")
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(orthanc.dicom_port, files, aec="ORTHANC").returncode == 0
    seg, sr = _results(orthanc, study, tmp_path)

    a, b = expected([hu], PART_A["logits"]), expected([hu], PART_B["logits"])
    masks = _masks(seg, files)
    assert sorted(masks) == ["Left kidney", "Liver", "Spleen"]  # one SEG, the union of both folders' labels
    np.testing.assert_array_equal(masks["Spleen"], (a == 1).astype(np.uint8))
    np.testing.assert_array_equal(masks["Left kidney"], (a == 2).astype(np.uint8))
    assert np.count_nonzero((a > 0) & (b == 1)) > 0  # the parts overlap
    np.testing.assert_array_equal(masks["Liver"], ((b == 1) & (a == 0)).astype(np.uint8))  # overlap: first wins
    codes = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    assert codes == {"Spleen": "78961009", "Left kidney": "64033007", "Liver": "10200004"}
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    names = {g.finding_type.meaning for g in report.content.get_volumetric_roi_measurement_groups()}
    assert names == {"Spleen", "Kidney", "Liver"}
    assert any("voxel(s) labelled by more than one model" in t for t in _texts(sr)), _texts(sr)
    infer = [j for s in node.status_json() for j in s["jobs"] if j["kind"] == "infer"]
    assert infer and infer[0]["state"] == "done"
    notes = " ".join(infer[0]["payload"].get("notes", []))
    assert "nnUNetTrainer__nnUNetPlans__3d_fullres, folds 0,1, checkpoint_final.pth sha256:" in notes, infer[0]
    assert "Traceback" not in node.log()


def test_two_channel_model_on_two_phases_end_to_end(nnunet_env: dict[str, Any], tmp_path: Path,
                                                    orthanc_factory: Any, node_factory: Any) -> None:
    python, folders = str(nnunet_env["python"]), nnunet_env["folders"]
    pacs_port = free_port()
    models = {"phases": {"type": "nnunet", "path": str(folders["phases"]), "environment": python,
                         "channels": ["arterial", "venous"]}}
    rules = [{"name": "phases", "when": {"Modality": "CT"}, "run": ["phases"], "outputs": ["seg", "sr"],
              "send_to": ["pacs"],
              "study": {"series": {"arterial": {"SeriesDescription": {"regex": "(?i)arterial"}},
                                   "venous": {"SeriesDescription": {"regex": "(?i)venous"}}},
                        "quiet_seconds": 1, "max_wait_seconds": 120}}]
    node = node_factory(node_config(tmp_path, quiet_seconds=1.0, destinations={
        "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}}, models=models, rules=rules))
    orthanc = orthanc_factory(node.port, dicom_port=pacs_port)
    rng = np.random.default_rng(9)
    arterial = rng.integers(-200, 300, (10, 28, 26)).astype(np.int16)
    venous = arterial.copy()
    venous[2:7, 5:15, 6:18] += 120
    study, frame = generate_uid(), generate_uid()
    files: dict[str, list[Path]] = {}
    for number, (role, hu) in enumerate((("arterial", arterial), ("venous", venous)), start=1):
        files[role] = write_ct_series(hu, SPACING, tmp_path / role, study_uid=study, series_uid=generate_uid(),
                                      frame_of_reference_uid=frame, series_number=number,
                                      series_description=f"Abdomen {role} phase")
    assert storescu(orthanc.dicom_port, files["arterial"] + files["venous"], aec="ORTHANC").returncode == 0
    seg, _sr = _results(orthanc, study, tmp_path)
    truth = expected([arterial, venous], TWO_PHASE["logits"])
    masks = _masks(seg, files["arterial"])  # results are on the first channel's series
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == str(
        pydicom.dcmread(files["arterial"][0], stop_before_pixels=True).SeriesInstanceUID)
    np.testing.assert_array_equal(masks["Liver"], (truth == 1).astype(np.uint8))
    np.testing.assert_array_equal(masks["Spleen"], (truth == 2).astype(np.uint8))
