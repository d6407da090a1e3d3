// The CUDA time loops of one layer in one direction: the host side of the forward and of
// BPTT, which per step runs the recurrent matrix product and launches the step's fused
// kernels (kernels.h). Torch-free: the products are passed in as a callable, so that the
// ATen ops (cuda_ops.cpp: cuBLAS through ATen, on the current stream) and the CPU
// emulator of the tests (tests/cuda_emu: a CPU product) run this same loop.
//
// Buffers and shapes: see kernels.h (StepArgs). The caller allocates every buffer, fills
// ws[..., :G*H] with the input projection x @ W_ih^T + b_ih, sets the running states
// (h = h0, c = c0 for the forward; dh = dLoss/dh_n, dc = dLoss/dc_n or zeros for BPTT),
// and afterwards runs the products over all T*B rows (dX, dW_ih, dW_hh, dW_hr, biases).
#pragma once
#include <type_traits>

#include "kernels.h"

namespace pyrnn::cuda {

// One matrix product, row-major: C[M, N] = A[M, K] @ op(B), or C += A @ op(B) with
// accumulate; op(B) = B^T for B [N, K] when b_transposed, else B for B [K, N]. lda, ldb,
// ldc: leading dimensions (row strides). E: the element type of all three.
template <typename E>
struct Product {
  int64_t M, N, K;
  const E* a;
  int64_t lda;
  const E* b;
  int64_t ldb;
  bool b_transposed;
  E* c;
  int64_t ldc;
  bool accumulate;
};

// mm(Product<T>) and mm(Product<acc_t<T>>) must run the product in stream order with the
// kernels (for T = float, double they are the same type).
template <class Cell, typename T, class Mm>
cudaError_t forward_loop(const StepArgs<T>& p, Mm&& mm, cudaStream_t stream) {
  const int64_t Tn = p.steps, B = p.batch, H = p.hidden;
  const int64_t GH = Cell::kGates * H, P = p.proj ? p.proj : H;
  if (B == 0) return cudaSuccess;
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = p.reverse ? Tn - 1 - s : s;
    // hg[B, G*H] = h_{t-1}[B, P] @ W_hh^T
    mm(Product<T>{B, GH, P, p.h, P, p.w_hh, P, true, p.hg, GH, false});
    if (const cudaError_t e = forward_step<T>(cell_index<Cell>(), p, t, stream)) return e;
    if (p.proj) {
      // hnew[B, P] = m_t[B, H] @ W_hr^T
      mm(Product<T>{B, P, H, p.m, H, p.w_hr, H, true, p.hnew, P, false});
      if (const cudaError_t e = project_step<T>(p, t, stream)) return e;
    }
  }
  return cudaSuccess;
}

template <class Cell, typename T, class Mm>
cudaError_t backward_loop(const StepArgs<T>& p, Mm&& mm, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t Tn = p.steps, B = p.batch, H = p.hidden;
  const int64_t GH = Cell::kGates * H, P = p.proj ? p.proj : H;
  if (B == 0) return cudaSuccess;
  // The recurrent products run in A: on W_hh (W_hr) itself for float and double, on its
  // copy in A (and on gh_acc, the kernel's copy of gh_t in A) for the 16-bit types.
  const A* w_hh = nullptr;
  const A* w_hr = nullptr;
  if constexpr (std::is_same_v<A, T>) {
    w_hh = p.w_hh;
    w_hr = p.w_hr;
  } else {
    if (!p.gh_acc || !p.w_hh_acc || (p.proj && !p.w_hr_acc)) return cudaErrorInvalidValue;
    w_hh = p.w_hh_acc;
    w_hr = p.w_hr_acc;
  }
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = p.reverse ? s : Tn - 1 - s;  // the forward order, reversed
    if (p.proj) {
      if (const cudaError_t e = project_grad_step<T>(p, t, stream)) return e;
      // dm[B, H] = dhtot_t[B, P] @ W_hr[P, H]
      mm(Product<A>{B, H, P, p.dhtot + t * B * P, P, w_hr, H, false, p.dm, H, false});
    }
    if (const cudaError_t e = backward_step<T>(cell_index<Cell>(), p, t, stream)) return e;
    // dh_{t-1}[B, P] += gh_t[B, G*H] @ W_hh[G*H, P]   (inactive rows of gh_t are zero)
    const A* g;
    if constexpr (std::is_same_v<A, T>) g = p.gh_acc ? p.gh_acc : p.gh + t * B * GH;
    else g = p.gh_acc;
    mm(Product<A>{B, P, GH, g, GH, w_hh, P, false, p.dh, P, true});
  }
  return cudaSuccess;
}

}  // namespace pyrnn::cuda
