"""Managed per-model Python environments (``environment: managed``; ``dicom-node models install NAME``).

A model whose code needs other packages than the node's (an older MONAI, a
package the node does not ship) runs in a virtual environment of its own.
What goes into it is a *plan*, made from what the model declares:

* for a MONAI bundle, its ``configs/metadata.json``: ``monai_version`` and
  ``optional_packages_version`` (einops, nibabel, itk...), as its authors
  made it;
* a torch this machine runs: the node's own torch release (the CUDA build on
  a GPU machine, as the node's), with the torchvision / torchaudio release
  made for it in place of the bundle's pin (those are built against one
  torch release each);
* what the bundle's transforms need that its metadata does not list
  (scikit-image for ``KeepLargestConnectedComponentd`` on the CPU);
* the model's ``requirements:``, which win over everything above.

The environment's directory is named by a digest of the plan (the packages
and the Python version), so two models with the same needs share one, and a
changed plan is a new directory: a build never changes an environment a
running model uses.  It is built in a temporary directory and renamed into
place when complete, so an interrupted build leaves nothing half-made.

The model's worker process runs in that interpreter and imports only this
``inference`` package (linked into the environment), never the node.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Packages made against one torch release: pinned to the release for the plan's torch, not the bundle's.
TORCH_COUPLED = {"torchvision": 15, "torchaudio": 0}
#: Experiment tracking and training tools some bundles list: never imported to run inference.
NOT_FOR_INFERENCE = frozenset({"tensorboard", "mlflow", "clearml", "tensorboardx"})
#: Packages of CUDA-only builds: a CPU machine cannot install them (the bundle's transforms fall back).
CUDA_ONLY = re.compile(r"^(cucim|cupy)-cu\d+$")
#: MONAI transforms whose CPU path imports a package MONAI does not require.
TRANSFORM_NEEDS = {
    "KeepLargestConnectedComponent": "scikit-image",
    "RemoveSmallObjects": "scikit-image",
    "LabelFilter": "scikit-image",
}
#: The nnU-Net v2 release the node runs ``type: nnunet`` models with (its predictor API).
NNUNET = "nnunetv2==2.8.1"

#: Packages pulled in as dependencies that a model does not need and that can break the environment: a
#: torchvision wheel from the index is built for the index's (CUDA) torch; beside a local CPU torch build its
#: compiled operators fail to register (``operator torchvision::nms does not exist``) and every import fails.
UNNEEDED_IF_BROKEN = ("torchvision",)

#: The scikit-image and PyYAML releases the node itself is tested with.
SKIMAGE = "scikit-image==0.26.0"
PYYAML = "PyYAML==6.0.4"

_NAME_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")
DESCRIPTION = "environment.json"


def package_name(requirement: str) -> str:
    """The normalised project name of a requirement (``Py_Yaml==6.0`` -> ``py-yaml``)."""
    match = _NAME_RE.match(requirement.strip())
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else requirement.strip().lower()


def node_torch() -> str:
    """The node's torch release, e.g. ``2.13.0`` (without the local build tag)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch").split("+", 1)[0]
    except PackageNotFoundError:  # pragma: no cover - the node depends on torch
        return "2.13.0"


