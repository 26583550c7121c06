#!/usr/bin/env bash
# One call on a lent GPU machine (see the device tool's METHOD.md): build, test, benchmark, profile.
# Everything it learns goes under $OUT (the only thing that comes back); commit the .md results into
# benchmarks/results/ afterwards. Usage:  OUT=/some/dir bash scripts/gpu_run.sh [--quick]
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
QUICK="${1:-}"
status=0
log() { echo "== $(date +%T) $*"; }

log "machine"
nvidia-smi | tee "$OUT/nvidia-smi.txt" | head -15
python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" | tee "$OUT/versions.txt"
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null || true

log "build (sm_90 only: faster)"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
pip install --no-build-isolation --no-deps -e . > "$OUT/build.txt" 2>&1 || { tail -40 "$OUT/build.txt"; exit 1; }
grep -E "registers|spill" "$OUT/build.txt" > "$OUT/ptxas.txt" || true
python -m bsbert.info | tee "$OUT/info.txt"

log "tests (CUDA + Triton on the GPU)"
python -m pytest -q tests/test_cuda_ops.py tests/test_triton_bsr_linear.py tests/test_triton_attention.py \
    tests/test_patch.py -rs > "$OUT/pytest_gpu.txt" 2>&1 || status=1
tail -5 "$OUT/pytest_gpu.txt"

log "compute-sanitizer + ncu (scripts/gpu_cuda_checks.sh)"
OUT="$OUT/cuda_checks" bash scripts/gpu_cuda_checks.sh > "$OUT/cuda_checks.txt" 2>&1 || status=1
tail -5 "$OUT/cuda_checks.txt"

log "kernel benchmarks"
python scripts/bench_triton.py ${QUICK:+--quick} > "$OUT/triton_kernels.md" 2> "$OUT/triton_kernels.err" || status=1
tail -30 "$OUT/triton_kernels.md"

log "end to end (fp16, batch 1 and 32, seq 128 and 384)"
for b in 1 32; do
  bsbert bench --device cuda --dtype float16 --batch $b --seq 128 384 --repeats 10 --out "$OUT/bench" \
      > "$OUT/bench_b$b.txt" 2>&1 || status=1
  tail -12 "$OUT/bench_b$b.txt"
done

log "nsys (if present)"
if command -v nsys > /dev/null; then
  nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop -t cuda,nvtx -o "$OUT/bsbert" -f true \
      bsbert profile --device cuda --dtype float16 --seq 384 --batch 32 --steps 3 > "$OUT/nsys.txt" 2>&1 || status=1
  nsys stats --report cuda_gpu_kern_sum "$OUT/bsbert.nsys-rep" > "$OUT/nsys_kernels.txt" 2>&1 || true
  head -30 "$OUT/nsys_kernels.txt"
fi
log "done (status $status)"
exit $status
