"""A model in its own Python environment: MONAI 1.4.0 beside the node's own MONAI, both warm, same answers.

``dicom-node models install`` builds the managed environment in the test
(from the package registry: torch as the node's, MONAI and the optional
packages from the bundle's metadata.json), as a user would; ``check-config``
and ``models list`` say when it is missing, and when it no longer fits the
model's plan.  The job then runs through the node's own job runner: DICOM
in, SEG out, the network in the other interpreter.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from monai.networks.nets import UNet

from dicom_node.scheduler.pipeline import InferTask, run_infer
from dicom_node.settings import load_settings
from dicom_node.spool import Spool
from inference.registry import ModelRegistry
from inference.types import Volume
from tests.models_factory import UNET_DEF, write_shaped_bundle
from tests.phantoms import make_chest_phantom, write_ct_series
from tests.tools import node_cli, require_node_cli, unavailable

OLD_MONAI = "1.4.0"

PROBE_PY = '''
import sys

import numpy as np


def where_am_i(array, geometry):
    """Fails unless it runs with MONAI 1.4.0 and without the node's own packages."""
    import monai

    if monai.__version__ != "1.4.0":
        raise RuntimeError(f"ran with MONAI {monai.__version__}")
    try:
        import dicom_node  # noqa: F401
    except ImportError:
        pass
    else:
        raise RuntimeError("the node's own package is importable in the model's environment")
    return (array > 0).astype(np.uint8)
