#!/usr/bin/env bash
# The GPU checks (tests marked `gpu`, and the cold-start bench on a GPU) on a machine that has
# torch, transformers, pytest and nvidia-ml-py but not Modelium's own packages, and no registry:
#
#   bash bench/gpu_device.sh fetch   # here: the missing packages' wheels (CPython 3.12, x86-64) into .whl/
#   bash bench/gpu_device.sh run     # there, with .whl beside the checkout: install them, run the checks
#
# `run` writes its output to $OUT/gpu.log when OUT is set. CYCLES (default 100) is how many
# load/unload cycles the NVML baseline test runs; fewer keep the run short.
set -euo pipefail
cd "$(dirname "$0")/.."
# what the worker, the backends and the tests import beyond such a machine's packages
WHEELS=(trio outcome sniffio msgspec pytest-trio)

case "${1:-}" in
fetch)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  mkdir -p .whl
  for w in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$w"
  done
  ls .whl
  ;;
run)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 MODELIUM_GPU_CYCLES="${CYCLES:-100}"
  log="${OUT:-/tmp}/gpu.log"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$log"
  python3 -m pytest -m gpu -s -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee -a "$log"
  python3 bench/coldstart.py --device cuda:0 --size 1.1b 2>&1 | tee -a "$log"
  ;;
*)
  echo "usage: bash bench/gpu_device.sh fetch|run" >&2
  exit 2
  ;;
esac
