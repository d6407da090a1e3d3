// Fused pointwise kernels of one time step; see kernels.h for the buffer layouts.
//
// Launch shape, both kernels: grid (B, ceil(H / threads)), one thread per hidden unit j
// of sample b = blockIdx.x. When the backward records norms it runs one block per
// sample (grid (B, 1), up to 1024 threads looping over j), so that the sums of squares
// over j are a block reduction: deterministic, no atomics, no second pass.
#include "kernels.h"

#include "../cells/gru.h"
#include "../cells/lstm.h"
#include "../cells/rnn.h"

namespace pyrnn::cuda {
namespace {

constexpr int kMaxThreads = 256;         // per block, one thread per j
constexpr int kMaxReduceThreads = 1024;  // per block when reducing over j

template <class Cell>
constexpr int kCellOffset = Cell::kGates + Cell::kSaved;  // of c_t in a ws row, units of H

template <typename T>
__device__ __forceinline__ bool active(const StepArgs<T>& p, int64_t t, int64_t b) {
  return p.lengths == nullptr || t < p.lengths[b];
}

// Index of the step that ran just before step t of sequence b, or -1 if t was its first.
template <typename T>
__device__ __forceinline__ int64_t prev_step(const StepArgs<T>& p, int64_t t, int64_t b) {
  if (!p.reverse) return t - 1;
  const int64_t last = p.lengths ? p.lengths[b] : p.steps;
  return t + 1 < last ? t + 1 : -1;
}

// Sum of v over the block; the result is valid in thread 0. blockDim.x must be a
// multiple of 32, and every thread of the block must call it.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_sums[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : A(0);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

template <class Cell, typename T, typename A>
__global__ void __launch_bounds__(kMaxThreads)
    forward_step_kernel(const StepArgs<T> p, const int64_t t) {
  const int64_t B = p.batch, H = p.hidden, W = p.width, GH = Cell::kGates * H;
  const int64_t b = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= H) return;
  const int64_t r = t * B + b;
  T* yrow = p.y + r * H;
  if (!active(p, t, b)) {
    yrow[j] = store<T>(A(0));
    return;
  }
  T* row = p.ws + r * W;
  T* h = p.h + b * H;
  T* c = Cell::kHasCell ? p.c + b * H : nullptr;
  T* saved = Cell::kSaved ? row + GH : nullptr;
  // h and c are both the previous state and the new one: thread j reads and writes
  // only entry j of each.
  Cell::template forward<T, A>(j, H, row, p.hg + b * GH, p.b_hh, h, c, h, c, saved);
  yrow[j] = h[j];
  if constexpr (Cell::kHasCell) {
    if (W >= (kCellOffset<Cell> + 1) * H) row[kCellOffset<Cell> * H + j] = c[j];
  }
}

template <class Cell, typename T, typename A>
__global__ void __launch_bounds__(kMaxReduceThreads)
    backward_step_kernel(const StepArgs<T> p, const int64_t t) {
  constexpr int G = Cell::kGates;
  const int64_t B = p.batch, H = p.hidden, W = p.width, GH = G * H;
  const int64_t b = blockIdx.x;
  const int64_t r = t * B + b;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t dj = static_cast<int64_t>(gridDim.y) * blockDim.x;
  T* gx = p.gx + r * GH;
  T* gh = p.gh + r * GH;
  T* hprev = p.hprev + r * H;
  A* gh_acc = p.gh_acc ? p.gh_acc + b * GH : nullptr;
  A sum_h = 0, sum_c = 0;

  if (!active(p, t, b)) {
    for (int64_t j = j0; j < H; j += dj) {
#pragma unroll
      for (int k = 0; k < G; ++k) {
        gx[k * H + j] = store<T>(A(0));
        if (gh != gx) gh[k * H + j] = store<T>(A(0));
        if (gh_acc) gh_acc[k * H + j] = A(0);
      }
      hprev[j] = store<T>(A(0));
    }
  } else {
    const int64_t q = prev_step(p, t, b);
    const T* row = p.ws ? p.ws + r * W : nullptr;
    const T* saved = Cell::kSaved ? row + GH : nullptr;
    const T* h = p.y + r * H;
    const T* hp = q >= 0 ? p.y + (q * B + b) * H : p.h0 + b * H;
    const T* c = nullptr;
    const T* cp = nullptr;
    if constexpr (Cell::kHasCell) {
      c = row + kCellOffset<Cell> * H;
      cp = q >= 0 ? p.ws + (q * B + b) * W + kCellOffset<Cell> * H : p.c0 + b * H;
    }
    const T* dy = p.dy + r * H;
    A* dh_state = p.dh + b * H;
    A* dc_state = Cell::kHasCell ? p.dc + b * H : nullptr;
    const A clip = A(p.clip);
    for (int64_t j = j0; j < H; j += dj) {
      hprev[j] = hp[j];
      const A dh = load<A>(dy[j]) + dh_state[j];
      sum_h += dh * dh;
      A dc = Cell::kHasCell ? dc_state[j] : A(0);
      A direct = 0;
      Cell::template backward<T, A>(j, H, dh, &dc, row, saved, h, hp, c, cp, gx, gh,
                                    &direct, clip);
      if constexpr (Cell::kHasCell) {
        sum_c += dc * dc;
        dc_state[j] = Cell::template carry<T, A>(j, H, dc, row);
      }
      dh_state[j] = direct;
      if (gh_acc) {
#pragma unroll
        for (int k = 0; k < G; ++k) gh_acc[k * H + j] = load<A>(gh[k * H + j]);
      }
    }
  }

  // Uniform over the launch; the launcher makes gridDim.y == 1 in this case.
  if (p.norm_h || p.norm_c) {
    sum_h = block_sum(sum_h);
    if (Cell::kHasCell) sum_c = block_sum(sum_c);
    if (threadIdx.x == 0) {
      if (p.norm_h) p.norm_h[r] = store<T>(sqrt(sum_h));
      if (p.norm_c) p.norm_c[r] = store<T>(sqrt(sum_c));
    }
  }
}

// Threads per block for H units, capped at cap: a multiple of 32 (block_sum needs it).
inline int threads_for(int64_t H, int cap) {
  const int64_t n = (H + 31) / 32 * 32;
  return static_cast<int>(n < cap ? n : cap);
}

}  // namespace

