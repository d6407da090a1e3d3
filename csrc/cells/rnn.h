// Elman RNN cell: h = act(a), a = W_ih x + b_ih + W_hh h_prev + b_hh.
// G = 1. Backward needs only h itself (tanh' = 1 - h^2, relu' = [h > 0]), so the
// forward saves nothing beyond its output.
//
// Every cell (rnn.h, lstm.h, gru.h) has the same interface, for hidden unit j of one
// batch row; A is the arithmetic type (a scalar, or a SIMD type covering units
// j .. j+lanes-1), T the storage type:
//   forward(j, H, xg, hg, bh, h_prev, c_prev, h, c, saved)
//     xg: [G*H] in: input projection incl. b_ih; out: what backward needs (activated
//         gates); hg: [G*H] recurrent projection W_hh h_prev (bias not included);
//     bh: [G*H] b_hh or nullptr; writes h[j], c[j] (LSTM), saved[j] (GRU).
//   backward(j, H, dh, dc, xg, saved, h, h_prev, c, c_prev, gx, gh, dh_direct, clip)
//     dh: total dLoss/dh_t; *dc: in dLoss/dc_t from step t+1, out the total dLoss/dc_t;
//     gx, gh: [G*H] gradients of the input-side and recurrent-side pre-activations;
//     *dh_direct: the part of dLoss/dh_prev that does not pass through W_hh.
#pragma once
#include "common.h"

namespace pyrnn {

template <Act kAct>
struct RnnCell {
  static constexpr int kGates = 1;
  static constexpr bool kHasCell = false;
  static constexpr int kSaved = 0;  // extra saved values per hidden unit and step

  template <typename T, typename A>
  PYRNN_HD static void forward(int64_t j, int64_t H, T* xg, const T* hg, const T* bh,
                               const T* h_prev, const T* c_prev, T* h, T* c, T* saved) {
    (void)H; (void)h_prev; (void)c_prev; (void)c; (void)saved;
    // summed as torch.nn does: (W_hh h + b_hh) + (W_ih x + b_ih)
    const A a = ld<A>(xg + j) + (bh ? ld<A>(hg + j) + ld<A>(bh + j) : ld<A>(hg + j));
    if constexpr (kAct == Act::kTanh) {
      st(h + j, math_tanh(a));
    } else {
      st(h + j, where(a < A(0), A(0), a));  // NaN stays NaN
    }
  }

  template <typename T, typename A>
  PYRNN_HD static void backward(int64_t j, int64_t H, A dh, A* dc, const T* xg, const T* saved,
                                const T* h, const T* h_prev, const T* c, const T* c_prev,
                                T* gx, T* gh, A* dh_direct, A clip) {
    (void)H; (void)dc; (void)xg; (void)saved; (void)h_prev; (void)c; (void)c_prev;
    const A y = ld<A>(h + j);
    A d;
    if constexpr (kAct == Act::kTanh) {
      d = dh * (A(1) - y * y);
    } else {
      d = where(y <= A(0), A(0), dh);  // torch's threshold_backward: NaN passes dh
    }
    d = clamp_abs(d, clip);
    st(gx + j, d);
    if (gh != gx) st(gh + j, d);
    *dh_direct = A(0);
  }
};

}  // namespace pyrnn
