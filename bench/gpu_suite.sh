#!/usr/bin/env bash
# One-GPU benchmark suite (bench/gpu_suite.py): DiffusionGemma 26B-A4B, random bf16 weights, < 8 min.
#   bash bench/gpu_suite.sh [--out DIR] [--cpu-smoke] [...]    (--help lists every option)
# Runs from the repository root with PYTHONPATH set to it (dgserve need not be pip-installed there);
# PYTHON overrides the interpreter (default python3).
set -euo pipefail
export DGSERVE_BENCH_T0="${DGSERVE_BENCH_T0:-$(date +%s.%N)}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export DGSERVE_BENCH_COMMAND="bash bench/gpu_suite.sh${*:+ $*}"
exec "${PYTHON:-python3}" bench/gpu_suite.py "$@"