template <class Cell, typename T>
cudaError_t forward_step(const StepArgs<T>& p, int64_t t, cudaStream_t stream) {
  if (p.batch == 0 || p.hidden == 0) return cudaSuccess;
  const int threads = threads_for(p.hidden, kMaxThreads);
  const dim3 grid(static_cast<unsigned>(p.batch),
                  static_cast<unsigned>((p.hidden + threads - 1) / threads));
  forward_step_kernel<Cell, T, acc_t<T>><<<grid, threads, 0, stream>>>(p, t);
  return cudaGetLastError();
}

template <class Cell, typename T>
cudaError_t backward_step(const StepArgs<T>& p, int64_t t, cudaStream_t stream) {
  if (p.batch == 0 || p.hidden == 0) return cudaSuccess;
  const bool reduce = p.norm_h != nullptr || p.norm_c != nullptr;
  const int threads = threads_for(p.hidden, reduce ? kMaxReduceThreads : kMaxThreads);
  const dim3 grid(static_cast<unsigned>(p.batch),
                  reduce ? 1u : static_cast<unsigned>((p.hidden + threads - 1) / threads));
  backward_step_kernel<Cell, T, acc_t<T>><<<grid, threads, 0, stream>>>(p, t);
  return cudaGetLastError();
}

#define PYRNN_INSTANTIATE(Cell, T)                                                      \
  template cudaError_t forward_step<Cell, T>(const StepArgs<T>&, int64_t, cudaStream_t); \
  template cudaError_t backward_step<Cell, T>(const StepArgs<T>&, int64_t, cudaStream_t);

#define PYRNN_INSTANTIATE_CELLS(T)          \
  PYRNN_INSTANTIATE(RnnCell<Act::kTanh>, T) \
  PYRNN_INSTANTIATE(RnnCell<Act::kRelu>, T) \
  PYRNN_INSTANTIATE(LstmCell, T)            \
  PYRNN_INSTANTIATE(GruCell, T)

PYRNN_INSTANTIATE_CELLS(float)
PYRNN_INSTANTIATE_CELLS(double)
PYRNN_INSTANTIATE_CELLS(__half)
PYRNN_INSTANTIATE_CELLS(__nv_bfloat16)

#undef PYRNN_INSTANTIATE_CELLS
#undef PYRNN_INSTANTIATE

}  // namespace pyrnn::cuda
