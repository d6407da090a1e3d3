#!/usr/bin/env bash
# The full CUDA build of pyrnn, on a machine without a GPU: a fresh venv with the CUDA
# build of the tested torch (the version pinned in requirements.txt, from the package
# index: about 530 MB), `PYRNN_CUDA=1 setup.py build_ext` (nvcc for csrc/cuda/*.cu, the
# host compiler for csrc/cuda_ops.cpp against CUDA torch), then `import pyrnn` and a check
# that the ops have CUDA kernels registered. Called by .ci/run; run it alone as
# `bash .ci/cuda_build.sh`. Needs nvcc (CUDA_HOME, default /usr/local/cuda). The venv
# and the build live in a temporary directory, deleted at the end (4.7 GB of torch).
# TORCH_CUDA_ARCH_LIST (default 9.0) picks the architectures.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$PWD"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "FAIL: nvcc not found at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2
  exit 1
fi
export PATH="$CUDA_HOME/bin:$PATH"
work="$(mktemp -d "${TMPDIR:-/tmp}/pyrnn-cuda.XXXXXX")"
trap 'rm -rf "$work"' EXIT
trap 'exit 143' TERM INT  # (so that the EXIT trap runs when .ci/run stops this build)
t0=$SECONDS

torch_pin="$(grep -E '^torch==' requirements.txt)"
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
# The CUDA wheel comes from the index, not from a local wheel directory that may hold the
# CPU build under the same version.
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$py" -m pip install -q \
  "$torch_pin" numpy setuptools wheel ninja pybind11
"$py" -c 'import torch; assert torch.version.cuda, torch.__version__; print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU visible:", torch.cuda.is_available())'
echo "[time] venv with CUDA torch: $((SECONDS - t0)) s"

# Build a copy of the tree, so that the CPU build in the repository stays as it is.
t1=$SECONDS
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | grep -z -v '^\.ci/' |
  (cd "$repo" && xargs -0 cp --parents -t "$work/src")
(cd "$work/src" && PYRNN_CUDA=1 MAX_JOBS="$(nproc)" "$py" setup.py build_ext --inplace \
  > "$work/build.log" 2>&1) || { tail -n 60 "$work/build.log"; echo "FAIL: CUDA build" >&2; exit 1; }
if grep -E "csrc/.*(warning|error)" "$work/build.log"; then
  echo "FAIL: warnings in pyrnn's sources (above)" >&2
  exit 1
fi
echo "[time] PYRNN_CUDA=1 setup.py build_ext: $((SECONDS - t1)) s"

(cd "$work/src" && "$py" -c '
import torch, pyrnn
assert pyrnn._C.has_cuda(), "pyrnn._C was built without CUDA"
for op in ("pyrnn::forward", "pyrnn::backward"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)
print("ok: pyrnn", pyrnn.__file__, "with CUDA kernels for pyrnn::forward and pyrnn::backward;",
      "backends", pyrnn.backends())
')
echo "[time] CUDA build check total: $((SECONDS - t0)) s"
