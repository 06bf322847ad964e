#!/usr/bin/env bash
# The GPU checks and figures of benchmarks/RESULTS.md on one CUDA device, in about 6 minutes on an H100:
#   1. tests/test_cuda.py: rows captured on the GPU against torch.func and the CPU, the pinned
#      side-stream copy under memory reuse, no host sync inside a capture;
#   2. capture overhead of a GPT-2-small-sized model (random init), sequence length 512, batch 8
#      and 32, ranks 16 and 64, rows written to local disk as float32: float32 training, then
#      bfloat16 autocast; then the MLP for scale;
#   3. the HuggingFace Trainer tests, which run on the GPU when there is one.
#
#   bash benchmarks/gpu_suite.sh                                 # logs in $OUT (default benchmarks/gpu_results)
#   PARTS="test_cuda capture_gpt2_bf16" bash benchmarks/gpu_suite.sh     # some parts only
#
# Written for a bare machine whose python3 has torch, h5py, tqdm, transformers and pytest (the
# device tool's machines do); logix runs from this checkout. Each part has its own time limit and
# a failing part does not stop the next; the exit status says whether any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/gpu_results}
mkdir -p "$OUT"
# logix runs from this checkout, nothing is installed: an overlay of symlinks maps integrations/ to
# logix.integrations, as the installed package does
site=$(mktemp -d)
mkdir "$site/logix"
ln -s "$PWD"/logix/* "$site/logix/"
ln -s "$PWD/integrations" "$site/logix/integrations"
export PYTHONUNBUFFERED=1 PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
failed=()

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    if [ -n "${PARTS:-}" ] && [[ " $PARTS " != *" $name "* ]]; then
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s"
    tail -n 25 "$OUT/$name.txt"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
    $PY -c 'import torch, h5py, transformers; print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "h5py", h5py.__version__, "transformers", transformers.__version__)'
    echo "cpu cores: $(nproc)"
    df -h "${TMPDIR:-/tmp}" | tail -n 1
} 2>&1 | tee "$OUT/environment.txt"

# pytest runs from the overlay's folder: `python -m` puts the working directory first on sys.path
repo=$PWD
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
cat >"$site/pytest.sh" <<EOF
#!/usr/bin/env bash
cd "$site" && exec "$PY" -m pytest -q -p no:cacheprovider --rootdir "$repo" "\$@"
EOF
chmod +x "$site/pytest.sh"
part test_cuda 90 "$site/pytest.sh" "$repo/tests/test_cuda.py"
part capture_gpt2_fp32 200 $PY benchmarks/capture_overhead.py --device cuda --models gpt2 --ranks 16 64 --rounds 4
part capture_gpt2_bf16 100 $PY benchmarks/capture_overhead.py --device cuda --models gpt2 --ranks 16 64 --amp bf16 --rounds 4
part capture_mlp 40 $PY benchmarks/capture_overhead.py --device cuda --models mlp --ranks 16 64 --quick
part test_huggingface 90 "$site/pytest.sh" -x "$repo/tests/test_huggingface.py" -k "not ddp and not example"

echo "gpu_suite: logs in $OUT; failed parts: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
