"""Bring-your-own models through the whole node: DICOM in, SEG/SR out, failures isolated.

One node (a ``dicom-node serve`` subprocess) hosts a TorchScript export, a MONAI
bundle directory, python callables (segmentation, classification, a chain) and
three misbehaving models.  ``storescu`` sends synthetic series and the shared
real-world test series straight to the node; the tests read ``dicom-node
status --json`` and the result files in the spool.  Every SEG is decoded per
*source instance* with highdicom and compared with what the model computes on
those pixels.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from monai.networks.nets import UNet
from pydicom.pixels import apply_modality_lut

from dicom_node.errors import ImagingError
from dicom_node.imaging import load_series
from dicom_node.results.sr import report_findings
from inference.models.monai_bundle import MonaiBundleModel
from tests.integration.conftest import node_config, require_tool, storescu, wait_until
from tests.models_factory import (
    TISSUE,
    UNET_DEF,
    threshold_conv,
    write_bundle,
    write_python_models,
    write_torchscript,
)
from tests.phantoms import write_ct_series
from tests.realdata import dicomdir_series, read, real_mr_slices, registry_file, write

pytestmark = pytest.mark.integration

GEOMETRY_CASES = ("ct_clean", "ct_gap", "mr_radial", "enhanced_ct", "ct_samepos", "mr")


def _geometry_cases(tmp: Path) -> dict[str, list[Path]]:
    """Real series of the package registries, each a geometry case the node must accept or refuse."""
    samepos = read(dicomdir_series("98892001/CT5N"))
    for ds in samepos:
        ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["samepos"])
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["samepos", str(ds.SOPInstanceUID)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = samepos[0].ImagePositionPatient
    return {
        "ct_clean": dicomdir_series("98892001/CT5N"),  # 5 slices, 2.5 mm: a volume
        "ct_gap": dicomdir_series("77654033/CT2"),  # 202.5, 1.25, 1.25 mm: a slice gap
        "mr_radial": dicomdir_series("98892003/MR700"),  # 7 orientations
        "enhanced_ct": [registry_file("eCT_Supplemental.dcm")],  # one multi-frame object
        "ct_samepos": write(samepos, tmp / "samepos"),  # every slice at one position
        "mr": write(real_mr_slices(2), tmp / "mr"),  # an MR volume, for the CT model to refuse
    }
LABEL = [{"value": 1, "name": "Tissue", "snomed": TISSUE}]
SHAPE, SPACING = (10, 32, 32), (2.5, 1.5, 1.5)


def _phantom(seed: int) -> np.ndarray:
    """Air with a soft-tissue ball (x < 16) and a block (x >= 16) holding a bright spot."""
    z, y, x = np.mgrid[0:SHAPE[0], 0:SHAPE[1], 0:SHAPE[2]]
    hu = np.full(SHAPE, -1000.0)
    hu[((z - 5) * 2.5) ** 2 + ((y - 16) * 1.5) ** 2 + ((x - 8) * 1.5) ** 2 < 9.0**2] = 40.0
    hu[2:8, 8:24, 19:29] = 60.0
    hu[4:6, 12:15, 22:25] = 500.0
    return hu + np.random.default_rng(seed).normal(0, 5, SHAPE).round()


def _models(tmp: Path) -> dict[str, Any]:
    code = write_python_models(tmp / "python_models")
    torch.manual_seed(0)
    bundle = write_bundle(tmp / "spleen_ct_segmentation", UNet(3, 1, 2, channels=(4, 8), strides=(2,),
                                                               num_res_units=0), UNET_DEF, pixdim=(3.0, 3.0, 3.0))
    ts = write_torchscript(threshold_conv(-499.5), tmp / "threshold.ts")
    above_mean = write_torchscript(threshold_conv(0.0), tmp / "above_mean.ts")

    def py(func: str, **kw: Any) -> dict[str, Any]:
        return {"type": "python", "callable": f"node_test_models:{func}", "path": str(code), **kw}

    regions = [{"value": 1, "name": "Ball", "snomed": TISSUE}, {"value": 2, "name": "Block", "snomed": TISSUE}]
    return {
        "ts": {"type": "torchscript", "path": str(ts), "modality": "CT", "labels": LABEL, "device": "auto",
               "preprocessing": {"orientation": "RAS", "roi_size": [16, 16, 16], "sw_batch_size": 2}},
        "bundle": {"type": "monai_bundle", "path": str(bundle), "device": "auto"},
        "any": {"type": "torchscript", "path": str(above_mean), "labels": LABEL, "device": "cpu",
                "preprocessing": {"orientation": "LPS", "normalize": "zscore"}},
        "py": py("threshold", labels=LABEL),
        "cls": py("dark_fraction", task="classification", classes=["mostly dark", "mostly bright"],
                  threshold=0.6),
        "regions": py("two_blobs", labels=regions),
        "bright": py("bright", labels=[{"value": 1, "name": "Bright spot", "snomed": TISSUE}]),
        "chain": {"type": "chain", "first": "regions", "then": "bright", "margin_mm": 3},
        "raises": py("raises", labels=LABEL),
        # Long enough for the test to see it running (each `dicom-node status` call takes seconds on a busy CI).
        "hangs": py("hangs", labels=LABEL, timeout_s=20),
        "kills": py("kills_itself", labels=LABEL),
    }


def _rules(testdata_uids: list[str], mr_uid: str) -> list[dict[str, Any]]:
    rules = [{"name": f"r-{m}", "when": {"SeriesDescription": m.upper()}, "run": [m], "outputs": ["seg", "sr"]}
             for m in ("ts", "bundle", "py", "cls", "chain", "raises", "hangs", "kills")]
    rules.append({"name": "testdata", "when": {"SeriesInstanceUID": testdata_uids}, "run": ["any"],
                  "outputs": ["seg"]})
    rules.append({"name": "mr-to-ct-model", "when": {"SeriesInstanceUID": mr_uid}, "run": ["bundle"],
                  "outputs": ["seg"]})
    return rules


def _jobs(node: Any) -> dict[str, dict[str, Any]]:
    """``series description or uid/model -> job`` from ``dicom-node status --json``."""
    out = {}
    for series in node.status_json():
        for job in series["jobs"]:
            if job["kind"] == "infer":
                out[f"{series['series_uid']}/{job['model']}"] = job
    return out


def _seg_masks_by_source(seg_path: Path, sources: list[pydicom.Dataset], segment: int) -> list[np.ndarray]:
    """The SEG's mask of ``segment`` for each source image (or frame), via the SEG's own references."""
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(seg_path))
    masks = []
    for ds in sources:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            px = seg.get_pixels_by_source_frame(ds.SOPInstanceUID, source_frame_numbers=list(range(1, frames + 1)),
                                                segment_numbers=[segment], assert_missing_frames_are_empty=True)
            masks.extend(px[..., 0])
        else:
            px = seg.get_pixels_by_source_instance([ds.SOPInstanceUID], segment_numbers=[segment],
                                                   assert_missing_frames_are_empty=True)
            masks.append(px[0, ..., 0])
    return masks


def _source_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """Modality values (HU for CT) of every frame, in frame order.

    pydicom's ``apply_modality_lut`` reads the top-level Rescale only; an Enhanced CT
    keeps it in the Pixel Value Transformation of its functional groups (shared or per frame).
    """
    stored = ds.pixel_array
    stored = stored if stored.ndim == 3 else stored[None]
    if "RescaleSlope" in ds or "PerFrameFunctionalGroupsSequence" not in ds:
        return apply_modality_lut(stored, ds).astype(np.float32)
    shared = ds.get("SharedFunctionalGroupsSequence", [pydicom.Dataset()])[0]
    frames = []
    for index, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        transform = (frame.get("PixelValueTransformationSequence")
                     or shared.get("PixelValueTransformationSequence") or [pydicom.Dataset()])[0]
        slope, intercept = float(transform.get("RescaleSlope", 1)), float(transform.get("RescaleIntercept", 0))
        frames.append(stored[index].astype(np.float32) * slope + intercept)
    return np.stack(frames)


def _sr_items(path: Path) -> list[tuple[str, Any]]:
    """(concept meaning, value) of every content item of an SR, depth first."""
    out: list[tuple[str, Any]] = []

    def walk(items: Any) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if "ConceptCodeSequence" in item:
                out.append((name, item.ConceptCodeSequence[0].CodeMeaning))
            if "MeasuredValueSequence" in item:
                out.append((name, float(item.MeasuredValueSequence[0].NumericValue)))
            walk(item.get("ContentSequence", []))

    walk(pydicom.dcmread(path).ContentSequence)
    return out


def test_models_of_every_type_run_through_the_node(tmp_path: Path, node_factory: Any) -> None:
    require_tool("storescu")
    echoscu = require_tool("echoscu")
    geometry_files = _geometry_cases(tmp_path / "geometry")
    uids = {case: str(pydicom.dcmread(f[0], stop_before_pixels=True).SeriesInstanceUID)
            for case, f in geometry_files.items()}

    config = node_config(tmp_path, models=_models(tmp_path), rules=_rules(list(uids.values()),
                                                                         uids["mr"]),
                         workers={"infer": 1, "infer_timeout_s": 120})
    node = node_factory(config)

    series: dict[str, list[Path]] = {}
    for i, name in enumerate(("ts", "bundle", "py", "cls", "chain", "raises", "kills", "hangs")):
        series[name] = write_ct_series(_phantom(i), SPACING, tmp_path / "series" / name,
                                       series_description=name.upper(), series_number=i + 1)
    desc_uid = {name: str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
                for name, files in series.items()}

    for name in ("ts", "bundle", "py", "cls", "chain", "raises", "kills", "hangs"):
        sent = storescu(node.port, series[name], aec="DICOMNODE")
        assert sent.returncode == 0, sent.stderr

    # While the hanging model holds the worker, the node keeps receiving (C-STORE and C-ECHO).
    wait_until(lambda: _jobs(node).get(f"{desc_uid['hangs']}/hangs", {}).get("state") == "running", 240,
               "the hanging model to start")
    for case, files in geometry_files.items():
        sent = storescu(node.port, files, aec="DICOMNODE")
        assert sent.returncode == 0, f"{case}: {sent.stderr}"
    echo = subprocess.run([echoscu, "-aec", "DICOMNODE", "127.0.0.1", str(node.port)], capture_output=True,
                          text=True, timeout=60)
    assert echo.returncode == 0, echo.stderr

    expected_jobs = [f"{desc_uid[n]}/{n}" for n in series] + [f"{uids[c]}/any" for c in GEOMETRY_CASES] + [
        f"{uids['mr']}/bundle"]

    def all_finished() -> dict[str, dict[str, Any]] | None:
        jobs = _jobs(node)
        done = all(jobs.get(k, {}).get("state") in ("done", "failed") for k in expected_jobs)
        return jobs if done else None

    jobs = wait_until(all_finished, 300, "every INFER job to finish")
    job = {k.split("/")[1] if k.split("/")[0] in desc_uid.values() else k: v for k, v in jobs.items()}

    # Misbehaving models fail only their own job, each with its reason.
    assert job["raises"]["state"] == "failed" and "deliberate failure" in job["raises"]["reason"]
    assert job["hangs"]["state"] == "failed" and "timed out after 20 s" in job["hangs"]["reason"]
    assert job["kills"]["state"] == "failed" and "worker process died" in job["kills"]["reason"]
    assert "exit code -9" in job["kills"]["reason"]

    state = node.state / "spool"

    def result(name: str, kind: str) -> Path:
        files = [f for f in job[name]["payload"]["files"] if f.endswith(f"/{kind}.dcm")]
        assert len(files) == 1, (name, job[name])
        return state / files[0]

    # Threshold models (TorchScript, python): the mask is exactly "HU above -499.5" on every source image.
    for name in ("ts", "py"):
        assert job[name]["state"] == "done", job[name]
        sources = [pydicom.dcmread(f) for f in series[name]]
        masks = _seg_masks_by_source(result(name, "seg"), sources, 1)
        for ds, mask in zip(sources, masks):
            np.testing.assert_array_equal(mask, _source_pixels(ds)[0] > -499.5, err_msg=f"{name} {ds.InstanceNumber}")

    # The MONAI bundle: the SEG holds what the bundle computes on these files.
    assert job["bundle"]["state"] == "done", job["bundle"]
    sv = load_series(series["bundle"])
    spec = type("Spec", (), {"device": "cpu", "amp": False, "activation": "softmax", "threshold": 0.5,
                             "task": "segmentation", "classes": (), "version": None, "intended_use": "",
                             "modality": "", "config_file": None, "overlap": None, "sw_batch_size": None})()
    expected = MonaiBundleModel("bundle", tmp_path / "spleen_ct_segmentation", spec).predict(sv.volume).labelmap
    assert expected is not None and expected.any()
    masks = _seg_masks_by_source(result("bundle", "seg"), list(sv.sources), 1)
    np.testing.assert_array_equal(np.stack(masks), expected == 1)

    # Classification: an SR with the class, yes/no against the threshold, and the probability.
    assert job["cls"]["state"] == "done", job["cls"]
    dark = float(np.mean(np.concatenate([_source_pixels(pydicom.dcmread(f)).ravel() for f in series["cls"]]) < 0))
    items = _sr_items(result("cls", "sr"))
    # In the report's qualitative evaluations: the class -> Yes/No, and the verdict with its probability.
    verdicts = report_findings(pydicom.dcmread(result("cls", "sr")))
    probabilities = [float(text.rsplit("probability ", 1)[1]) for text in verdicts]
    assert probabilities == pytest.approx([dark, 1 - dark], abs=5e-4)
    assert ("mostly dark", "Yes" if dark >= 0.6 else "No") in items

    # Chain: ball and block from the first model, the bright spot (label 3) from the region expert.
    assert job["chain"]["state"] == "done", job["chain"]
    sources = [pydicom.dcmread(f) for f in series["chain"]]
    seg = pydicom.dcmread(result("chain", "seg"))
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == ["Ball", "Block", "Bright spot"]
    spot = _seg_masks_by_source(result("chain", "seg"), sources, 3)
    for ds, mask in zip(sources, spot):
        np.testing.assert_array_equal(mask, _source_pixels(ds)[0] > 299.5)

    # Real-world geometry: accepted (mask = voxels above the volume's mean, on each source image or frame)
    # or refused with the imaging module's reason, visible in the status.
    for case in GEOMETRY_CASES:
        files = geometry_files[case]
        entry = jobs[f"{uids[case]}/any"]
        try:
            sv = load_series(files)
        except ImagingError as exc:
            assert entry["state"] == "failed" and entry["reason"] == str(exc), (case, entry)
            continue
        if "FrameOfReferenceUID" not in sv.sources[0]:
            # A volume, but a SEG must share its source's frame of reference (highdicom refuses).
            assert entry["state"] == "failed" and "Frame Of Reference UID" in entry["reason"], (case, entry)
            continue
        assert entry["state"] == "done", (case, entry["reason"])
        mean = float(sv.volume.array.mean())
        seg_path = state / [f for f in entry["payload"]["files"] if f.endswith("/seg.dcm")][0]
        masks = _seg_masks_by_source(seg_path, list(sv.sources), 1)
        pixels = np.concatenate([_source_pixels(ds) for ds in sv.sources])
        np.testing.assert_array_equal(np.stack(masks), pixels > mean, err_msg=case)

    # A CT model refuses an MR series with a clear reason.
    refused = jobs[f"{uids['mr']}/bundle"]
    assert refused["state"] == "failed"
    assert refused["reason"] == "model bundle takes CT input; this series is MR: not run"
