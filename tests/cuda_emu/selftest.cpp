// Self-test of the SIMT emulator: small kernels with the semantics the time-step kernels
// rely on, and kernels with what a GPU leaves undefined, which strict mode must report.
//
//   selftest NAME   runs one kernel, prints "ok ..." or the launch's error and report;
//                   exit status 0 if the launch succeeded and the result is right
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_runtime.h"
#include "emu.h"

namespace {

// Block-wide sum through shuffles and shared memory; blockDim.x a multiple of 32.
__device__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.f;
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

__global__ void sum_kernel(const float* x, float* out, int n) {
  float v = 0;
  for (int j = threadIdx.x; j < n; j += blockDim.x) v += x[blockIdx.x * n + j];
  v = block_sum(v);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

// Every lane gets the sum of its warp through a butterfly; then lane 5's value.
__global__ void xor_kernel(int* out) {
  int v = threadIdx.x;
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  const int five = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 5);
  const int up = __shfl_up_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
  out[threadIdx.x] = v * 10000 + five * 100 + up;
}

// Threads that leave before the block reduction: the barrier is not reached by all.
__global__ void early_exit_kernel(const float* x, float* out, int n) {
  if (static_cast<int>(threadIdx.x) >= n) return;
  const float v = block_sum(x[threadIdx.x]);
  if (threadIdx.x == 0) out[0] = v;
}

// A full-mask shuffle in a block that is not a multiple of 32: lanes 16..31 of the
// second warp do not exist.
__global__ void partial_warp_kernel(float* out) {
  float v = 1.f;
  v += __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Divergent barriers: the two halves of the block wait at different __syncthreads.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

// A lane waits in a shuffle for a lane that waits at a barrier: never finishes.
__global__ void deadlock_kernel(float* out) {
  float v = 1.f;
  if (threadIdx.x == 0) __syncthreads();
  else v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Reads a neighbour's shared slot without the barrier after the writes: TSan reports it.
__global__ void missing_barrier_kernel(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

int report(cudaError_t e) {
  std::printf("error %d (%s): %s\n", static_cast<int>(e), cudaGetErrorString(e),
              cuda_emu::last_report());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string name = argc > 1 ? argv[1] : "";
  cuda_emu::set_seed(argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1);
  std::vector<float> out(1024, -1.f);
  if (name == "sum") {  // 3 blocks of 1024 threads over 1500 values each
    const int n = 1500, B = 3;
    std::vector<float> x(B * n);
    for (int k = 0; k < B * n; ++k) x[k] = static_cast<float>(k % 7);
    PYRNN_LAUNCH(dim3(B), dim3(1024), 0, nullptr, sum_kernel)(x.data(), out.data(), n);
    if (cudaError_t e = cudaGetLastError()) return report(e);
    for (int b = 0; b < B; ++b) {
      double want = 0;
      for (int k = 0; k < n; ++k) want += x[b * n + k];
      if (out[b] != static_cast<float>(want)) {
        std::printf("wrong sum of block %d: %g, want %g\n", b, out[b], want);
        return 1;
      }
    }
    std::printf("ok sum\n");
    return 0;
  }
  if (name == "shuffle") {
    std::vector<int> r(64);
    PYRNN_LAUNCH(dim3(1), dim3(64), 0, nullptr, xor_kernel)(r.data());
    if (cudaError_t e = cudaGetLastError()) return report(e);
    for (int t = 0; t < 64; ++t) {
      const int base = t / 32 * 32, warp_sum = 32 * base + 496;
      const int want = warp_sum * 10000 + (base + 5) * 100 + (t % 32 ? t - 1 : t);
      if (r[t] != want) {
        std::printf("wrong shuffle result of thread %d: %d, want %d\n", t, r[t], want);
        return 1;
      }
    }
    std::printf("ok shuffle\n");
    return 0;
  }
  if (name == "bad_config") {
    PYRNN_LAUNCH(dim3(1), dim3(2048), 0, nullptr, partial_warp_kernel)(out.data());
    return report(cudaGetLastError());
  }
  std::vector<float> x(64, 1.f);
  if (name == "early_exit")
    PYRNN_LAUNCH(dim3(1), dim3(64), 0, nullptr, early_exit_kernel)(x.data(), out.data(), 40);
  else if (name == "partial_warp")
    PYRNN_LAUNCH(dim3(1), dim3(48), 0, nullptr, partial_warp_kernel)(out.data());
  else if (name == "divergent_barrier")
    PYRNN_LAUNCH(dim3(1), dim3(64), 0, nullptr, divergent_barrier_kernel)(out.data());
  else if (name == "deadlock")
    PYRNN_LAUNCH(dim3(1), dim3(32), 0, nullptr, deadlock_kernel)(out.data());
  else if (name == "missing_barrier")
    PYRNN_LAUNCH(dim3(2), dim3(64), 0, nullptr, missing_barrier_kernel)(out.data());
  else {
    std::printf("unknown test '%s'\n", name.c_str());
    return 2;
  }
  if (cudaError_t e = cudaGetLastError()) return report(e);
  std::printf("ok %s\n", name.c_str());
  return 0;
}
