#!/usr/bin/env bash
# Run a command as on the slow machine class (2-core AVX2 machines where a plain SmolLM2-135M training
# step at batch 4 x 128 tokens takes about 10 s, about 41 GFLOP/s) on a faster x86 machine, to check
# time goals there:
#   MKL_CBWR=COMPATIBLE         MKL's conditional-numerical-reproducibility mode: its generic SSE2 code
#                               path instead of the AVX2/AVX-512 kernels (matmul about 42 GFLOP/s on 2 cores)
#   ATEN_CPU_CAPABILITY=avx2    torch's own vectorized kernels at AVX2 (no AVX-512)
#   ONEDNN_MAX_CPU_ISA=AVX2     oneDNN kernels at AVX2
# Calibrate on your machine with: bash scripts/slow_cpu.sh python benchmarks/plain_step.py
# Example: bash scripts/slow_cpu.sh bash scripts/demo.sh
set -euo pipefail
export MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
exec "$@"
