#!/usr/bin/env bash
# Install raymerge and its test dependencies into the current Python environment.
#
# torch is installed first, pinned to the CPU build (2.13.0), and kept pinned by a constraints
# file: any unpinned resolution of torch would pull several GB of CUDA packages. deepspeed is
# sdist-only and must build against that torch, so it is built without build isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_VERSION="${RAYMERGE_TORCH_VERSION:-2.13.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" > "$constraints"
export PIP_CONSTRAINT="$constraints"
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
    "$PY" -m pip install -q setuptools wheel packaging py-cpuinfo ninja
    DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation deepspeed
fi
"$PY" -m pip install -q -e ".[test]"
