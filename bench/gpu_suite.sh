#!/usr/bin/env bash
# The GPU checks of every open issue in one go, for a lent GPU machine (under 9 minutes on an H100/H200, so one
# device command of 10 minutes holds it: the tests at most 3.5 min, then the suite's own 5-minute time guard):
#   1. the CUDA tests (tests/test_fast_gpu.py, tests/test_fp8_gpu.py, the NCCL EP tests, then the Triton kernels
#      of tests/test_kernels.py compiled): sync-free step, graph replay == eager, compiled == eager, the engine with
#      CUDA graphs; FP8 W8A8 against its CPU emulation, FP8 + Triton kernels sync-free and captured;
#   2. bench/gpu_suite.py: DiffusionGemma 26B-A4B, random bf16 weights: the fast path (sync-debug step,
#      eager/graphed/compiled steps at 1/8/64 canvases, sampler, kernels per forward, batch-1 and 64-concurrent
#      tokens/s), then the exact path's figures on the same card.
#   bash bench/gpu_suite.sh [--out DIR] [--cpu-smoke] [--no-compile] [...]    (--help lists every option)
# Runs from the repository root with PYTHONPATH set to it (dgserve need not be pip-installed there); PYTHON
# overrides the interpreter (default python3). The device image has torch, safetensors, tokenizers, jinja2,
# pyyaml and pytest; packages it lacks (pydantic) are installed from wheels carried in .gpu-wheels/ (make them
# here with: pip download --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 \
#   -d .gpu-wheels pydantic; and pass carry=[".gpu-wheels"] to the device run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export DGSERVE_BENCH_COMMAND="bash bench/gpu_suite.sh${*:+ $*}"
if ! "$PY" -c "import pydantic" 2>/dev/null && [ -d .gpu-wheels ]; then
  "$PY" -m pip install -q --no-index --find-links .gpu-wheels pydantic
fi
OUT="bench/out/gpu"
for ((i = 1; i <= $#; i++)); do
  if [ "${!i}" = "--out" ]; then j=$((i + 1)); OUT="${!j}"; fi
done
mkdir -p "$OUT"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "== CUDA tests"
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_gpu.py tests/test_fp8_gpu.py \
    tests/test_ep.py \
    2>&1 | tee "$OUT/cuda_tests.log" | tail -15 || echo "CUDA tests: FAILED or timed out (see $OUT/cuda_tests.log)"
  echo "== Triton kernels compiled (tests/test_kernels.py)"
  timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    2>&1 | tee "$OUT/kernel_tests.log" | tail -8 || echo "kernel tests: FAILED or timed out (see $OUT/kernel_tests.log)"
fi
echo "== benchmark suite"
# the suite's time guard counts from here (its measurements are ordered by priority; later ones are skipped)
export DGSERVE_BENCH_T0="${DGSERVE_BENCH_T0:-$(date +%s.%N)}"
exec "$PY" bench/gpu_suite.py "$@"
