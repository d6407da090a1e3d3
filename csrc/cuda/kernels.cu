// Fused pointwise kernels of one time step; see kernels.h for the buffer layouts.
//
// Launch shape, every kernel but a row cell's: grid (B, ceil(H / threads)), one thread per
// hidden unit j of sample b = blockIdx.x (P instead of H for the projection's own
// kernels). A row cell's kernels run one block per sample (grid (B, 1)). When the
// backward records norms it runs one block per sample (grid (B, 1), up to 1024 threads
// looping over j), so that the sums of squares over j are a block reduction:
// deterministic, no atomics, no second pass.
#include "kernels.h"

// Every launch is written PYRNN_LAUNCH(grid, block, smem, stream, kernel)(args...), which
// is nvcc's kernel<<<grid, block, smem, stream>>>(args...). The CPU emulator of the tests
// (tests/cuda_emu) defines it in its cuda_runtime.h to run the grid itself.
#ifndef PYRNN_LAUNCH
#define PYRNN_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

#include "../cells/registry.h"

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

// The row context of a row cell (cells/ln_lstm.h) on the device: one block per row, its
// threads over the units (j = threadIdx.x, + blockDim.x, ...), a barrier after each pass.
// The sums are block reductions (fixed order, no atomics), returned to every thread.
// The bodies exist in device code and in the emulator's C++; nvcc's host pass, which
// never runs them, sees them empty.
template <typename A>
struct DeviceRow {
  using S = A;
  template <class F>
  PYRNN_HD void each(int64_t n, F&& f) const {
#if defined(__CUDA_ARCH__) || !defined(__CUDACC__)
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) f(A(0), j);
    __syncthreads();
#endif
  }
  template <class F>
  PYRNN_HD A sum(int64_t n, F&& f) const {
#if defined(__CUDA_ARCH__) || !defined(__CUDACC__)
    __shared__ A total;
    A s = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += f(A(0), j);
    s = block_sum(s);
    if (threadIdx.x == 0) total = s;
    __syncthreads();
    s = total;
    __syncthreads();  // every thread has read total before the next sum writes it
    return s;
#else
    return A(0);
#endif
  }
};

// Step t of the forward of a row cell: one block per batch row.
template <class Cell, typename T, typename A>
__global__ void __launch_bounds__(kMaxReduceThreads)
    forward_row_kernel(const StepArgs<T> p, const int64_t t) {
  const int64_t B = p.batch, H = p.hidden, W = p.width, GH = Cell::kGates * H;
  const int64_t b = blockIdx.x, r = t * B + b;
  T* row = p.ws + r * W;
  T* y = p.y + r * H;
  if (!active(p, t, b)) {  // state unchanged; zero output and workspace row, as on the CPU
    for (int64_t j = threadIdx.x; j < W; j += blockDim.x) row[j] = store<T>(A(0));
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) y[j] = store<T>(A(0));
    return;
  }
  // the cell reads h_{t-1} only through hg, so h is overwritten in place
  T* h = p.h + b * H;
  T* c = p.c + b * H;
  const FwdRow<T> cr{H, row, p.hg + b * GH, p.b_hh, h, h, c, row + GH, p.k, p.cw};
  const DeviceRow<A> x;
  Cell::template forward_row<T>(cr, x);
  const bool keep_c = W >= (kCellOffset<Cell> + 1) * H;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    y[j] = h[j];
    if (keep_c) row[kCellOffset<Cell> * H + j] = c[j];
  }
}

