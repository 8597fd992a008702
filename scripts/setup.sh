#!/usr/bin/env bash
# Create (or reuse) the virtual environment at .venv in the repo root and install editlab into it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
# torch first, pinned to the wheels that ship with this kind of machine; a plain "torch" would pull a newer CUDA build.
if ! python -c "import torch, torchvision" 2>/dev/null; then
    python -m pip install -q --upgrade pip
    python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
python -m pip install -q -e ".[dev]"
