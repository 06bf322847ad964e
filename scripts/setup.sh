#!/usr/bin/env bash
# Create .venv with logix and everything its tests and examples need.
# torch comes first and pinned, so that pip does not resolve a multi-GB CUDA build on a CPU
# machine; set TORCH_SPEC (e.g. TORCH_SPEC="torch" on a GPU box) to choose another build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[dev,hf,deepspeed,lightning,examples,report]"
echo "logix installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