// Step t of BPTT of a row cell: one block per batch row.
template <class Cell, typename T, typename A>
__global__ void __launch_bounds__(kMaxReduceThreads)
    backward_row_kernel(const StepArgs<T> p, const int64_t t) {
  const int64_t B = p.batch, H = p.hidden, W = p.width, GH = Cell::kGates * H;
  const int64_t b = blockIdx.x, r = t * B + b;
  T* gx = p.gx + r * GH;
  T* gh = p.gh + r * GH;
  T* hprev = p.hprev + r * H;
  T* dn = p.dnorm + r * H;
  A* gh_acc = p.gh_acc ? p.gh_acc + b * GH : nullptr;
  A sum_h = 0, sum_c = 0;
  if (!active(p, t, b)) {
    for (int64_t j = threadIdx.x; j < GH; j += blockDim.x) {
      gx[j] = gh[j] = store<T>(A(0));
      if (gh_acc) gh_acc[j] = A(0);
    }
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) hprev[j] = dn[j] = store<T>(A(0));
  } else {
    const int64_t q = prev_step(p, t, b);
    const T* row = p.ws + r * W;
    const T* hp = q >= 0 ? p.y + (q * B + b) * H : p.h0 + b * H;
    const T* c = row + kCellOffset<Cell> * H;
    const T* cp = q >= 0 ? p.ws + (q * B + b) * W + kCellOffset<Cell> * H : p.c0 + b * H;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) hprev[j] = hp[j];
    const BwdRow<T> cr{H, row, row + GH, p.y + r * H, hp, c, cp, gx, gh, p.k, p.clip, p.cw};
    const RowGrad<T, A> d{p.dy + r * H, p.dh + b * H, p.dc + b * H, dn};
    const DeviceRow<A> x;
    Cell::template backward_row<T>(cr, d, x, sum_h, sum_c);
    if (gh_acc)
      for (int64_t j = threadIdx.x; j < GH; j += blockDim.x) gh_acc[j] = load<A>(gh[j]);
  }
  if (threadIdx.x == 0) {
    if (p.norm_h) p.norm_h[r] = store<T>(sqrt(sum_h));
    if (p.norm_c) p.norm_c[r] = store<T>(sqrt(sum_c));
  }
}

