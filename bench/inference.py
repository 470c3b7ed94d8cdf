"""The node's overhead around a model, against a bare MONAI sliding-window call.

``python -m bench inference [--device auto|cpu|cuda] [--shape Z,Y,X] [--repeat N]``

One TorchScript UNet (MONAI ``UNet``, random weights: timing only) and one
synthetic chest CT written as a DICOM series.  Timed side by side, on the
same network, volume, device and AMP setting:

* **bare**: ``monai.inferers.sliding_window_inference`` on the volume already
  in memory as a normalised tensor on the device (what a notebook times);
* **node**: the worker's whole job, :func:`dicom_node.scheduler.pipeline.run_infer`:
  read and check the DICOM files, build the volume, the model's MONAI
  preprocessing, the same sliding window, decode and invert to the source
  grid, encode the DICOM SEG and TID 1500 SR, write them to the spool.

Prints the median of ``--repeat`` runs (after a warm-up), the node's
breakdown (load / model / encode), the ratio node / bare, and on CUDA the
peak GPU memory of each.

``--bundle`` adds MONAI bundle rows: the same UNet as a bundle in the Model
Zoo layout (``network_def`` and a state dict) with spleen_ct_segmentation's
transforms (``Orientationd``, ``Spacingd`` to 1.5 x 1.5 x 2.0 mm,
``ScaleIntensityRanged``; ``Activationsd``, ``Invertd``, ``AsDiscreted``);
**bare** is the bundle's ``SlidingWindowInferer`` and network on its
preprocessed tensor already on the device; **node** is the whole job with the
bundle's transforms on the device (``transforms_on: device``) and, on a GPU,
on the CPU (``transforms_on: cpu``) beside it.

``--nnunet PYTHON`` adds an nnU-Net v2 row: a trained-model folder with
nnU-Net's own random initialisation (PlainConvUNet, instance norm, 4 stages),
built with that Python (one that has nnunetv2: a managed environment's
``bin/python`` after ``dicom-node models install``); **bare** is
``nnUNetPredictor.predict_single_npy_array`` on the array already in memory,
timed in that Python; **node** is the whole job with the model in that
interpreter (``environment: PYTHON``), as a node runs it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _parse_shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 3 or min(parts) < 8:
        raise argparse.ArgumentTypeError("shape is Z,Y,X, each at least 8")
    return parts  # type: ignore[return-value]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench inference", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--shape", type=_parse_shape, default=(96, 192, 192), help="volume Z,Y,X (default 96,192,192)")
    parser.add_argument("--roi", type=int, default=64, help="sliding-window roi edge (default 64)")
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-amp", action="store_true", help="disable AMP on CUDA")
    parser.add_argument("--bundle", action="store_true", help="also time the UNet as a MONAI bundle with "
                        "spleen_ct_segmentation's transforms (on the device, and on a GPU also on the CPU)")
    parser.add_argument("--nnunet", metavar="PYTHON", help="also time an nnU-Net v2 model in this Python "
                        "(one with nnunetv2, e.g. a managed environment's bin/python)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    from dicom_node.scheduler.pipeline import InferTask, run_infer
    from dicom_node.settings import load_settings_text
    from dicom_node.spool import Spool
    from inference.registry import ModelRegistry
    from inference.runner import inference_context, resolve_device
    from tests.phantoms import make_chest_phantom, write_ct_series

    device = resolve_device(args.device)
    amp = not args.no_amp and device.type == "cuda"
    cuda = device.type == "cuda"
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if cuda else "")
          + f"; AMP {'on (float16 autocast)' if amp else 'off'}; torch {torch.__version__}")

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp_dir:
        tmp = Path(tmp_dir)
        torch.manual_seed(0)
        net = UNet(3, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2).eval()
        ts_path = tmp / "unet.ts"
        torch.jit.script(net).save(str(ts_path))

        spacing = (1.5, 1.0, 1.0)
        hu, _ = make_chest_phantom(shape=args.shape, spacing=spacing)
        spool = Spool(tmp / "state")
        files = write_ct_series(hu, spacing, spool.root / "bench-source")
        rel = tuple(spool.relative(f) for f in files)
        roi = [args.roi] * 3
        settings = load_settings_text(f"""
