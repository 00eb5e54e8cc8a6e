#!/usr/bin/env bash
# Install intellect-node and its test tools into ./.venv (or the active virtual environment).
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build first, so that resolving
# hivemind's and our `torch` requirement never pulls several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.3"
else
    # `torch==2.13.0` resolves to the CPU build on CPU machines (a local wheel here, the +cpu index elsewhere).
    python -m pip show torch >/dev/null 2>&1 || python -m pip install -q torch==2.13.0 \
        || python -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi
python -m pip install -q -e ".[dev]"
python -c "import torch, hivemind, intellect.node; print('intellect-node installed; torch', torch.__version__)"
