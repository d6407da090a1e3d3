// Elman RNN cell: h = act(a), a = W_ih x + b_ih + W_hh h_prev + b_hh.
// G = 1. Backward needs only h itself (tanh' = 1 - h^2, relu' = [h > 0]), so the
// forward saves nothing beyond its output.
#pragma once
#include "common.h"

namespace pyrnn {

template <Act kAct>
struct RnnCell {
  static constexpr int kGates = 1;
  static constexpr bool kHasCell = false;
  static constexpr int kSaved = 0;  // extra saved values per hidden unit and step

  // xg: [G*H] input projection row (b_ih included); hg: [G*H] recurrent row (bias not
  // included); bh: [G*H] b_hh or nullptr. Writes h[j].
  template <typename T, typename A>
  PYRNN_HD static void forward(int j, int H, T* xg, const T* hg, const T* bh,
                               const T* h_prev, const T* c_prev, T* h, T* c, T* saved) {
    (void)H; (void)h_prev; (void)c_prev; (void)c; (void)saved;
    A a = load<A>(xg[j]) + load<A>(hg[j]) + (bh ? load<A>(bh[j]) : A(0));
    A y = kAct == Act::kTanh ? tanh(a) : (a > A(0) ? a : A(0));
    h[j] = store<T>(y);
  }

  // dh: total dLoss/dh_t. Writes the pre-activation gradient into gx[j] (== gh[j]).
  // dc and dh_direct are unused (no cell state, no direct path to h_prev).
  template <typename T, typename A>
  PYRNN_HD static void backward(int j, int H, A dh, A* dc, const T* xg, const T* saved,
                                const T* h, const T* h_prev, const T* c, const T* c_prev,
                                T* gx, T* gh, A* dh_direct, A clip) {
    (void)H; (void)dc; (void)xg; (void)saved; (void)h_prev; (void)c; (void)c_prev;
    (void)dh_direct;
    A y = load<A>(h[j]);
    A d = kAct == Act::kTanh ? dh * (A(1) - y * y) : (y > A(0) ? dh : A(0));
    d = clamp_abs(d, clip);
    gx[j] = store<T>(d);
    if (gh != gx) gh[j] = store<T>(d);
  }
};

}  // namespace pyrnn
