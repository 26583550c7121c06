#!/usr/bin/env bash
# Runs bsbert's AVX-512 CPU kernels on a CPU without AVX-512, for correctness: builds a second copy of the
# extension with BSBERT_EMULATE_AVX512=1 (the AVX-512 intrinsics go through SIMDe, see
# csrc/cpu/avx512_intrinsics.h; CPU only) in a scratch copy of the checkout, then runs the CPU kernel tests
# against it. There the extension reports avx512_bf16, so every ISA-parametrised test also runs the avx512
# and avx512_bf16 paths, and every other test runs at avx512_bf16. Speed means nothing in this build.
#
# Needs: an AVX2+FMA CPU, SIMDe's headers (Debian/Ubuntu: apt-get install libsimde-dev; or SIMDE_INCLUDE=<dir
# holding simde/>), and the environment bsbert's tests run in (torch, pytest, ...). Takes ~5 min to build
# on 2 cores plus the tests. Extra arguments go to pytest (e.g. -x, -k avx512).
# Exit status: pytest's; 3 when SIMDe is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

simde="${SIMDE_INCLUDE:-/usr/include}"
if [ ! -f "$simde/simde/x86/avx512.h" ]; then
  echo "test_emulated_avx512: SIMDe not found ($simde/simde/x86/avx512.h): apt-get install libsimde-dev," \
       "or set SIMDE_INCLUDE" >&2
  exit 3
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# the checkout's files as they are now (tracked and new, not ignored: no build outputs of the real build)
git ls-files -z --cached --others --exclude-standard > "$work/.files"
# tar's status 1 is "a file changed as we read it" (a log being written, such as CI's own): not an error
tar -c --null -T "$work/.files" --ignore-failed-read -f "$work/.src.tar" 2>/dev/null || [ $? -eq 1 ]
tar -x -C "$work" -f "$work/.src.tar"
rm "$work/.files" "$work/.src.tar"
cd "$work"

echo "== emulated AVX-512: build (CPU only) =="
start=$(date +%s)
if ! BSBERT_SKIP_CUDA=1 BSBERT_EMULATE_AVX512=1 MAX_JOBS="${MAX_JOBS:-2}" python setup.py build_ext --inplace \
    > build.log 2>&1; then
  grep -E "error|Error" build.log | head -40 >&2
  tail -20 build.log >&2
  echo "test_emulated_avx512: the emulated build failed" >&2
  exit 1
fi
echo "built in $(( $(date +%s) - start ))s"

echo "== emulated AVX-512: CPU kernel tests =="
# `python -m pytest` from the copy: its bsbert (with the emulated _C) comes before any installed one;
# tests/test_emulated_avx512.py fails if it did not.
BSBERT_EXPECT_EMULATED_AVX512=1 python -m pytest -q -p no:cacheprovider \
  -W "ignore:bsbert._C is the emulated AVX-512 test build:RuntimeWarning" \
  tests/test_emulated_avx512.py tests/test_bsr_linear_cpu.py tests/test_bsr_gemv_cpu.py tests/test_bsr_linear_add_layer_norm.py \
  tests/test_cpu_attention.py tests/test_add_layer_norm.py tests/test_head_logits.py \
  tests/test_bert_embeddings.py tests/test_bf16_widened.py tests/test_cpu_op_bad_inputs.py \
  tests/test_fused_encoder.py "$@"
