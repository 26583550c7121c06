#!/usr/bin/env bash
# GPU-only checks of the CUDA kernels (csrc/cuda): numerical tests, compute-sanitizer memcheck + racecheck,
# and an Nsight Compute profile of the BSR GEMM. Run from anywhere on a machine with a GPU and the extension
# built (MAX_JOBS=4 TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace). Outputs go to $OUT
# (default ./gpu_cuda_checks_out). Exit status: non-zero if any step fails (all steps still run).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_cuda_checks_out}"
mkdir -p "$OUT"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$CUDA_HOME/compute-sanitizer:$PATH"
PY="${PYTHON:-python}"
status=0
step() { echo "== $1"; }

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import bsbert._C as c; print('with_cuda', c.with_cuda())" > "$OUT/extension.txt" 2>&1 || status=1

step "pytest tests/test_cuda_ops.py"
"$PY" -m pytest -q tests/test_cuda_ops.py -rs > "$OUT/pytest_cuda_ops.txt" 2>&1 || status=1
tail -3 "$OUT/pytest_cuda_ops.txt"

if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer --tool $tool"
    extra=""
    [ "$tool" = memcheck ] && extra="--leak-check no --padding 32"
    compute-sanitizer --tool "$tool" $extra --error-exitcode 42 \
      "$PY" scripts/cuda_sanitizer_driver.py > "$OUT/sanitizer_$tool.txt" 2>&1 || status=1
    tail -4 "$OUT/sanitizer_$tool.txt"
  done
  step "compute-sanitizer memcheck over tests/test_cuda_ops.py"
  compute-sanitizer --tool memcheck --leak-check no --error-exitcode 42 \
    "$PY" -m pytest -q -x tests/test_cuda_ops.py > "$OUT/sanitizer_memcheck_pytest.txt" 2>&1 || status=1
  tail -3 "$OUT/sanitizer_memcheck_pytest.txt"
else
  echo "compute-sanitizer not found" | tee "$OUT/sanitizer_missing.txt"; status=1
fi

if command -v ncu > /dev/null; then
  step "ncu on bsr_linear_mma_kernel"
  ncu --kernel-name regex:bsr_linear_mma_kernel --launch-count 4 --set full \
    -o "$OUT/ncu_bsr_linear" -f "$PY" scripts/cuda_sanitizer_driver.py --only bsr --big \
    > "$OUT/ncu_bsr_linear.txt" 2>&1 || status=1
  ncu --import "$OUT/ncu_bsr_linear.ncu-rep" --page details --section SpeedOfLight --section Occupancy \
    --section MemoryWorkloadAnalysis > "$OUT/ncu_bsr_linear_summary.txt" 2>&1 || true
  tail -20 "$OUT/ncu_bsr_linear_summary.txt"
else
  echo "ncu not found" | tee "$OUT/ncu_missing.txt"
fi
echo "outputs in $OUT (status $status)"
exit $status
