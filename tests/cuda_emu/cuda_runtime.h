// Stand-in for the CUDA runtime header: what csrc/cuda/*.cu uses, so that g++ compiles
// those sources for the SIMT emulator (emu.cpp). Kernels run on the CPU with one fiber
// per CUDA thread of a block (see emu.cpp for the semantics and the strict checks).
#pragma once
#include <math.h>  // sqrt, expf, tanhf and their float overloads, as device code has them

#include <cstddef>
#include <cstdint>
#include <tuple>
#include <utility>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// Shared memory: one copy per worker thread of the emulator, and each worker runs one
// block at a time, so one copy per running block (as on a GPU, it is not initialised
// per block: kernels must write before they read).
#define __shared__ static thread_local

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace cuda_emu {

// What a running CUDA thread sees; set by the scheduler before it resumes a fiber.
struct ThreadCtx {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern thread_local ThreadCtx* tl_ctx;

struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
};

// Runs body(ctx) once per thread of every block of the grid (synchronously; the stream
// is only an ordering token). Returns cudaSuccess, or the error that a GPU would
// report (invalid configuration), or cudaErrorLaunchFailure after a strict-mode report.
cudaError_t run_grid(const LaunchConfig& cfg, void (*body)(void*), void* ctx);

cudaError_t get_last_error();  // and clear it, as cudaGetLastError
const char* error_string(cudaError_t e);
const char* last_report();  // the last strict-mode report, or ""

// Block and warp synchronisation, called from inside a fiber.
void syncthreads(const char* file, int line);
// Warp exchange: every lane in mask calls it with its value (bytes) at the same site;
// kind 0 = idx (src lane = param), 1 = up (lane - param), 2 = down (lane + param),
// 3 = xor (lane ^ param), within segments of width lanes; 4 = syncwarp (no value).
void warp_op(unsigned mask, void* value, size_t size, int kind, int param, int width,
             const char* file, int line);

template <typename V>
V shfl(unsigned mask, V v, int kind, int param, int width, const char* file, int line) {
  static_assert(sizeof(V) <= 8, "shuffle of more than 8 bytes");
  warp_op(mask, &v, sizeof(V), kind, param, width, file, line);
  return v;
}

template <typename... P>
struct Launcher {
  LaunchConfig cfg;
  void (*kernel)(P...);
  template <typename... Args>
  void operator()(Args&&... args) const {
    // The kernel's parameters, converted once as a launch does; each thread gets a copy.
    struct Call {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } call{kernel, std::tuple<std::decay_t<P>...>(std::forward<Args>(args)...)};
    run_grid(cfg, [](void* c) {
      Call& k = *static_cast<Call*>(c);
      std::apply(k.kernel, k.params);
    }, &call);
  }
};

template <typename... P>
Launcher<P...> launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                      void (*kernel)(P...)) {
  return Launcher<P...>{LaunchConfig{grid, block, smem, stream}, kernel};
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::tl_ctx->thread_idx)
#define blockIdx (::cuda_emu::tl_ctx->block_idx)
#define blockDim (::cuda_emu::tl_ctx->block_dim)
#define gridDim (::cuda_emu::tl_ctx->grid_dim)
#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::cuda_emu::warp_op(__VA_ARGS__ + 0 ? (__VA_ARGS__ + 0) : 0xffffffffu, \
                                            nullptr, 0, 4, 0, 32, __FILE__, __LINE__)
#define __shfl_sync(mask, v, src, ...) \
  ::cuda_emu::shfl(mask, v, 0, src, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) \
  ::cuda_emu::shfl(mask, v, 1, d, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) \
  ::cuda_emu::shfl(mask, v, 2, d, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, m, ...) \
  ::cuda_emu::shfl(mask, v, 3, m, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __FILE__, __LINE__)

// The kernel launch of csrc/cuda: nvcc's `kernel<<<grid, block, smem, stream>>>(args)`.
#define PYRNN_LAUNCH(grid, block, smem, stream, ...) \
  ::cuda_emu::launch(grid, block, smem, stream, __VA_ARGS__)

inline cudaError_t cudaGetLastError() { return cuda_emu::get_last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) { return cuda_emu::error_string(e); }