@dataclass(frozen=True)
class Plan:
    """What a managed environment contains.

    ``packages`` are pip requirements, one per project, sorted; ``reasons``
    says where each one came from, ``left_out`` what the model's metadata
    listed and the plan does not install (and why).
    """

    model: str
    packages: tuple[str, ...]
    python_version: str = field(default_factory=lambda: platform.python_version())
    reasons: Mapping[str, str] = field(default_factory=dict)
    left_out: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        text = json.dumps({"packages": list(self.packages), "python": self.python_version,
                           "machine": platform.machine()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _bundle_needs(bundle: Path) -> tuple[dict[str, Any], set[str]]:
    """The bundle's metadata and the transforms named anywhere in its configs."""
    metadata: dict[str, Any] = {}
    meta_path = bundle / "configs" / "metadata.json"
    if meta_path.is_file():
        with open(meta_path, encoding="utf-8") as f:
            loaded = json.load(f)
        metadata = loaded if isinstance(loaded, dict) else {}
    text = " ".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted((bundle / "configs").glob("*"))
                    if p.suffix in (".json", ".yaml", ".yml") and p.is_file()) if (bundle / "configs").is_dir() else ""
    return metadata, {name for name in TRANSFORM_NEEDS if re.search(rf"\b{name}d?\b", text)}


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def plan_for(name: str, spec: Any, torch_release: str | None = None) -> Plan:
    """The plan of model ``name``'s managed environment (reads a bundle's metadata; installs nothing)."""
    torch_release = torch_release or node_torch()
    chosen: dict[str, str] = {}
    reasons: dict[str, str] = {}
    left_out: list[str] = []

    def put(requirement: str, why: str) -> None:
        chosen[package_name(requirement)] = requirement
        reasons[package_name(requirement)] = why

    put(f"torch=={torch_release}", "the node's torch release (a build this machine runs)")
    if spec.type == "monai_bundle":
        metadata, transforms = _bundle_needs(Path(spec.path).expanduser())
        monai = str(metadata.get("monai_version", "") or "").strip()
        if monai:
            put(f"monai=={monai}", "the bundle's metadata.json monai_version")
            if _version_tuple(monai) < (1, 4):
                put("numpy<2", f"MONAI {monai} predates numpy 2")
        else:
            put("monai", "a MONAI bundle without monai_version in its metadata")
        # MONAI 1.6 names it required_packages_version; the published bundles optional_packages_version.
        optional = metadata.get("required_packages_version") or metadata.get("optional_packages_version") or {}
        for pkg, ver in (optional.items() if isinstance(optional, Mapping) else ()):
            project = package_name(str(pkg))
            if project in NOT_FOR_INFERENCE:
                left_out.append(f"{pkg} {ver} (not used to run inference)")
            elif CUDA_ONLY.match(project):
                left_out.append(f"{pkg} {ver} (a CUDA-only build)")
            elif project in TORCH_COUPLED:
                major, minor = (_version_tuple(torch_release) + (0, 0))[:2]
                paired = f"{project}==0.{minor + TORCH_COUPLED[project]}.*" if project == "torchvision" and \
                    major == 2 else f"{project}=={torch_release}" if project == "torchaudio" else project
                put(paired, f"the release of {project} built for torch {torch_release} (the bundle lists {ver})")
            else:
                put(f"{pkg}=={ver}", "the bundle's metadata.json optional_packages_version")
        for transform in sorted(transforms):
            if package_name(TRANSFORM_NEEDS[transform]) not in chosen:
                put(SKIMAGE, f"the bundle's {transform} transform on the CPU")
        configs = Path(spec.path).expanduser() / "configs"
        if "pyyaml" not in chosen and configs.is_dir() and any(configs.glob("*.y*ml")):
            put(PYYAML, "MONAI reads the bundle's yaml configs with it")
    if spec.type == "nnunet":
        put(NNUNET, "nnU-Net v2's predictor runs the model (the release the node is tested with)")
    for requirement in getattr(spec, "requirements", ()) or ():
        put(requirement, "the model's requirements")
    return Plan(model=name, packages=tuple(chosen[k] for k in sorted(chosen)), reasons=dict(sorted(reasons.items())),
                left_out=tuple(left_out))


def environments_root(state_dir: Path) -> Path:
    return Path(state_dir) / "environments"


def environment_dir(state_dir: Path, plan: Plan) -> Path:
    return environments_root(state_dir) / plan.key


def python_of(directory: Path) -> Path:
    return directory / "bin" / "python"


def inference_path(directory: Path) -> Path:
    """The folder put on the environment's ``PYTHONPATH``: it holds only a link to this ``inference`` package."""
    return directory / "node-inference"


def link_inference(directory: Path) -> Path:
    """(Re)link this ``inference`` package into ``directory`` (the node may have moved or been upgraded)."""
    folder = inference_path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "inference"
    target = Path(__file__).resolve().parent
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return folder
    tmp = folder / f".inference.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)
    return folder


def _pointer(state_dir: Path, model: str) -> Path:
    return environments_root(state_dir) / "models" / f"{model}.json"


@dataclass(frozen=True)
class EnvironmentState:
    """Whether a model's environment can run it: ``ready``, ``missing`` or ``stale``, and why."""

    state: str
    detail: str
    python: Path | None = None


def state_of(name: str, spec: Any, state_dir: Path) -> EnvironmentState:
    """Where model ``name`` runs and whether that environment is there (installs nothing)."""
    environment = getattr(spec, "environment", "shared") or "shared"
    if environment == "shared":
        if spec.type == "nnunet" and importlib.util.find_spec("nnunetv2") is None:
            return EnvironmentState("missing", "nnunetv2 is not installed in the node's environment: give the model "
                                    f"environment: managed and run dicom-node models install {name} (or install "
                                    "the node's nnunet extra)")
        return EnvironmentState("ready", "the node's own environment", Path(sys.executable))
    if environment != "managed":
        python = Path(environment)
        if python.is_file() and os.access(python, os.X_OK):
            return EnvironmentState("ready", f"interpreter {python}", python)
        return EnvironmentState("missing", f"interpreter {python} not found or not executable")
    plan = plan_for(name, spec)
    directory = environment_dir(state_dir, plan)
    if (directory / DESCRIPTION).is_file() and python_of(directory).exists():
        return EnvironmentState("ready", f"managed environment {plan.key} ({', '.join(plan.packages)})",
                                python_of(directory))
    pointer = _pointer(state_dir, name)
    if pointer.is_file():
        try:
            earlier = json.loads(pointer.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = {}
        if earlier.get("key") != plan.key:
            changed = sorted(set(plan.packages) ^ set(earlier.get("packages", ())))
            return EnvironmentState("stale", f"managed environment {earlier.get('key', '?')} was built for an "
                                    f"earlier plan (changed: {', '.join(changed) or 'Python version'}); run "
                                    f"dicom-node models install {name}")
    return EnvironmentState("missing", f"managed environment not built; run dicom-node models install {name}")


def _stream(command: list[str], progress: Callable[[str], None], env: Mapping[str, str]) -> None:
    """Run ``command``, passing each line of its output to ``progress``; raise with its last lines on failure."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(env), stdin=subprocess.DEVNULL)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if not line or "is ignored: it is neither a file nor a directory" in line:
            continue
        tail = (tail + [line])[-15:]
        progress(line)
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed (exit code {proc.returncode}):\n" + "\n".join(tail))


def install(name: str, spec: Any, state_dir: Path, *, wheels: Path | None = None, force: bool = False,
            progress: Callable[[str], None] = print) -> Path:
    """Build model ``name``'s managed environment (idempotent); returns its directory.

    Parameters
    ----------
    wheels:
        A folder of wheels: install from it only, without any index (offline).
    force:
        Build again even if an environment with this plan exists.

    Raises
    ------
    RuntimeError
        When venv or pip fails (the message ends with pip's last lines).
    """
    plan = plan_for(name, spec)
    root = environments_root(state_dir)
    directory = environment_dir(state_dir, plan)
    for requirement in plan.packages:
        progress(f"  {requirement:<32} {plan.reasons.get(package_name(requirement), '')}")
    for item in plan.left_out:
        progress(f"  left out: {item}")
    if (directory / DESCRIPTION).is_file() and not force:
        progress(f"[done] model {name}: managed environment {plan.key} is already built ({directory})")
        _write_pointer(state_dir, name, plan)
        return directory
    root.mkdir(parents=True, exist_ok=True)
    building = root / f".{plan.key}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    started = time.monotonic()
    try:
        progress(f"[1/3] model {name}: creating the virtual environment (Python {plan.python_version})")
        _stream([_base_python(), "-m", "venv", str(building)], progress, env)
        progress(f"[2/3] installing {len(plan.packages)} requirement(s)"
                 + (f" from {wheels} (offline)" if wheels else ""))
        pip = [str(python_of(building)), "-m", "pip", "install", "--no-compile", "--progress-bar", "off"]
        if wheels is not None:
            pip += ["--no-index", "--find-links", str(Path(wheels).expanduser().resolve())]
        _stream(pip + list(plan.packages), _pip_progress(progress), env)
        progress("[3/3] checking that the environment imports what the model needs")
        dropped = _drop_broken(building, plan, env, progress)
        versions = _check(building, plan, env)
        description = {"model": name, "key": plan.key, "packages": list(plan.packages),
                       "python": plan.python_version, "versions": versions, "built_at": time.time(),
                       "left_out": list(plan.left_out) + dropped}
        (building / DESCRIPTION).write_text(json.dumps(description, indent=2), encoding="utf-8")
        if directory.exists():  # --force: the old one goes only once the new one is complete
            shutil.rmtree(directory)
        os.replace(building, directory)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    _write_pointer(state_dir, name, plan)
    progress(f"[done] model {name}: managed environment {plan.key} built in {time.monotonic() - started:.0f} s "
             f"({', '.join(f'{k} {v}' for k, v in versions.items())})")
    return directory


def _base_python() -> str:
    """The interpreter venvs are made from: the base of the node's own (not the node's venv)."""
    base = Path(getattr(sys, "_base_executable", "") or sys.executable)
    return str(base if base.exists() else Path(sys.executable))


def _pip_progress(progress: Callable[[str], None]) -> Callable[[str], None]:
    """Pass pip's lines that say what it is doing; drop the 'Requirement already satisfied' noise."""
    def show(line: str) -> None:
        if line.startswith(("Collecting", "Processing", "Downloading", "Installing", "Successfully",
                            "ERROR", "WARNING: Retrying")):
            progress("      " + line)
    return show


def _drop_broken(directory: Path, plan: Plan, env: Mapping[str, str], progress: Callable[[str], None]) -> list[str]:
    """Uninstall dependencies the plan did not ask for that cannot even be imported here (see UNNEEDED_IF_BROKEN)."""
    dropped: list[str] = []
    python = str(python_of(directory))
    for project in UNNEEDED_IF_BROKEN:
        if any(package_name(p) == project for p in plan.packages):
            continue  # asked for: a failure to import is the check's to report
        probe = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version({project!r}))"],
                               capture_output=True, text=True, env=dict(env), stdin=subprocess.DEVNULL, timeout=120)
        if probe.returncode != 0:
            continue  # not installed
        version = probe.stdout.strip()
        imported = subprocess.run([python, "-c", f"import {project}"], capture_output=True, text=True,
                                  env=dict(env), stdin=subprocess.DEVNULL, timeout=300)
        if imported.returncode == 0:
            continue
        reason = (imported.stderr.strip().splitlines() or ["import failed"])[-1][:160]
        _stream([python, "-m", "pip", "uninstall", "--yes", project], lambda _line: None, env)
        note = f"{project} {version} (a dependency that does not import beside this torch: {reason})"
        progress(f"  left out: {note}")
        dropped.append(note)
    return dropped