models:
  unet:
    type: torchscript
    path: {ts_path}
    device: {device}
    amp: {str(amp).lower()}
    labels:
      - {{value: 1, name: Right lung, snomed: {{value: "3341006", meaning: Right lung}}}}
      - {{value: 2, name: Left lung, snomed: {{value: "44029006", meaning: Left lung}}}}
    preprocessing: {{orientation: null, window: [-1000, 400], roi_size: {roi}, overlap: 0.25,
                     sw_batch_size: {args.sw_batch_size}}}
""")
        registry = ModelRegistry(settings.models)
        task = InferTask(1, str(_series_uid(files[0])), "unet", rel, ("seg", "sr"))

        # Bare reference: the same scripted network, volume already a normalised tensor on the device.
        bare_net = torch.jit.load(str(ts_path), map_location=device).eval()
        image = np.clip((hu.astype(np.float32) + 1000.0) / 1400.0, 0, 1).transpose(2, 1, 0).copy()
        tensor = torch.from_numpy(image)[None, None].to(device)

        def bare() -> None:
            with inference_context(device, amp):
                out = sliding_window_inference(tensor, roi, args.sw_batch_size, bare_net, overlap=0.25)
                torch.argmax(out, dim=1)
            if cuda:
                torch.cuda.synchronize(device)

        def node() -> dict[str, float]:
            outcome = run_infer(task, registry, spool, settings.outputs)
            if not outcome.ok:
                raise RuntimeError(outcome.error)
            if cuda:
                torch.cuda.synchronize(device)
            return outcome.seconds

        bare_s, bare_peak = _timed(bare, args.repeat, cuda, device)
        node_runs: list[dict[str, float]] = []
        node_s, node_peak = _timed(lambda: node_runs.append(node()), args.repeat, cuda, device)
        bundle_rows = _bundle_rows(args, net, tmp, spool, rel, files, device, amp) if args.bundle else []

    voxels = int(np.prod(args.shape))
    print(f"volume: {args.shape[0]} slices of {args.shape[1]}x{args.shape[2]} ({voxels / 1e6:.1f} Mvoxel), "
          f"roi {args.roi}^3, sw_batch_size {args.sw_batch_size}, UNet 16-128 channels, 3 classes")
    print(f"bare sliding_window_inference : {bare_s:8.3f} s (median of {args.repeat})")
    print(f"node job (files -> SEG + SR)  : {node_s:8.3f} s (median of {args.repeat})")
    _print_breakdown(node_runs, 27)
    model_s = statistics.median([r.get("model", 0.0) for r in node_runs[1:]] or [0.0])
    print(f"ratio node / bare             : {node_s / bare_s:8.2f}x")
    print(f"ratio model step / bare       : {model_s / bare_s:8.2f}x  (the job's volume -> label map: "
          "pre-processing, sliding window, inversion, decoding)")
    print(f"overhead node - bare          : {node_s - bare_s:8.3f} s")
    if cuda:
        print(f"peak GPU memory: bare {bare_peak / 2**20:.0f} MiB, node {node_peak / 2**20:.0f} MiB "
              "(torch.cuda.max_memory_allocated)")
    for line in bundle_rows:
        print(line)
    if args.nnunet:
        _nnunet_row(args, device)
    return 0


def _bundle_rows(args: argparse.Namespace, net: Any, tmp: Path, spool: Any, rel: tuple[str, ...], files: list[Path],
                 device: Any, amp: bool) -> list[str]:
    """The UNet as a MONAI bundle: node job (transforms on the device; on a GPU also on the CPU) vs bare inferer."""
    import json

    import torch

    from dicom_node.imaging import load_series
    from dicom_node.scheduler.pipeline import InferTask, run_infer
    from dicom_node.settings import load_settings_text
    from inference.registry import ModelRegistry
    from inference.runner import inference_context, to_metatensor
    from tests.models_factory import write_bundle

    network_def = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                   "channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2}
    bundle = write_bundle(tmp / "spleen_like_bundle", net, network_def, pixdim=(1.5, 1.5, 2.0),
                          window=(-1000.0, 400.0), channel_def={"0": "background", "1": "liver", "2": "spleen"})
    config_path = bundle / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["inferer"].update(roi_size=[args.roi] * 3, sw_batch_size=args.sw_batch_size, overlap=0.25)
    config_path.write_text(json.dumps(config))
    cuda = device.type == "cuda"
    places = ("device", "cpu") if cuda else ("device",)
    models = {f"bundle_{place}": {"type": "monai_bundle", "path": str(bundle), "device": str(device),
                                  "amp": amp, "transforms_on": place} for place in places}
    settings = load_settings_text(json.dumps({"models": models}))
    registry = ModelRegistry(settings.models)

    model = registry.get(f"bundle_{places[0]}")
    with inference_context(device, False):
        data = model.preprocessing({"image": to_metatensor(load_series(files).volume, device=device)})
    prepared = data["image"].as_tensor()[None].to(device).contiguous()
    shape = tuple(prepared.shape[2:])

    def bare() -> None:
        with inference_context(device, amp):
            out = model.inferer(prepared, model.network)
            torch.argmax(out, dim=1)
        if cuda:
            torch.cuda.synchronize(device)

    bare_s, _ = _timed(bare, args.repeat, cuda, device)
    lines = [f"MONAI bundle (the same UNet; Orientationd, Spacingd 1.5x1.5x2.0 mm -> {shape}, ScaleIntensityRanged; "
             "Activationsd, Invertd, AsDiscreted):",
             f"bare SlidingWindowInferer on the preprocessed tensor : {bare_s:8.3f} s (median of {args.repeat})"]
    for place in places:
        task = InferTask(1, str(_series_uid(files[0])), f"bundle_{place}", rel, ("seg", "sr"))
        runs: list[dict[str, float]] = []

        def node(task: InferTask = task, runs: list[dict[str, float]] = runs) -> None:
            outcome = run_infer(task, registry, spool, settings.outputs)
            if not outcome.ok:
                raise RuntimeError(outcome.error)
            if cuda:
                torch.cuda.synchronize(device)
            runs.append(outcome.seconds)

        node_s, _ = _timed(node, args.repeat, cuda, device)
        where = "the CPU" if place == "cpu" or not cuda else str(device)
        model_s = statistics.median([r.get("model", 0.0) for r in runs[1:]] or [0.0])
        lines += [f"node job, transforms on {where:<12}          : {node_s:8.3f} s (median of {args.repeat})",
                  f"    model step (pre, inferer, post, labels)      : {model_s:8.3f} s",
                  f"    ratio node / bare                            : {node_s / bare_s:8.2f}x",
                  f"    ratio model step / bare                      : {model_s / bare_s:8.2f}x"]
    registry.close()
    return lines


_BARE_NNUNET = r'''
import json, statistics, sys, time
import numpy as np, torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
folder, array_path, spacing, repeat, device = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
device = torch.device(device)
predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                            perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                            allow_tqdm=False)
predictor.initialize_from_trained_model_folder(folder, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
array = np.load(array_path)
def once():
    predictor.predict_single_npy_array(array[None], {"spacing": spacing}, None, None, False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
once()
times = []
for _ in range(repeat):
    t0 = time.perf_counter(); once(); times.append(time.perf_counter() - t0)
print(json.dumps({"median": statistics.median(times)}))
'''


def _nnunet_row(args: argparse.Namespace, device: Any) -> None:
    """node job vs bare ``nnUNetPredictor`` on the same array, the model in ``args.nnunet``'s Python."""
    import json
    import subprocess

    import numpy as np

    from dicom_node.scheduler.pipeline import InferTask, run_infer
    from dicom_node.settings import load_settings_text
    from dicom_node.spool import Spool
    from inference.registry import ModelRegistry
    from tests.nnunet_factory import write_nnunet_folder
    from tests.phantoms import make_chest_phantom, write_ct_series

    python = str(Path(args.nnunet).expanduser())
    with tempfile.TemporaryDirectory(prefix="bench-nnunet-") as tmp_dir:
        tmp = Path(tmp_dir)
        spacing = (1.5, 1.0, 1.0)
        folder = write_nnunet_folder(tmp / "model", python, channels=["CT"],
                                     labels={"background": 0, "lung_right": 1, "lung_left": 2}, spacing=spacing,
                                     patch=(args.roi, args.roi, args.roi), features=(16, 32, 64, 128),
                                     intensities=[{"lower": -1000.0, "upper": 400.0, "mean": -300.0, "std": 400.0}])
        hu, _ = make_chest_phantom(shape=args.shape, spacing=spacing)
        np.save(tmp / "volume.npy", hu.astype(np.float32))
        spool = Spool(tmp / "state")
        files = write_ct_series(hu, spacing, spool.root / "bench-source")
        settings = load_settings_text(f"""
storage: {{path: {tmp / 'state'}}}
models:
  nnunet: {{type: nnunet, path: {folder}, environment: {python}, device: {device}}}
""")
        bare_out = subprocess.run([python, "-c", _BARE_NNUNET, str(folder), str(tmp / "volume.npy"),
                                   json.dumps(list(spacing)), str(args.repeat), str(device)],
                                  capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
        if bare_out.returncode != 0:
            raise RuntimeError(f"bare nnUNetPredictor failed: {bare_out.stderr[-2000:]}")
        bare_s = float(json.loads(bare_out.stdout.strip().splitlines()[-1])["median"])
        registry = ModelRegistry(settings.models, state_dir=tmp / "state")
        task = InferTask(1, str(_series_uid(files[0])), "nnunet", tuple(spool.relative(f) for f in files),
                         ("seg", "sr"))
        runs: list[dict[str, float]] = []

        def node() -> None:
            outcome = run_infer(task, registry, spool, settings.outputs)
            if not outcome.ok:
                raise RuntimeError(outcome.error)
            runs.append(outcome.seconds)

        try:
            node_s, _ = _timed(node, args.repeat, False, device)
        finally:
            registry.close()
    print(f"nnU-Net v2 (PlainConvUNet 16-128, patch {args.roi}^3, mirroring on, tile step 0.5, {device}):")
    print(f"bare nnUNetPredictor.predict_single_npy_array : {bare_s:8.3f} s (median of {args.repeat})")
    print(f"node job (files -> SEG + SR, model process)   : {node_s:8.3f} s (median of {args.repeat})")
    _print_breakdown(runs, 43)
    print(f"ratio node / bare                             : {node_s / bare_s:8.2f}x")


def _print_breakdown(runs: list[dict[str, float]], width: int) -> None:
    """The node job's parts (median of the timed runs; the first, a warm-up, left out)."""
    for key in ("load", "model", "encode"):
        values = [r.get(key, 0.0) for r in runs[1:]] or [0.0]
        print(f"    {key:<{width}}: {statistics.median(values):8.3f} s")


def _series_uid(path: Path) -> Any:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID


def _timed(fn: Any, repeat: int, cuda: bool, device: Any) -> tuple[float, int]:
    """Median wall time of ``repeat`` calls after one warm-up, and the peak CUDA memory."""
    import torch

    fn()  # warm-up: model load, cuDNN autotune, caches
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    return statistics.median(times), peak
