#!/usr/bin/env bash
# The GPU checks of dicom-node in one short run on a machine with an NVIDIA GPU and CUDA torch but no
# package index (how a lent benchmark machine, or a hospital's GPU server, usually is):
#
#   make gpu-wheels                      # here, with the index: the node's dependencies such a machine's
#                                        # Python 3.12 lacks, at this project's pins, into .whl/ (ignored)
#   bash bench/gpu_check.sh              # there, from the repository root, with .whl/ beside it
#
# It installs the wheels into a private folder (nothing system-wide), prints the GPU, driver, torch and
# CUDA, then runs tests/gpu (the CUDA device, AMP, GPU-side transforms, measured GPU memory admission,
# a worker bound to its GPU, a MONAI bundle's transforms on the GPU) and `bench inference --bundle` on a
# 300 x 512x512 CT (node job against the bare sliding window, with and without AMP; the same UNet as a
# MONAI bundle with its transforms on the GPU and on the CPU). Everything printed is also written under $OUT (default
# /tmp/gpu-check). Exit status: that of the tests (3 when the wheels do not install).
# GPU_CHECK_SHAPE / GPU_CHECK_REPEAT override the volume (Z,Y,X) and the repeats; GPU_CHECK_DEVICE=cpu
# runs the same steps on the CPU (to try this script on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
SITE=${GPU_CHECK_SITE:-/tmp/dicom-node-site}
SHAPE=${GPU_CHECK_SHAPE:-300,512,512}
REPEAT=${GPU_CHECK_REPEAT:-3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/ here: run 'make gpu-wheels' where a package index is reachable"; exit 3; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "the wheels in .whl/ did not install into $SITE"; exit 3; }
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1

{
    date -u +"%Y-%m-%dT%H:%M:%SZ gpu_check on $(hostname)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" - <<'EOF'
import platform, torch, monai, pydicom, highdicom, numpy
cuda = torch.cuda.is_available()
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, available: {cuda}), "
      f"monai {monai.__version__}, pydicom {pydicom.__version__}, highdicom {highdicom.__version__}, numpy {numpy.__version__}")
if cuda:
    p = torch.cuda.get_device_properties(0)
    print(f"GPU 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
EOF
} 2>&1 | tee "$OUT/environment.txt"

"$PY" -m pytest -q -p no:cacheprovider -rA tests/gpu 2>&1 | tee "$OUT/tests_gpu.txt"
tests=${PIPESTATUS[0]}

for amp in on off; do
    flags=(--device "$DEVICE" --shape "$SHAPE" --repeat "$REPEAT" --bundle)
    [ "$amp" = off ] && flags+=(--no-amp)
    echo "== bench inference ${flags[*]}"
    "$PY" -m bench inference "${flags[@]}" 2>&1 | tee "$OUT/bench_inference_amp_$amp.txt"
done
exit "$tests"