#: What each planned project is imported as, to check it (and record its version).
_IMPORTS = {"monai": "monai", "nnunetv2": "nnunetv2"}


def _check(directory: Path, plan: Plan, env: Mapping[str, str]) -> dict[str, str]:
    """Import torch (and MONAI / nnU-Net when planned) and this package in the new environment; their versions."""
    planned = {package_name(p) for p in plan.packages}
    modules = ["torch", "numpy"] + [module for project, module in _IMPORTS.items() if project in planned]
    extra = "import nnunetv2.inference.predict_from_raw_data\n" if "nnunetv2" in planned else ""
    code = ("import json, importlib, importlib.metadata, inference.types\n" + extra +
            "print(json.dumps({m: getattr(importlib.import_module(m), '__version__', None) or "
            f"importlib.metadata.version(m) for m in {modules!r}}}))")
    run_env = dict(env)
    run_env["PYTHONPATH"] = str(link_inference(directory))
    out = subprocess.run([str(python_of(directory)), "-c", code], capture_output=True, text=True, env=run_env,
                         stdin=subprocess.DEVNULL, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"the environment does not import {', '.join(modules)}: "
                           f"{out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    versions: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    return versions


def _write_pointer(state_dir: Path, name: str, plan: Plan) -> None:
    pointer = _pointer(state_dir, name)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": plan.key, "packages": list(plan.packages)}), encoding="utf-8")
    os.replace(tmp, pointer)
