#!/usr/bin/env bash
# Install raymerge and its test dependencies into the current Python environment.
#
# torch is installed first, pinned (2.13.0, or $RAYMERGE_TORCH_VERSION), and kept pinned by a
# constraints file, so no later resolution replaces it. Which build: on a machine with an NVIDIA
# GPU (`nvidia-smi -L` lists one) the default one from PyPI, with CUDA; on a CPU-only machine the
# CPU build from PyTorch's CPU index (a few hundred MB instead of several GB of CUDA packages),
# falling back to the configured index when that one cannot be reached. RAYMERGE_TORCH_BUILD=cpu
# or =cuda chooses. A torch of the pinned version that is already installed is kept as it is
# (CI's image has the CPU wheel). deepspeed is sdist-only and must build against that torch, so
# it is built without build isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_VERSION="${RAYMERGE_TORCH_VERSION:-2.13.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

BUILD="${RAYMERGE_TORCH_BUILD:-}"
if [ -z "$BUILD" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then BUILD=cuda; else BUILD=cpu; fi
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
    if [ "$BUILD" = cpu ]; then
        echo "setup: no GPU found: installing the CPU build of torch $TORCH_VERSION (RAYMERGE_TORCH_BUILD=cuda for the CUDA one)"
        "$PY" -m pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
            || "$PY" -m pip install -q "torch==$TORCH_VERSION"
    else
        echo "setup: GPU found: installing torch $TORCH_VERSION with CUDA"
        "$PY" -m pip install -q "torch==$TORCH_VERSION"
    fi
fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" > "$constraints"
export PIP_CONSTRAINT="$constraints"
if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then  # its import prints an accelerator note on stdout
    "$PY" -m pip install -q setuptools wheel packaging py-cpuinfo ninja
    DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation deepspeed
fi
"$PY" -m pip install -q -e ".[test]"
