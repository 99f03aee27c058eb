#!/usr/bin/env bash
# edgert on an NVIDIA GPU machine: runs the GPU test suite (tests/gpu, marker `gpu`) and
# produces one JSON record. It compiles the artifact for cuda, checks edgert's kernels on the
# GPU against NumPy (tests/gpu/test_kernels.py), and decodes through TVM cuda and ONNX
# Runtime's CUDA EP against ONNX Runtime on the CPU (tests/gpu/test_backends.py).
#
#   scripts/gpu_check.sh [ARTIFACT] [pytest options]   (default artifacts/smollm2-135m)
#
# e.g. --gpu-no-compile (reuse the artifact's cuda build), --gpu-prompts N, --gpu-new-tokens N,
# -k tree_attention. The record goes to $RECORD (default bench/results/gpu/gpu_check.json) and
# is printed on stdout at the end, pytest's output going to stderr. Exit status: 0 when every
# kernel is within tolerance and the TVM cuda backend loaded and decoded, 1 otherwise (the
# record says what failed), 2 with one line where there is no GPU, 124 past the time limit.
# The artifact is exported first when missing (not counted in the time limit,
# GPU_CHECK_TIMEOUT seconds, 300). Without a GPU, a CPU dry run of the kernel tests:
#   EDGERT_GPU_CHECK_DEVICE=llvm .venv/bin/python -m pytest -q -m gpu tests/gpu
set -euo pipefail
cd "$(dirname "$0")/.."

ARTIFACT=artifacts/smollm2-135m
if [[ $# -gt 0 && $1 != -* ]]; then
    ARTIFACT=$1
    shift
fi
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3
RECORD=${RECORD:-bench/results/gpu/gpu_check.json}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi is missing or lists no GPU); run it on a machine with one" >&2
    exit 2
fi

if [[ ! -f $ARTIFACT/edgert.json ]]; then
    echo "gpu_check: exporting smollm2-135m to $ARTIFACT..." >&2
    "$PY" -m edgert.cli export smollm2-135m -o "$ARTIFACT" >&2
fi

mkdir -p "$(dirname "$RECORD")"
rm -f "$RECORD"
status=0
timeout "${GPU_CHECK_TIMEOUT:-300}" "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider \
    --gpu-strict --gpu-device cuda --gpu-artifact "$ARTIFACT" --gpu-record "$RECORD" "$@" >&2 \
    || status=$?
if [[ -f $RECORD ]]; then
    cat "$RECORD"
elif [[ $status -eq 124 ]]; then
    echo "gpu_check: stopped after ${GPU_CHECK_TIMEOUT:-300} s (GPU_CHECK_TIMEOUT); no record" >&2
fi
exit "$status"
