// CUDA time-step kernels: the fused pointwise part of one step of the forward and of
// BPTT, templated on the cell (csrc/cells/). Torch-free: raw device pointers, one
// argument struct and a stream. The caller runs the matrix products between steps and
// allocates every buffer; buffer layouts and semantics are those of csrc/cpu/loops.h.
//
// Shapes (one layer, one direction):
//   ws:      [T, B, W]  workspace rows: G*H input projection in / activated gates out,
//                       then Cell::kSaved*H saved values, then (LSTM, if W allows) c_t;
//                       the forward zeroes the whole row at steps past a sequence's length
//   y:       [T, B, P]  output; zero at steps past a sequence's length
//   h0:      [B, P],  c0: [B, H]
//   P = H, except for an LSTM with a projection (proj > 0): P = proj, and
//   h_t = W_hr m_t with m_t = o_t * tanh(c_t) (the recurrent state and the output)
//   lengths: [B] int64 on the device, or nullptr: step t of sequence b runs iff
//            t < lengths[b], in either direction
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../cells/registry.h"

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
  const T* w_hh = nullptr;   // [G*H, P]  (read by the time loop's products, loops.h)
  double k[kMaxCellParams] = {};  // the cell's constants (kParams), by value
  const T* cw = nullptr;     // the cell's own weights (Cell::kLayerNorm), else nullptr
  int64_t proj = 0;          // P of an LSTM projection, 0 without one
  const T* w_hr = nullptr;   // [P, H] (projection)

  // forward only
  T* hg = nullptr;           // [B, G*H] h_{t-1} @ W_hh^T of the current step
  T* h = nullptr;            // [B, P] running h state, then h_n (h0 on entry)
  T* c = nullptr;            // [B, H] running c state, then c_n (LSTM; c0 on entry)
  T* m = nullptr;            // [B, H] m_t of the step (projection; zero where inactive)
  T* hnew = nullptr;         // [B, P] m_t @ W_hr^T of the step (projection)

  // backward only
  const T* dy = nullptr;     // [T, B, P]
  T* gx = nullptr;           // [T, B, G*H] gate gradients, input side
  T* gh = nullptr;           // [T, B, G*H] gate gradients, recurrent side (Cell::kSplitGrad;
                             // else == gx)
  T* hprev = nullptr;        // [T, B, P] h_{t-1} of every active step, zero otherwise
  A* dh = nullptr;           // [B, P] running dLoss/dh (in: from step t+1; out: the part
                             // that bypasses W_hh; the loop adds gh_t @ W_hh). On entry
                             // dLoss/dh_n (or zero)
  A* dc = nullptr;           // [B, H] running dLoss/dc (LSTM; dLoss/dc_n or zero on entry)
  A* gh_acc = nullptr;       // [B, G*H] or nullptr: copy of gh_t in A, for the recurrent
                             // product when T is narrower than A (then required)
  const A* w_hh_acc = nullptr;  // [G*H, P] W_hh in A (when T is narrower than A)
  const A* w_hr_acc = nullptr;  // [P, H] W_hr in A (projection, T narrower than A)
  A* dm = nullptr;           // [B, H] dLoss/dm_t = dh_t @ W_hr (projection)
  A* dhtot = nullptr;        // [T, B, P] total dLoss/dh_t of every step (projection; for
                             // dW_hr = dhtot^T @ mall), zero where inactive
  T* mall = nullptr;         // [T, B, H] m_t of every step (projection), zero where inactive
  T* dnorm = nullptr;        // [T, B, H] (Cell::kLayerNorm) dLoss/d(LN(c_t) gamma_c + beta_c)
                             // of every step, zero where inactive
  double clip = 0;           // <= 0: off
  T* norm_h = nullptr;       // [T, B] or nullptr: ||dLoss/dh_t|| per step and sample
  T* norm_c = nullptr;       // [T, B] or nullptr: ||dLoss/dc_t|| (LSTM)
};

// Step t of the forward: for every (b, j) with t active in sequence b, Cell::forward on
// ws[t, b], hg[b], h[b], c[b]; then y[t, b] = h[b] (and c_t into ws[t, b] when W is wide
// enough). Where t is inactive: y[t, b] = 0 and ws[t, b] = 0, state unchanged. With a
// projection the cell writes m[b] instead of h[b], and project_step finishes the step.
// cell: the cell's index in the registry (cell_index<Cell>()).
template <typename T>
cudaError_t forward_step(int cell, const StepArgs<T>& p, int64_t t, cudaStream_t stream);

// Projection, after hnew = m @ W_hr^T: h[b] = y[t, b] = hnew[b] where t is active in
// sequence b, y[t, b] = 0 elsewhere.
template <typename T>
cudaError_t project_step(const StepArgs<T>& p, int64_t t, cudaStream_t stream);

// Step t of BPTT: for every b, what one iteration of the `for b` loop of
// cpu::backward_loop does, including the norms when norm_h / norm_c are set. With a
// projection (LSTM), the cell's part of the CPU loop's projected step on dm, after
// project_grad_step and dm = dhtot_t @ W_hr.
template <typename T>
cudaError_t backward_step(int cell, const StepArgs<T>& p, int64_t t, cudaStream_t stream);

// Projection, first part of step t of BPTT: dhtot[t, b] = dy[t, b] + dh[b] and dh[b] = 0
// where t is active (dhtot[t, b] = 0 elsewhere, dh kept), with its norm into norm_h.
template <typename T>
cudaError_t project_grad_step(const StepArgs<T>& p, int64_t t, cudaStream_t stream);

}  // namespace pyrnn::cuda
