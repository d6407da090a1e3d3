#!/usr/bin/env bash
# Compiles the torch-free CUDA kernels (csrc/cuda/*.cu) with nvcc and the flags of the
# real build (csrc/cuda/nvcc.flags, which setup.py and CMakeLists.txt read) for sm_90,
# with every warning an error. Needs neither torch nor a GPU.
# nvcc is looked up on PATH, then in CUDA_HOME (default /usr/local/cuda). When it is not
# found the check fails, unless PYRNN_CUDA=0 says that no CUDA toolkit is expected.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

nvcc="$(command -v nvcc || true)"
if [ -z "$nvcc" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
if [ -z "$nvcc" ]; then
  if [ "${PYRNN_CUDA:-}" = "0" ]; then
    echo "skipped: PYRNN_CUDA=0 and no nvcc"
    exit 0
  fi
  echo "FAIL: nvcc not found (PATH, CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}); PYRNN_CUDA=0 skips this check" >&2
  exit 1
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

read -r -a flags < csrc/cuda/nvcc.flags
for src in csrc/cuda/*.cu; do
  "$nvcc" "${flags[@]}" -arch=sm_90 --Werror all-warnings -Icsrc -c "$src" -o "$out/$(basename "$src").o"
  echo "ok: $src compiles for sm_90 with ${flags[*]} ($("$nvcc" --version | tail -n 1))"
done
