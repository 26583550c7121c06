#!/usr/bin/env bash
# One call on a lent GPU machine (see the device tool's METHOD.md): build, test, sanitize, benchmark,
# profile, in that order of value, each step under its own time limit and all of them under one
# deadline, so a slow step costs its own results only.
#
#   OUT=/some/dir DEADLINE_S=540 bash scripts/gpu_run.sh
#
# The device tool returns at most 8 files from $OUT, so every log goes to a work folder that is packed
# into $OUT/gpu_logs.tgz after each step (a step killed by the deadline leaves the earlier ones), and
# $OUT/summary.txt collects each step's status and the tail of its log. Commit the markdown results into
# benchmarks/results/ afterwards.
# Env: PYTHON (default python3), DEADLINE_S (default 540), TORCH_CUDA_ARCH_LIST (default 9.0a: one arch
# builds faster, and 9.0a carries the Hopper wgmma kernels), MAX_JOBS (default 16), SKIP_BUILD=1 (extension already built in place), KERNEL_ARGS /
# KERNEL_AUTOTUNE (the kernel bench's arguments and Triton autotuning, default off), GPU_STEPS="build
# pytest_gpu ..." (run only the named steps: a short call spends the lease on what it has to show).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-out}"
W="${GPU_WORK:-/tmp/bsbert-gpu}"
PY="${PYTHON:-python3}"
DEADLINE_S="${DEADLINE_S:-540}"
START=$(date +%s)
# a fresh work folder: on a machine still warm from an earlier call, its logs (and a stale kernels.md) would
# come back again with this call's
rm -rf "$W"
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$PATH:$CUDA_HOME/bin:$CUDA_HOME/compute-sanitizer"
status=0

