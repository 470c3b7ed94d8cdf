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

    voxels = int(np.prod(args.shape))
    print(f"volume: {args.shape[0]} slices of {args.shape[1]}x{args.shape[2]} ({voxels / 1e6:.1f} Mvoxel), "
          f"roi {args.roi}^3, sw_batch_size {args.sw_batch_size}, UNet 16-128 channels, 3 classes")
    print(f"bare sliding_window_inference : {bare_s:8.3f} s (median of {args.repeat})")
    print(f"node job (files -> SEG + SR)  : {node_s:8.3f} s (median of {args.repeat})")
    for key in ("load", "model", "encode"):
        values = [r.get(key, 0.0) for r in node_runs[1:]] or [0.0]
        print(f"    {key:<27}: {statistics.median(values):8.3f} s")
    print(f"ratio node / bare             : {node_s / bare_s:8.2f}x")
    print(f"overhead node - bare          : {node_s - bare_s:8.3f} s")
    if cuda:
        print(f"peak GPU memory: bare {bare_peak / 2**20:.0f} MiB, node {node_peak / 2**20:.0f} MiB "
              "(torch.cuda.max_memory_allocated)")
    return 0


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
