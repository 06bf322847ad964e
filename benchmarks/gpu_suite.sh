#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md on one CUDA device, in about 5 minutes on an H100:
# capture overhead of a GPT-2-small-sized model (random init) at sequence length 512, batch 8
# and 32, ranks 16 and 64, rows written to local disk (float32), plus the MLP for scale.
#
#   bash benchmarks/gpu_suite.sh                 # results in $OUT (default benchmarks/gpu_results)
#   WHEELS=shared/wheels bash benchmarks/gpu_suite.sh
#
# Written for a bare machine with torch already installed (the device tool's Python 3.12): the
# rest of what logix and the benchmark import (h5py, tqdm, transformers, psutil...) is installed
# from a folder of wheels if missing, made beforehand on a machine with network access:
#   pip download h5py tqdm psutil transformers --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d shared/wheels
# logix itself runs from this checkout (PYTHONPATH), nothing is installed for it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/gpu_results}
WHEELS=${WHEELS:-shared/wheels}
mkdir -p "$OUT"

missing=$($PY - <<'PYEOF'
import importlib.util
need = {"h5py": "h5py", "tqdm": "tqdm", "psutil": "psutil", "transformers": "transformers", "numpy": "numpy"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
if [ -n "$missing" ]; then
    if [ -d "$WHEELS" ]; then
        $PY -m pip install --quiet --no-index --find-links "$WHEELS" $missing
    else
        echo "gpu_suite: missing Python packages ($missing) and no wheel folder at $WHEELS" >&2
        exit 1
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} | tee "$OUT/environment.txt"

# GPT-2 small at seq 512, batch 8 and 32, ranks 16 and 64 (the issue's targets are at rank 64)
$PY benchmarks/capture_overhead.py --device cuda --models gpt2 --ranks 16 64 2>&1 | tee "$OUT/capture_gpt2.txt"
# the MLP, where the fixed per-step cost dominates
$PY benchmarks/capture_overhead.py --device cuda --models mlp --ranks 16 64 --quick 2>&1 | tee "$OUT/capture_mlp.txt"
echo "gpu_suite: results in $OUT"