'''


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_node_cli()
    tmp = tmp_path_factory.mktemp("environments")
    torch.manual_seed(3)
    net = UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0)
    # The metadata of a bundle made with MONAI 1.4.0, listing an optional package and a training-only one.
    bundle = write_shaped_bundle(
        tmp / "old_bundle", UNET_DEF, net.state_dict(), monai_version=OLD_MONAI,
        optional_packages={"nibabel": "5.2.1", "tensorboard": "2.17.0"},
        outputs={"type": "image", "format": "segmentation", "num_channels": 2,
                 "channel_def": {"0": "background", "1": "spleen"}},
        postprocessing=[{"_target_": "Activationsd", "keys": "pred", "softmax": True},
                        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
                         "nearest_interp": False, "to_tensor": True},
                        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}])
    (tmp / "code").mkdir()
    (tmp / "code" / "env_probe.py").write_text(PROBE_PY)
    config = tmp / "node.yaml"
    config.write_text(f"""
storage: {{path: {tmp / 'state'}}}
models:
  old:
    type: monai_bundle
    path: {bundle}
    environment: managed
    device: cpu
  new:
    type: monai_bundle
    path: {bundle}
    device: cpu
  probe:
    type: python
    callable: env_probe:where_am_i
    path: {tmp / 'code'}
    environment: managed
    requirements: [monai=={OLD_MONAI}, nibabel==5.2.1]
    labels: [{{value: 1, name: Tissue, snomed: {{value: "85756007", meaning: Tissue}}}}]
rules:
  - {{name: ct, when: {{Modality: CT}}, run: [old, new, probe]}}
""")
    return {"tmp": tmp, "config": config, "bundle": bundle}


def test_missing_environment_is_said_then_models_install_builds_it(node: dict[str, Any]) -> None:
    config = str(node["config"])
    check = node_cli("check-config", config)
    assert check.returncode == 0, check.stderr
    assert "model 'old': environment missing: managed environment not built; run dicom-node models install old" \
        in check.stdout
    listed = node_cli("models", "list", "--config", config)
    assert listed.returncode == 0 and "missing" in listed.stdout.split("old", 1)[1].splitlines()[0]

    started = time.monotonic()
    built = node_cli("models", "install", "old", "--config", config)
    if built.returncode != 0 and "No matching distribution" in built.stderr + built.stdout:
        unavailable(f"the package registry does not serve monai=={OLD_MONAI}: {built.stderr[-300:]}")
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    lines = built.stdout.splitlines()
    assert any(line.startswith("[1/3]") for line in lines) and any(line.startswith("[3/3]") for line in lines)
    assert any(f"monai=={OLD_MONAI}" in line and "metadata.json monai_version" in line for line in lines)
    assert any("left out: tensorboard 2.17.0 (not used to run inference)" in line for line in lines)
    done = next(line for line in lines if line.startswith("[done]"))
    assert f"monai {OLD_MONAI}" in done, done
    first = time.monotonic() - started

    again = node_cli("models", "install", "old", "--config", config)  # idempotent: nothing rebuilt
    assert again.returncode == 0 and "is already built" in again.stdout
    assert time.monotonic() - started - first < first
    # The python model asks for the same packages: it shares the environment (keyed by its contents).
    same = node_cli("models", "install", "probe", "--config", config)
    assert same.returncode == 0 and "is already built" in same.stdout, same.stdout + same.stderr

    listed = node_cli("models", "list", "--config", config).stdout
    for name in ("old", "probe"):
        assert "ready" in listed.split(f"{name} ", 1)[1].splitlines()[0], listed
    assert "warning: model 'old'" not in node_cli("check-config", config).stdout


def test_the_old_and_the_new_monai_run_side_by_side_warm(node: dict[str, Any]) -> None:
    settings = load_settings(node["config"])
    state = settings.storage.resolved_path()
    if "ready" not in node_cli("models", "list", "--config", str(node["config"])).stdout.split("old ", 1)[1][:60]:
        pytest.fail("the managed environment was not built by the test before")
    registry = ModelRegistry(settings.models, state_dir=state)
    try:
        old, new = registry.get("old"), registry.get("new")
        assert f"monai {OLD_MONAI}" in old.card.runtime and "managed environment" in old.card.runtime
        assert new.card.runtime == ""  # in process, the node's MONAI
        assert old.card.model_hash == new.card.model_hash  # the same bundle, whatever runs it
        rng = np.random.default_rng(1)
        volume = Volume(rng.normal(0, 400, (12, 40, 44)).astype(np.float32), (2.5, 0.9, 0.8), (0.0, 0.0, 0.0),
                        np.array([[0, 0, 1.0], [0, 1.0, 0], [1.0, 0, 0]]), "CT")
        for _ in range(2):  # warm: the second call reuses the model process
            a, b = old.predict(volume), new.predict(volume)
            assert a.labelmap is not None and b.labelmap is not None
            assert 0 < np.count_nonzero(a.labelmap) < a.labelmap.size
            np.testing.assert_array_equal(a.labelmap, b.labelmap)
            assert a.measurements == b.measurements
        pid = old._proc.pid  # type: ignore[attr-defined]
        old.predict(volume)
        assert old._proc.pid == pid  # type: ignore[attr-defined]
        assert registry.get("probe").predict(volume).labelmap is not None  # MONAI 1.4.0, no node package

        # Through the node's job runner: DICOM in, SEG out; the job records where the model ran.
        spool = Spool(state)
        hu, _ = make_chest_phantom((16, 48, 48), (2.5, 1.5, 1.5))
        files = write_ct_series(hu, (2.5, 1.5, 1.5), spool.incoming / "study" / "series")
        series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        task = InferTask(1, series_uid, "old", tuple(spool.relative(f) for f in files), ("seg", "sr"))
        outcome = run_infer(task, registry, spool, settings.outputs)
        assert outcome.ok, outcome.error
        assert any(f"model ran with monai {OLD_MONAI}" in n for n in outcome.notes), outcome.notes
    finally:
        registry.close()


def test_an_offline_install_uses_only_the_wheel_folder_and_keeps_what_was_built(node: dict[str, Any]) -> None:
    """--wheels means no index: a folder without MONAI 1.4.0 fails, and the built environment stays ready."""
    config = str(node["config"])
    empty = node["tmp"] / "no-wheels"
    empty.mkdir(exist_ok=True)
    state = load_settings(node["config"]).storage.resolved_path()
    out = node_cli("models", "install", "probe", "--config", config, "--wheels", str(empty), "--force")
    assert out.returncode != 0
    assert "No matching distribution found for monai" in out.stderr, out.stderr
    assert not list((state / "environments").glob(".*building*"))  # the half-built one is gone
    listed = node_cli("models", "list", "--config", config).stdout
    assert "ready" in listed.split("probe ", 1)[1].splitlines()[0], listed
    missing = node_cli("models", "install", "probe", "--config", config, "--wheels", str(empty / "nowhere"))
    assert missing.returncode == 2 and "not a directory" in missing.stderr


def test_a_changed_plan_makes_the_environment_stale(node: dict[str, Any]) -> None:
    metadata_path = node["bundle"] / "configs" / "metadata.json"
    original = metadata_path.read_text()
    metadata = json.loads(original)
    metadata["optional_packages_version"]["einops"] = "0.7.0"  # the bundle was updated
    metadata_path.write_text(json.dumps(metadata))
    try:
        out = node_cli("check-config", str(node["config"])).stdout
        assert "model 'old': environment stale" in out and "einops==0.7.0" in out, out
        status = node_cli("models", "list", "--config", str(node["config"])).stdout
        assert "stale" in status.split("old ", 1)[1].splitlines()[0]
    finally:
        metadata_path.write_text(original)


def test_an_interpreter_path_that_does_not_exist_is_said(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(f"""
storage: {{path: {tmp_path / 'state'}}}
models:
  m: {{type: python, callable: "x:y", environment: /nonexistent/bin/python3, labels: [{{value: 1, name: T, snomed: {{value: "85756007", meaning: Tissue}}}}]}}
rules: [{{name: r, when: {{Modality: CT}}, run: [m]}}]
""")
    out = node_cli("check-config", str(config))
    assert out.returncode == 0 and "model 'm': environment missing: interpreter /nonexistent/bin/python3 not found" \
        in out.stdout
    bad = node_cli("models", "install", "m", "--config", str(config))
    assert bad.returncode == 2 and "builds environment: managed only" in bad.stderr
    assert sys.executable  # the node's own interpreter is what 'shared' means
