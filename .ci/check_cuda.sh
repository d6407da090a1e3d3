#!/usr/bin/env bash
# Compiles the torch-free CUDA kernels (csrc/cuda/kernels.cu) with nvcc, with the half
# conversion macros that torch's build defines, for sm_90. Needs neither torch nor a GPU.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v nvcc >/dev/null 2>&1; then
  echo "skipped: nvcc not found"
  exit 0
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

nvcc -std=c++17 -O3 -arch=sm_90 --Werror all-warnings -Icsrc \
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
  -c csrc/cuda/kernels.cu -o "$out/kernels.o"
echo "ok: csrc/cuda/kernels.cu compiles for sm_90 ($(nvcc --version | tail -n 1))"
