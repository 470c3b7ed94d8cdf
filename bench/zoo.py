"""Every bundle of a MONAI Model Zoo checkout, run by the node with random weights: builds, runs, valid SEG.

``python -m bench zoo --zoo PATH [--work DIR] [--only NAME,...] [--no-managed]
[--requirements NAME=REQ,REQ ...]``

``PATH`` is a checkout of Project-MONAI/model-zoo (its ``models/`` folder);
nothing of it is copied into this repository.  For each bundle:

* **scope**: 3D radiology segmentation or detection (from its metadata:
  3D ``spatial_shape``, output ``segmentation``/``labels`` or ``object``);
  others (2D, pathology, endoscopy, generative, registration) are listed
  with the reason and not run;
* **builds**: the bundle's ``network_def`` is instantiated as written (its
  own ``scripts/`` importable) and its random initial weights saved as
  ``models/model.pt`` of a copy under ``--work``; if that fails in the
  node's environment, the bundle gets a managed environment planned from
  its ``metadata.json`` (``dicom-node models install`` does the same) and
  is built and run there;
* **runs**: the node's whole job (:func:`dicom_node.scheduler.pipeline.run_infer`)
  on a synthetic CT or MR series of the bundle's modality (one series per
  input channel, one frame of reference), through the bundle's own
  preprocessing, inferer and postprocessing;
* **valid SEG**: ``dciodvfy`` on the SEG it made (errors counted);
* **labels**: how many, and from where (``channel_def``, ``label_def``, or
  the labels this command gives the BraTS bundle, whose channel_def names
  overlapping regions).

Prints one markdown table (README "Model Zoo" section).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

#: BraTS labels written by brats_mri_segmentation's postprocessing (1, 2, 4), with SNOMED CT codes.
BRATS_LABELS = """
    labels:
      - {value: 1, name: Necrotic tumor core, snomed: {value: "86049000", meaning: "Malignant neoplasm, primary"}}
      - {value: 2, name: Peritumoral edema, snomed: {value: "79654002", meaning: Edema}}
      - {value: 4, name: Enhancing tumor, snomed: {value: "4147007", meaning: Mass}}
"""

WEIGHTS_CODE = """
import sys, torch
from pathlib import Path
from monai.bundle import ConfigParser
from inference.models.monai_bundle import BundleImports, find_config
bundle = Path(sys.argv[1])
with BundleImports(bundle):
    parser = ConfigParser()
    parser.read_config(str(find_config(bundle, None)))
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), str(bundle / "models" / "model.pt"))
print(type(net).__name__, sum(p.numel() for p in net.parameters()))
"""


def _scope(metadata: dict[str, Any]) -> tuple[str, str]:
    """``("segmentation" | "detection" | "", reason when out of scope)``."""
    fmt = metadata.get("network_data_format", {})
    image = next(iter((fmt.get("inputs") or {}).values()), {}) or {}
    pred = (fmt.get("outputs") or {}).get("pred") or next(iter((fmt.get("outputs") or {}).values()), {}) or {}
    shape = image.get("spatial_shape") or []
    modality = str(image.get("modality", "")).upper()
    if len(shape) != 3:
        return "", f"{len(shape)}D input" if shape else "no image input (generative)"
    if modality not in ("CT", "MR", "MRI"):
        return "", f"input modality {image.get('modality')!r}"
    kind = str(pred.get("type", "")).lower()
    if kind == "object":
        return "detection", ""
    if str(pred.get("format", "")).lower() in ("segmentation", "labels"):
        return "segmentation", ""
    return "", f"output {pred.get('format') or kind or '?'}"


def _copy(bundle: Path, work: Path) -> Path:
    target = work / "bundles" / bundle.name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(bundle, target, ignore=shutil.ignore_patterns("docs", "*.pt", "*.ts", "*.zip", "large_files*"))
    (target / "models").mkdir(exist_ok=True)
    return target


def _random_weights(bundle: Path, python: Path, inference_path: Path | None) -> str:
    env = None
    if inference_path is not None:
        env = {"PYTHONPATH": str(inference_path), "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    out = subprocess.run([str(python), "-c", WEIGHTS_CODE, str(bundle)], capture_output=True, text=True,
                         env=env, cwd=str(inference_path or bundle), timeout=900)
    if out.returncode != 0:
        lines = [line.strip() for line in out.stderr.strip().splitlines() if line.strip()]
        # The root cause (a missing file, a module) rather than MONAI's wrapping "Failed to evaluate".
        causes = [line for line in lines if "No such file" in line or "FileNotFound" in line
                  or "ModuleNotFound" in line or "ImportError" in line]
        errors = [line for line in lines if "Error" in line and "Failed to evaluate" not in line]
        found = causes or errors or lines
        raise RuntimeError((found[-1] if found else f"exit {out.returncode}")[:300])
    return out.stdout.strip().splitlines()[-1]


def _downloaded_files(bundle: Path) -> list[str]:
    """Files other than the weights that the bundle's large_files list downloads (e.g. DiNTS architecture codes)."""
    import yaml

    for name in ("large_files.yml", "large_files.yaml", "large_files.json"):
        path = bundle / name
        if path.is_file():
            data = yaml.safe_load(path.read_text()) or {}
            items = data.get("large_files", []) if isinstance(data, dict) else []
            return [str(i.get("path")) for i in items if isinstance(i, dict)
                    and str(i.get("path")) not in ("models/model.pt", "models/model.ts")
                    and not str(i.get("path", "")).endswith((".onnx", ".plan"))]
    return []