template <class Cell, typename T, typename A>
__global__ void __launch_bounds__(kMaxThreads)
    forward_step_kernel(const StepArgs<T> p, const int64_t t) {
  const int64_t B = p.batch, H = p.hidden, W = p.width, GH = Cell::kGates * H;
  const int64_t b = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= H) return;
  const int64_t r = t * B + b;
  T* row = p.ws + r * W;
  // The cell's output: h_t, or m_t with a projection (project_step makes h_t and y).
  T* out = p.proj ? p.m + b * H : p.h + b * H;
  if (!active(p, t, b)) {  // state unchanged; zero output and workspace row, as on the CPU
    for (int64_t k = 0; k < W / H; ++k) row[k * H + j] = store<T>(A(0));
    if (p.proj) out[j] = store<T>(A(0));
    else p.y[r * H + j] = store<T>(A(0));
    return;
  }
  T* c = Cell::kHasCell ? p.c + b * H : nullptr;
  // h and c are both the previous state and the new one: thread j reads and writes
  // only entry j of each (with a projection the cell reads no previous h).
  const FwdRow<T> cr{H, row, p.hg + b * GH, p.b_hh, out, out, c,
                     Cell::kSaved ? row + GH : nullptr, p.k};
  Cell::template forward<T, A>(cr, j);
  if (!p.proj) p.y[r * H + j] = out[j];
  if constexpr (Cell::kHasCell) {
    if (W >= (kCellOffset<Cell> + 1) * H) row[kCellOffset<Cell> * H + j] = c[j];
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kMaxThreads)
    project_step_kernel(const StepArgs<T> p, const int64_t t) {
  const int64_t B = p.batch, P = p.proj;
  const int64_t b = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= P) return;
  T* y = p.y + (t * B + b) * P;
  if (!active(p, t, b)) {
    y[j] = store<T>(A(0));
    return;
  }
  const T v = p.hnew[b * P + j];
  p.h[b * P + j] = v;
  y[j] = v;
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
        if (Cell::kSplitGrad) gh[k * H + j] = store<T>(A(0));
        if (gh_acc) gh_acc[k * H + j] = A(0);
      }
      hprev[j] = store<T>(A(0));
    }
  } else {
    const int64_t q = prev_step(p, t, b);
    const T* row = p.ws ? p.ws + r * W : nullptr;
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
    const BwdRow<T> cr{H, row, Cell::kSaved ? row + GH : nullptr, p.y + r * H, hp, c, cp, gx,
                       Cell::kSplitGrad ? gh : nullptr, p.k, p.clip};
    for (int64_t j = j0; j < H; j += dj) {
      hprev[j] = hp[j];
      const A dh = load<A>(dy[j]) + dh_state[j];
      sum_h += dh * dh;
      A dc = Cell::kHasCell ? dc_state[j] : A(0);
      A direct = 0;
      Cell::template backward<T, A>(cr, j, dh, dc, direct);
      if constexpr (Cell::kHasCell) {
        sum_c += dc * dc;
        dc_state[j] = Cell::template carry<T, A>(cr, j, dc);
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

template <typename T, typename A>
__global__ void __launch_bounds__(kMaxReduceThreads)
    project_grad_step_kernel(const StepArgs<T> p, const int64_t t) {
  const int64_t B = p.batch, P = p.proj;
  const int64_t b = blockIdx.x, r = t * B + b;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t dj = static_cast<int64_t>(gridDim.y) * blockDim.x;
  A* d = p.dhtot + r * P;
  A* dh = p.dh + b * P;
  const T* dy = p.dy + r * P;
  A sum = 0;
  if (active(p, t, b)) {
    for (int64_t j = j0; j < P; j += dj) {
      const A v = load<A>(dy[j]) + dh[j];
      d[j] = v;
      dh[j] = A(0);  // no path to h_{t-1} but through W_hh (the loop adds it)
      sum += v * v;
    }
  } else {
    for (int64_t j = j0; j < P; j += dj) d[j] = A(0);
  }
  if (p.norm_h) {  // uniform over the launch; then gridDim.y == 1
    sum = block_sum(sum);
    if (threadIdx.x == 0) p.norm_h[r] = store<T>(sqrt(sum));
  }
}

// The LSTM cell's backward with a projection: dLoss/dh of the cell is dm (computed by
// the loop from dhtot), h_{t-1} is P wide, and m_t is kept for dW_hr.
template <typename T, typename A>
__global__ void __launch_bounds__(kMaxReduceThreads)
    backward_proj_step_kernel(const StepArgs<T> p, const int64_t t) {
  using Cell = LstmCell;
  const int64_t B = p.batch, H = p.hidden, P = p.proj, W = p.width, GH = 4 * H;
  const int64_t b = blockIdx.x, r = t * B + b;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t dj = static_cast<int64_t>(gridDim.y) * blockDim.x;
  T* gx = p.gx + r * GH;
  T* hprev = p.hprev + r * P;
  T* mrow = p.mall + r * H;
  A* gh_acc = p.gh_acc ? p.gh_acc + b * GH : nullptr;
  A sum_c = 0;
  if (!active(p, t, b)) {
    for (int64_t j = j0; j < H; j += dj) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        gx[k * H + j] = store<T>(A(0));
        if (gh_acc) gh_acc[k * H + j] = A(0);
      }
      mrow[j] = store<T>(A(0));
    }
    for (int64_t j = j0; j < P; j += dj) hprev[j] = store<T>(A(0));
  } else {
    const int64_t q = prev_step(p, t, b);
    const T* row = p.ws + r * W;
    const T* c = row + kCellOffset<Cell> * H;
    const T* cp = q >= 0 ? p.ws + (q * B + b) * W + kCellOffset<Cell> * H : p.c0 + b * H;
    const T* hp = q >= 0 ? p.y + (q * B + b) * P : p.h0 + b * P;
    for (int64_t j = j0; j < P; j += dj) hprev[j] = hp[j];
    const A* dm = p.dm + b * H;
    A* dc_state = p.dc + b * H;
    const BwdRow<T> cr{H, row, nullptr, nullptr, nullptr, c, cp, gx, nullptr, p.k, p.clip};
    for (int64_t j = j0; j < H; j += dj) {
      A dc = dc_state[j], direct = 0;
      Cell::template backward<T, A>(cr, j, dm[j], dc, direct);
      sum_c += dc * dc;
      dc_state[j] = Cell::template carry<T, A>(cr, j, dc);
      mrow[j] = store<T>(Cell::template output<T, A>(cr, j));
      if (gh_acc) {
#pragma unroll
        for (int k = 0; k < 4; ++k) gh_acc[k * H + j] = load<A>(gx[k * H + j]);
      }
    }
  }
  if (p.norm_c) {  // uniform over the launch; then gridDim.y == 1
    sum_c = block_sum(sum_c);
    if (threadIdx.x == 0) p.norm_c[r] = store<T>(sqrt(sum_c));
  }
}

// Threads per block for H units, capped at cap: a multiple of 32 (block_sum needs it).
inline int threads_for(int64_t H, int cap) {
  const int64_t n = (H + 31) / 32 * 32;
  return static_cast<int>(n < cap ? n : cap);
}

// One block row per sample, ceil(n / threads) blocks of threads over n units; with
// reduce, one block per sample of up to 1024 threads (the kernels loop over the units).
inline void shape_for(int64_t B, int64_t n, bool reduce, dim3& grid, int& threads) {
  threads = threads_for(n, reduce ? kMaxReduceThreads : kMaxThreads);
  grid = dim3(static_cast<unsigned>(B),
              reduce ? 1u : static_cast<unsigned>((n + threads - 1) / threads));
}

}  // namespace

