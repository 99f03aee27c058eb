#!/usr/bin/env bash
# edgert on an NVIDIA GPU machine (never part of the test suite): compiles the artifact for
# cuda, checks edgert's kernels on the GPU against NumPy, decodes through TVM cuda and ONNX
# Runtime's CUDA EP against ONNX Runtime on the CPU; prints one JSON record (scripts/gpu_check.py).
#
#   scripts/gpu_check.sh [ARTIFACT] [gpu_check.py options]   (default artifacts/smollm2-135m)
#
# Stops at once, with one line and exit status 2, where there is no GPU. The artifact is
# exported first when missing (not counted in the time limit, GPU_CHECK_TIMEOUT seconds, 300).
set -euo pipefail
cd "$(dirname "$0")/.."

ARTIFACT=artifacts/smollm2-135m
if [[ $# -gt 0 && $1 != -* ]]; then
    ARTIFACT=$1
    shift
fi
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi is missing or lists no GPU); run it on a machine with one" >&2
    exit 2
fi

if [[ ! -f $ARTIFACT/edgert.json ]]; then
    echo "gpu_check: exporting smollm2-135m to $ARTIFACT..." >&2
    "$PY" -m edgert.cli export smollm2-135m -o "$ARTIFACT" >&2
fi

exec timeout "${GPU_CHECK_TIMEOUT:-300}" "$PY" scripts/gpu_check.py "$ARTIFACT" "$@"