def _series(modality: str, channels: int, folder: Path) -> list[tuple[str, list[Path]]]:
    """One synthetic series per channel (one study, one frame of reference), MR when the bundle takes MR."""
    import numpy as np
    import pydicom
    from pydicom.uid import MRImageStorage, generate_uid

    from tests.phantoms import make_chest_phantom, write_ct_series

    hu, _ = make_chest_phantom((40, 96, 96), (2.5, 2.0, 2.0))
    study, frame = generate_uid(), generate_uid()
    out = []
    for c in range(channels):
        uid = generate_uid()
        image = hu if c == 0 else hu + np.random.default_rng(c).normal(0, 20, hu.shape)
        files = write_ct_series(image, (2.5, 2.0, 2.0), folder / study / uid, study_uid=study,
                                series_uid=uid, frame_of_reference_uid=frame, series_number=c + 1,
                                series_description=f"channel {c}")
        if modality.startswith("MR"):
            for f in files:
                ds = pydicom.dcmread(f)
                ds.Modality, ds.SOPClassUID = "MR", MRImageStorage
                ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
                for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType", "KVP"):
                    if keyword in ds:
                        delattr(ds, keyword)
                ds.save_as(f)
        out.append((uid, files))
    return out


def _dciodvfy(path: Path) -> str:
    tool = shutil.which("dciodvfy")
    if tool is None:
        return "dciodvfy not installed"
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=600)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    return "yes (0 errors)" if not errors else f"no ({len(errors)} errors: {errors[0][:80]})"