template <typename T>
cudaError_t forward_step(int cell, const StepArgs<T>& p, int64_t t, cudaStream_t stream) {
  if (p.batch == 0 || p.hidden == 0) return cudaSuccess;
  dim3 grid;
  int threads;
  shape_for(p.batch, p.hidden, false, grid, threads);
  cudaError_t e = cudaErrorInvalidValue;  // an unknown cell, or a projection it does not take
  with_cell_at(cell, [&](auto c) {
    using Cell = decltype(c);
    if (p.proj && !Cell::kProjection) return;
    if constexpr (Cell::kRowWise) {
      shape_for(p.batch, p.hidden, true, grid, threads);
      PYRNN_LAUNCH(grid, threads, 0, stream, forward_row_kernel<Cell, T, acc_t<T>>)(p, t);
    } else {
      PYRNN_LAUNCH(grid, threads, 0, stream, forward_step_kernel<Cell, T, acc_t<T>>)(p, t);
    }
    e = cudaGetLastError();
  });
  return e;
}

template <typename T>
cudaError_t project_step(const StepArgs<T>& p, int64_t t, cudaStream_t stream) {
  if (p.batch == 0 || p.proj == 0) return cudaSuccess;
  dim3 grid;
  int threads;
  shape_for(p.batch, p.proj, false, grid, threads);
  PYRNN_LAUNCH(grid, threads, 0, stream, project_step_kernel<T, acc_t<T>>)(p, t);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_step(int cell, const StepArgs<T>& p, int64_t t, cudaStream_t stream) {
  if (p.batch == 0 || p.hidden == 0) return cudaSuccess;
  dim3 grid;
  int threads;
  cudaError_t e = cudaErrorInvalidValue;  // an unknown cell, or a projection it does not take
  with_cell_at(cell, [&](auto c) {
    using Cell = decltype(c);
    if constexpr (std::is_same_v<Cell, LstmCell>) {
      if (p.proj) {
        const int64_t n = p.hidden > p.proj ? p.hidden : p.proj;
        shape_for(p.batch, n, p.norm_c != nullptr, grid, threads);
        PYRNN_LAUNCH(grid, threads, 0, stream, backward_proj_step_kernel<T, acc_t<T>>)(p, t);
        e = cudaGetLastError();
        return;
      }
    } else {
      if (p.proj) return;
    }
    if constexpr (Cell::kRowWise) {
      shape_for(p.batch, p.hidden, true, grid, threads);
      PYRNN_LAUNCH(grid, threads, 0, stream, backward_row_kernel<Cell, T, acc_t<T>>)(p, t);
    } else {
      shape_for(p.batch, p.hidden, p.norm_h != nullptr || p.norm_c != nullptr, grid, threads);
      PYRNN_LAUNCH(grid, threads, 0, stream, backward_step_kernel<Cell, T, acc_t<T>>)(p, t);
    }
    e = cudaGetLastError();
  });
  return e;
}

template <typename T>
cudaError_t project_grad_step(const StepArgs<T>& p, int64_t t, cudaStream_t stream) {
  if (p.batch == 0 || p.proj == 0) return cudaSuccess;
  dim3 grid;
  int threads;
  shape_for(p.batch, p.proj, p.norm_h != nullptr, grid, threads);
  PYRNN_LAUNCH(grid, threads, 0, stream, project_grad_step_kernel<T, acc_t<T>>)(p, t);
  return cudaGetLastError();
}

#define PYRNN_INSTANTIATE_CELLS(T)                                                    \
  template cudaError_t forward_step<T>(int, const StepArgs<T>&, int64_t, cudaStream_t);  \
  template cudaError_t backward_step<T>(int, const StepArgs<T>&, int64_t, cudaStream_t); \
  template cudaError_t project_step<T>(const StepArgs<T>&, int64_t, cudaStream_t);       \
  template cudaError_t project_grad_step<T>(const StepArgs<T>&, int64_t, cudaStream_t);

PYRNN_INSTANTIATE_CELLS(float)
PYRNN_INSTANTIATE_CELLS(double)
PYRNN_INSTANTIATE_CELLS(__half)
PYRNN_INSTANTIATE_CELLS(__nv_bfloat16)

#undef PYRNN_INSTANTIATE_CELLS

}  // namespace pyrnn::cuda
