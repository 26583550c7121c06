#!/usr/bin/env bash
# Every CPU figure that benchmarks/results/cpu-*.md quotes, in one call on a quiet machine (nothing
# else running: a second busy process makes every 2-thread parallel region wait for a time slice).
# Usage:  OUT=/some/dir bash scripts/cpu_results.sh      (bsbert installed, extension built)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/cpu-out}"
mkdir -p "$OUT"
STEP="setup"
log() { STEP="$*"; echo "== $(date +%T) $*" >&2; }
# set -e stops at the first failing command without a word, and most steps send their output to files: say which
# step failed and where its output went. To fd 3, the script's own stderr: a step that fails inside a redirected
# { ...; } runs the trap with that redirection still in place (the message went into machine.txt)
exec 3>&2
trap 'rc=$?; [ "$rc" = 0 ] || echo "cpu_results.sh: failed (exit $rc) in step: $STEP; outputs so far in $OUT" >&3' EXIT

log "machine"
{ lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-200; python -m bsbert.info; git -C "$ROOT" rev-parse HEAD; } \
    > "$OUT/machine.txt" 2>&1

log "block-sparse GEMM vs oneDNN (fp32 and bf16; M = 384, 16, 1)"
python -m bsbert.ops.cpu_kernel_report --m 384 16 1 --dtype float32 bfloat16 > "$OUT/kernels.md"

log "attention vs SDPA (fp32 and bf16)"
python "$ROOT/scripts/bench_cpu_attention.py" --rounds 100 --heads 2 10 16 > "$OUT/attention-fp32.md"
python "$ROOT/scripts/bench_cpu_attention.py" --rounds 100 --heads 2 10 16 --dtype bfloat16 > "$OUT/attention-bf16.md"

log "fused add + LayerNorm vs torch"
(cd "$ROOT" && python -m benchmarks.test_add_layer_norm 40) > "$OUT/add-layer-norm.md"

log "end to end: seed-like BERT-large, batch 1, seq 384 and 128, fp32 then bf16; other engines on the packed model"
# (engines not installed are recorded as unavailable: pip install openvino onnxruntime onnx, or '.[engines]')
for dt in float32 bfloat16; do
  bsbert bench --seq 384 128 --dtype "$dt" --repeats 10 --engines openvino onnxruntime --out "$OUT/bench" \
      > "$OUT/bench-$dt.txt" 2>&1
done

# One thread (ONE_THREAD_TOO=0 skips it): the same forwards on one core, where nothing waits for another thread
# and the bound's probe runs on one core too; against the 2-thread runs above it shows what the second core costs
# (stop 25).
if [ "${ONE_THREAD_TOO:-1}" = 1 ]; then
  log "end to end on one thread (fp32 then bf16)"
  for dt in float32 bfloat16; do
    bsbert bench --threads 1 --seq 384 128 --dtype "$dt" --repeats 5 --out "$OUT/bench-1thread" \
        > "$OUT/bench-1thread-$dt.txt" 2>&1
  done
fi

# AVX2_TOO=0 skips this block. The same CPU capped to AVX2 in all three libraries: what users of AVX2-only CPUs
# get (stop 24). Ratios carry over better than times: the caches and clocks stay this CPU's.
if [ "${AVX2_TOO:-1}" = 1 ] && grep -q avx512 /proc/cpuinfo; then
  log "the same CPU capped to AVX2 (kernels, attention, end to end)"
  (
    export ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 BSBERT_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2
    python -m bsbert.ops.cpu_kernel_report --m 384 16 4 1 --dtype float32 bfloat16 > "$OUT/avx2-kernels.md"
    python "$ROOT/scripts/bench_cpu_attention.py" --rounds 100 --heads 10 > "$OUT/avx2-attention-fp32.md"
    python "$ROOT/scripts/bench_cpu_attention.py" --rounds 100 --heads 10 --dtype bfloat16 > "$OUT/avx2-attention-bf16.md"
    for dt in float32 bfloat16; do
      bsbert bench --seq 384 128 --dtype "$dt" --repeats 5 --out "$OUT/avx2-bench" > "$OUT/avx2-bench-$dt.txt" 2>&1
    done
  )
fi
log "done: $OUT"