def _run_one(bundle: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from dicom_node.scheduler.pipeline import InferTask, run_infer
    from dicom_node.settings import load_settings_text
    from dicom_node.spool import Spool
    from inference.environments import environment_dir, install, link_inference, plan_for, python_of
    from inference.models.monai_bundle import channel_names
    from inference.registry import ModelRegistry

    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    row: dict[str, Any] = {"bundle": bundle.name, "builds": "", "runs": "", "seg": "", "labels": "", "env": "shared"}
    task_kind, reason = _scope(metadata)
    if not task_kind:
        row.update(builds="-", runs=f"not run: {reason}", seg="-", labels="-", env="-")
        return row
    copy = _copy(bundle, work)
    image = next(iter(metadata["network_data_format"]["inputs"].values()))
    channels = int(image.get("num_channels", 1) or 1)
    pred = metadata["network_data_format"]["outputs"].get("pred", {})
    names = channel_names(metadata)
    key = "label_def" if "label_def" in pred else "channel_def"
    extra_requirements = args.requirements.get(bundle.name, [])
    environment = "shared"
    state = work / "state"
    try:
        row["builds"] = "yes: " + _random_weights(copy, Path(sys.executable), None)
    except RuntimeError as shared_error:
        row["builds"] = f"no: {shared_error}"
        needed = [f for f in _downloaded_files(bundle) if not (bundle / f).exists()]
        if needed:
            row.update(builds=f"no: its network_def needs the downloaded file(s) {', '.join(needed)} "
                              "(large_files.yml), not in the checkout", runs="-", seg="-")
            return row
        if args.no_managed:
            row.update(runs="-", seg="-")
            return row
        environment = "managed"
        spec = load_settings_text(f"models: {{m: {{type: monai_bundle, path: {copy}, environment: managed, "
                                  f"requirements: {json.dumps(extra_requirements)}}}}}").models["m"]
        try:
            install(bundle.name, spec, state, progress=lambda line: print("   ", line, flush=True))
            directory = environment_dir(state, plan_for(bundle.name, spec))
            row["builds"] = "yes (managed): " + _random_weights(copy, python_of(directory),
                                                                link_inference(directory))
            row["env"] = "managed: " + ", ".join(plan_for(bundle.name, spec).packages)
        except RuntimeError as managed_error:
            row["builds"] += f"; managed: no: {str(managed_error).splitlines()[0][:200]}"
            row.update(runs="-", seg="-")
            return row
    labels = ""
    if task_kind == "segmentation" and names and names.get(0, "").lower() != "background":
        labels = BRATS_LABELS if bundle.name.startswith("brats") else ""
    roles = [f"ch{c}" for c in range(channels)]
    model = (f"  m:\n    type: monai_bundle\n    path: {copy}\n    device: {args.device}\n"
             f"    environment: {environment}\n"
             + (f"    requirements: {json.dumps(extra_requirements)}\n" if environment == "managed" else "")
             + ("    classes: [Lung nodule]\n" if task_kind == "detection" else "") + labels)
    rule = (f"  - name: zoo\n    when: {{Modality: {'MR' if image.get('modality', '').upper().startswith('MR') else 'CT'}}}\n"
            "    run: [m]\n")
    if channels > 1:
        rule += "    study:\n      series:\n" + "".join(f"        {r}: {{SeriesDescription: channel {i}}}\n"
                                                        for i, r in enumerate(roles))
        rule += f"    channels: [{', '.join(roles)}]\n"
    settings = load_settings_text(f"storage: {{path: {state}}}\nmodels:\n{model}rules:\n{rule}")
    spool = Spool(state)
    series = _series(str(image.get("modality", "CT")).upper(), channels, spool.incoming)
    paths = {role: tuple(spool.relative(p) for p in files) for role, (_, files) in zip(roles, series)}
    inputs = tuple((role, paths[role]) for role in roles) if channels > 1 else ()
    task = InferTask(1, series[0][0], "m", paths[roles[0]], ("seg", "sr"), inputs=inputs, rule="zoo",
                     channels=tuple(roles) if channels > 1 else ())
    registry = ModelRegistry(settings.models, state_dir=state)
    started = time.monotonic()
    try:
        outcome = run_infer(task, registry, spool, settings.outputs)
    finally:
        registry.close()
    seconds = time.monotonic() - started
    if not outcome.ok:
        row.update(runs=f"no: {outcome.error[:200]}", seg="-")
        return row
    segments = [o for o in outcome.objects if o.kind == "seg"]
    if task_kind == "detection":
        import highdicom as hd
        import pydicom

        sr_path = spool.absolute(next(o.path for o in outcome.objects if o.kind == "sr"))
        report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(sr_path))
        boxes = len(report.content.get_planar_roi_measurement_groups())
        row["runs"] = f"yes, {seconds:.0f} s: {boxes} boxes (SCOORD3D) in the SR"
        row["seg"] = f"no SEG (boxes); SR: {_dciodvfy(sr_path)}"
        row["labels"] = "1 class (config: Lung nodule)"
        return row
    row["runs"] = f"yes, {seconds:.0f} s"
    row["seg"] = _dciodvfy(spool.absolute(segments[0].path)) if segments else "no SEG (no segment present)"
    row["labels"] = (f"{len(names) - (1 if names.get(0, '').lower() == 'background' else 0)} from {key}"
                     if not labels else "3 from the config (channel_def names overlapping regions)")
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, help="a checkout of Project-MONAI/model-zoo")
    parser.add_argument("--work", type=Path, help="where copies, weights, series and environments go "
                                                  "(default: a temporary folder)")
    parser.add_argument("--only", default="", help="comma-separated bundle names")
    parser.add_argument("--device", default="cpu", choices=("cpu", "auto"))
    parser.add_argument("--no-managed", action="store_true", help="do not build managed environments")
    parser.add_argument("--requirements", nargs="*", default=[], metavar="NAME=REQ,REQ",
                        help="extra requirements of a bundle's managed environment")
    args = parser.parse_args(argv)
    if args.zoo is None:
        print("zoo: skipped (needs --zoo PATH, a checkout of Project-MONAI/model-zoo)")
        return 0
    args.requirements = {k: v.split(",") for k, v in (item.split("=", 1) for item in args.requirements)}
    models = args.zoo / "models" if (args.zoo / "models").is_dir() else args.zoo
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    bundles = sorted(p for p in models.iterdir() if (p / "configs" / "metadata.json").is_file()
                     and (not only or p.name in only))
    work = args.work or Path(tempfile.mkdtemp(prefix="dicom-node-zoo-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for bundle in bundles:
        print(f"-- {bundle.name}", flush=True)
        try:
            row = _run_one(bundle, args, work)
        except Exception as exc:  # noqa: BLE001 - one bundle's failure is its row
            traceback.print_exc()
            row = {"bundle": bundle.name, "builds": "?", "runs": f"error: {type(exc).__name__}: {exc}"[:200],
                   "seg": "-", "labels": "-", "env": "-"}
        print(f"   {row}", flush=True)
        rows.append(row)
    print("\n| bundle | builds | runs | valid SEG (dciodvfy) | labels | environment |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bundle']} | {r['builds']} | {r['runs']} | {r['seg']} | {r['labels']} | {r['env']} |")
    return 0
