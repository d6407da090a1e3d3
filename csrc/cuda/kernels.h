// CUDA time-step kernels: the fused pointwise part of one step of the forward and of
// BPTT, templated on the cell (csrc/cells/). Torch-free: raw device pointers, one
// argument struct and a stream. The caller runs the matrix products between steps and
// allocates every buffer; buffer layouts and semantics are those of csrc/cpu/loops.h.
//
// Shapes (one layer, one direction):
//   ws:      [T, B, W]  workspace rows: G*H input projection in / activated gates out,
//                       then Cell::kSaved*H saved values, then (LSTM, if W allows) c_t
//   y:       [T, B, H]  output; zero at steps past a sequence's length
//   h0, c0:  [B, H]
//   lengths: [B] int64 on the device, or nullptr: step t of sequence b runs iff
//            t < lengths[b], in either direction
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace pyrnn::cuda {

// Arithmetic type for a storage type: double for double, float for the others.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
struct StepArgs {
  using A = acc_t<T>;
  int64_t steps = 0, batch = 0, hidden = 0, width = 0;  // T, B, H, W
  bool reverse = false;
  const int64_t* lengths = nullptr;
  T* ws = nullptr;
  T* y = nullptr;
  const T* h0 = nullptr;
  const T* c0 = nullptr;
  const T* b_hh = nullptr;   // [G*H] or nullptr

  // forward only
  const T* hg = nullptr;     // [B, G*H] h_{t-1} @ W_hh^T of the current step
  T* h = nullptr;            // [B, H] running h state, then h_n
  T* c = nullptr;            // [B, H] running c state, then c_n (LSTM)

  // backward only
  const T* dy = nullptr;     // [T, B, H]
  T* gx = nullptr;           // [T, B, G*H] gate gradients, input side
  T* gh = nullptr;           // [T, B, G*H] gate gradients, recurrent side (== gx unless GRU)
  T* hprev = nullptr;        // [T, B, H] h_{t-1} of every active step, zero otherwise
  A* dh = nullptr;           // [B, H] running dLoss/dh (in: from step t+1; out: the part
                             // that bypasses W_hh; the caller adds gh_t @ W_hh)
  A* dc = nullptr;           // [B, H] running dLoss/dc (LSTM)
  A* gh_acc = nullptr;       // [B, G*H] or nullptr: copy of gh_t in A, for the recurrent
                             // product when T is narrower than A
  double clip = 0;           // <= 0: off
  T* norm_h = nullptr;       // [T, B] or nullptr: ||dLoss/dh_t|| per step and sample
  T* norm_c = nullptr;       // [T, B] or nullptr: ||dLoss/dc_t|| (LSTM)
};

// Step t of the forward: for every (b, j) with t active in sequence b, Cell::forward on
// ws[t, b], hg[b], h[b], c[b]; then y[t, b] = h[b] (and c_t into ws[t, b] when W is wide
// enough). y[t, b] = 0 where t is inactive.
template <class Cell, typename T>
cudaError_t forward_step(const StepArgs<T>& p, int64_t t, cudaStream_t stream);

// Step t of BPTT: for every b, what one iteration of the `for b` loop of
// cpu::backward_loop does, including the norms when norm_h / norm_c are set.
template <class Cell, typename T>
cudaError_t backward_step(const StepArgs<T>& p, int64_t t, cudaStream_t stream);

}  // namespace pyrnn::cuda