pack() { tar czf "$OUT/gpu_logs.tgz" -C "$W" . 2>/dev/null || true; }
# step NAME LIMIT_S CMD...: runs CMD with stdout+stderr to $W/NAME.txt, at most LIMIT_S seconds and never
# past the deadline (15 s kept for packing); appends status + log tail to $OUT/summary.txt.
step() {
  local name="$1" limit="$2"; shift 2
  if [ -n "${GPU_STEPS:-}" ] && [[ " $GPU_STEPS " != *" $name "* ]]; then return; fi
  local left=$(( DEADLINE_S - ($(date +%s) - START) - 15 ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then
    echo "== $name: SKIPPED (deadline)" | tee -a "$OUT/summary.txt"; status=1; return
  fi
  local t0=$(date +%s) rc=0
  timeout --kill-after=5 "$limit" "$@" > "$W/$name.txt" 2>&1 || rc=$?
  local took=$(( $(date +%s) - t0 ))
  { echo "== $name: rc=$rc (${took}s, limit ${limit}s)$( ((rc == 124 || rc == 137)) && echo ' TIMED OUT')"
    tail -n "${TAIL:-12}" "$W/$name.txt"; } | tee -a "$OUT/summary.txt"
  (( rc != 0 )) && status=1
  pack
}

{ nvidia-smi; "$PY" -c "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, \
torch.version.cuda, 'triton', triton.__version__); p = torch.cuda.get_device_properties(0); \
print(p.name, p.multi_processor_count, 'SMs', p.total_memory >> 20, 'MiB')"; nvcc --version | tail -2
  git rev-parse HEAD 2>/dev/null; git status --short | head -20; } > "$W/machine.txt" 2>&1
grep -E "NVIDIA H|torch|SMs|release|Driver" "$W/machine.txt" | head -8 | tee -a "$OUT/summary.txt"

export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}"
# SKIP_BUILD=1 only where the extension is there, with CUDA, and bsbert importable from scripts/ (the
# editable install): a machine that went back between calls starts bare, and without the build every
# script failed to import bsbert and the CUDA op tests all skipped (rc 0, nothing tested)
if [ "${SKIP_BUILD:-0}" = 1 ] && ! (cd scripts && "$PY" -c \
    "import bsbert._C as c, sys; sys.exit(0 if c.with_cuda() else 1)") > /dev/null 2>&1; then
  echo "== SKIP_BUILD=1 but no built extension with CUDA here (a fresh machine?): building" | tee -a "$OUT/summary.txt"
  SKIP_BUILD=0
  GPU_STEPS="${GPU_STEPS:+$GPU_STEPS build}"
fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  TAIL=4 step build 240 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
  grep -E "registers|spill|bytes stack" "$W/build.txt" > "$W/ptxas.txt" || true
fi
step info 30 "$PY" -m bsbert.info

# The Hopper wgmma kernels on a few small shapes, in their own process: a fault there must not take the
# test suite down with it, and a wrong layout shows as a map of which 8x8 patches are off.
TAIL=30 step wgmma_smoke 40 "$PY" scripts/wgmma_smoke.py

# The error-message tests first, on their own: they once crashed the process (formatting a tensor
# shape in nvcc-compiled host code); if they still do, cuda-gdb shows where.
TAIL=8 step pytest_errors 40 "$PY" -m pytest -q -p no:cacheprovider -k "errors or rejects" tests/test_cuda_ops.py
if grep -qs "Segmentation fault\|Fatal Python error" "$W/pytest_errors.txt" && command -v cuda-gdb > /dev/null; then
  TAIL=30 step segfault_backtrace 60 cuda-gdb -batch -ex run -ex bt --args "$PY" -m pytest -q -x \
    -p no:cacheprovider -p no:faulthandler -k "errors or rejects" tests/test_cuda_ops.py
fi

# Numerical tests on the GPU (CUDA C++ ops, Triton kernels compiled for real, patch on cuda). conftest
# sets BSBERT_TRITON_AUTOTUNE=0 there: one fixed config per shape instead of autotuning each.
# (every Triton autotuning config against float64 is a step of its own, below: ~90 compilations)
# Two steps, kernels then models, so a slow model test cannot hide the kernel results. Stop 30 (H200):
# in one process the kernel files took ~25 s and the model files ~45 s alone, yet one CPU model test
# (test_plan_round_trips_model_check_and_timings, 2 s alone) ran past the old 130 s limit after the
# kernel tests; faulthandler_timeout prints every thread's stack for a test still running after 45 s.
# (the error tests run here too since stop 32: their crash was fixed in stop 30, and excluding "errors or
# rejects" by -k left the Triton and model-check error tests of every file unrun on a GPU)
PYTEST_GPU=("$PY" -m pytest -q -p no:cacheprovider -rfs --tb=short --durations=8 -o faulthandler_timeout=45
  -k "not tuning_config")
GPU_KERNEL_TESTS=(tests/test_cuda_ops.py tests/test_triton_bsr_linear.py tests/test_triton_attention.py)
GPU_MODEL_TESTS=(tests/test_patch.py tests/test_profile_nvtx.py tests/test_model_check.py)
if [[ " ${GPU_STEPS:-} " == *" pytest_gpu "* ]]; then  # the old name runs both
  GPU_STEPS="$GPU_STEPS pytest_gpu_kernels pytest_gpu_models"
fi
TAIL=25 step pytest_gpu_kernels 90 "${PYTEST_GPU[@]}" "${GPU_KERNEL_TESTS[@]}"
TAIL=40 step pytest_gpu_models 120 "${PYTEST_GPU[@]}" "${GPU_MODEL_TESTS[@]}"
# Every Triton tuning config against float64 (never run on a GPU yet: before the one-process run below, which
# has run before, so that a short deadline cuts the latter)
if [[ " ${GPU_STEPS:-} " == *" pytest_tuning_configs "* ]]; then
  TAIL=12 step pytest_tuning_configs 150 "$PY" -m pytest -q -p no:cacheprovider -rs --durations=5 -k tuning_config \
    tests/test_triton_bsr_linear.py tests/test_triton_attention.py
fi
# The same files in one process (the order that was slow in stop 30), only when named.
if [[ " ${GPU_STEPS:-} " == *" pytest_gpu_one_process "* ]]; then
  TAIL=40 step pytest_gpu_one_process 200 "${PYTEST_GPU[@]}" "${GPU_KERNEL_TESTS[@]}" "${GPU_MODEL_TESTS[@]}"
fi

# Only when named in GPU_STEPS (the full pytest_gpu above includes it): the CUDA op tests alone.
if [[ " ${GPU_STEPS:-} " == *" pytest_cuda_ops "* ]]; then
  TAIL=20 step pytest_cuda_ops 90 "$PY" -m pytest -q -p no:cacheprovider -rs --durations=5 tests/test_cuda_ops.py
fi

if command -v compute-sanitizer > /dev/null; then
  step sanitizer_memcheck 45 compute-sanitizer --tool memcheck --leak-check no --padding 32 \
    --error-exitcode 42 "$PY" scripts/cuda_sanitizer_driver.py
  step sanitizer_racecheck 50 compute-sanitizer --tool racecheck --error-exitcode 42 \
    "$PY" scripts/cuda_sanitizer_driver.py
else
  echo "== compute-sanitizer: not found" | tee -a "$OUT/summary.txt"
fi

# Kernels: bsbert Triton + CUDA C++ vs cuBLAS dense / torch's Triton BSR, and attention vs SDPA.
# The default linear sweep is the one stop 11 ran in 141 s (12 rows x every tile, Triton autotuning off);
# KERNEL_ARGS="" runs the full sweep (M = 384, 3072, 12288; several minutes with autotuning). Attention
# (Triton, CUDA, SDPA; 3 head counts) is a step of its own so a slow linear sweep cannot starve it.
BSBERT_TRITON_AUTOTUNE="${KERNEL_AUTOTUNE:-0}" TAIL=45 step kernels 200 "$PY" scripts/bench_triton.py \
  ${KERNEL_ARGS---ms 3072,12288 --nk 1024x1024,4096x1024 --densities 1,0.5,0.25 --no-attention}
cp "$W/kernels.txt" "$OUT/kernels.md" 2>/dev/null
BSBERT_TRITON_AUTOTUNE="${KERNEL_AUTOTUNE:-0}" TAIL=25 step kernels_attention 90 "$PY" scripts/bench_triton.py \
  --no-linear --quick
cp "$W/kernels_attention.txt" "$OUT/kernels_attention.md" 2>/dev/null

# Nsight Compute on the BERT-sized BSR GEMMs: speed of light (SM vs memory), L2/DRAM traffic, occupancy.
if command -v ncu > /dev/null; then
  TAIL=60 step ncu_bsr 60 ncu --clock-control none --kernel-name regex:bsr_linear_mma_kernel --launch-count 2 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    "$PY" scripts/cuda_sanitizer_driver.py --only bsr --big
  # The same question for the x-slab kernel and the default tile on one BERT-large shape (M = 32 x 384,
  # 1024 x 1024, block density 0.25), so the two reports compare directly.
  for t in default slab64x8 wgslab64x16; do
    tile_env=(-u BSBERT_CUDA_BSR_TILE); [ "$t" != default ] && tile_env=("BSBERT_CUDA_BSR_TILE=$t")
    TAIL=60 step "ncu_bsr_$t" 60 env "${tile_env[@]}" ncu --clock-control none \
      --kernel-name "regex:bsr_linear_(mma|slab|wgmma)_kernel" --launch-count 1 --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section Occupancy "$PY" scripts/cuda_sanitizer_driver.py \
      --shape 12288,1024,1024,0.25
  done
fi

[ "${SKIP_E2E:-0}" = 1 ] && { echo "== done (no e2e): status $status" | tee -a "$OUT/summary.txt"; pack; exit $status; }
# End to end, fp16: dense BERT-large vs packing only vs full patch (per-linear backend by measurement).
export BSBERT_TRITON_AUTOTUNE="${E2E_AUTOTUNE:-0}"
# First under torch.compile(mode="reduce-overhead"): CUDA graphs take the host launch cost out, so the
# batch-1 comparison shows the kernels (eager batch-1 forwards are host-bound on an H100/H200).
TAIL=14 step e2e_b1_cudagraphs 150 "$PY" -m bsbert bench --device cuda --dtype float16 --batch 1 --seq 384 \
  --repeats 20 --compile reduce-overhead --out "$W/bench_b1_graphs"
# (patch's model check on CUDA: since stop 18 up to 3 re-patches and 4 timed forwards per seq, ~+10-15 s)
TAIL=14 step e2e_b1 100 "$PY" -m bsbert bench --device cuda --dtype float16 --batch 1 --seq 128 384 \
  --repeats 20 --out "$W/bench_b1"
# (stop 16, H100: seq 128 alone took ~45 s of the old 70 s limit; seq 384 needs as long again)
TAIL=14 step e2e_b32 170 "$PY" -m bsbert bench --device cuda --dtype float16 --batch 32 --seq 128 384 \
  --repeats 10 --out "$W/bench_b32"
# Packed vs patched at batch 32, seq 128 (stop 16: patched 11.4 ms vs packed 6.4 ms on the H100): the
# backends `patch` chose and the top kernels of each forward.
TAIL=60 step profile_b32 100 "$PY" scripts/profile_compare.py --device cuda --dtype float16 --batch 32 --seq 128 \
  --steps 3 --top 14
unset BSBERT_TRITON_AUTOTUNE

# Nsight Compute on the recipe `bsbert profile` prints (2-layer model, one step, first bsbert kernels).
if command -v ncu > /dev/null; then
  TAIL=40 step ncu_profile_recipe 60 ncu --clock-control none --profile-from-start off \
    --kernel-name "regex:bsr|pruned_attention|_attn|bsbert" --launch-count 3 --section SpeedOfLight --section Occupancy --section LaunchStats \
    "$PY" -m bsbert.profile --device cuda --dtype float16 --seq 384 --batch 8 --small --steps 1 --warmup 1
else
  echo "== ncu: not found" | tee -a "$OUT/summary.txt"
fi
echo "== done: status $status, $(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt"
pack
exit $status
