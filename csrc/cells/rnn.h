// Elman RNN cell: h = act(a), a = W_ih x + b_ih + W_hh h_prev + b_hh, with act tanh,
// ReLU, or leaky ReLU (a if a > 0 else negative_slope * a, as torch's leaky_relu).
// G = 1. Backward needs only h itself (tanh' = 1 - h^2; relu' = [h > 0]; leaky relu'
// = 1 if h > 0 else negative_slope, which h decides since negative_slope >= 0), so the
// forward saves nothing beyond its output. The cell interface: common.h.
#pragma once
#include "common.h"

namespace pyrnn {

template <Act kAct>
struct RnnCell {
  static constexpr const char* kName = kAct == Act::kTanh   ? "rnn_tanh"
                                       : kAct == Act::kRelu ? "rnn_relu"
                                                            : "rnn_leaky_relu";
  static constexpr int kGates = 1;
  static constexpr int kSaved = 0;
  static constexpr bool kHasCell = false;
  static constexpr bool kSplitGrad = false;
  static constexpr bool kKeepsRow = false;
  static constexpr bool kProjection = false;
  static constexpr bool kRowWise = false;
  static constexpr bool kLayerNorm = false;
  static constexpr const char* kParams = kAct == Act::kLeakyRelu ? "negative_slope=0.01" : "";

  template <typename T, typename A>
  PYRNN_HD static void forward(const FwdRow<T>& r, int64_t j) {
    // summed as torch.nn does: (W_hh h + b_hh) + (W_ih x + b_ih)
    const A hg = ld<A>(r.hg + j);
    const A a = ld<A>(r.gates + j) + (r.b_hh ? hg + ld<A>(r.b_hh + j) : hg);
    if constexpr (kAct == Act::kTanh) {
      st(r.h + j, math_tanh(a));
    } else if constexpr (kAct == Act::kRelu) {
      st(r.h + j, where(a < A(0), A(0), a));  // NaN stays NaN
    } else {
      st(r.h + j, where(a > A(0), a, a * A(r.k[0])));  // NaN stays NaN
    }
  }

  template <typename T, typename A>
  PYRNN_HD static void backward(const BwdRow<T>& r, int64_t j, A dh, A& dc, A& direct) {
    (void)dc;
    const A y = ld<A>(r.h + j);
    A d;
    if constexpr (kAct == Act::kTanh) {
      d = dh * (A(1) - y * y);
    } else if constexpr (kAct == Act::kRelu) {
      d = where(y <= A(0), A(0), dh);  // torch's threshold_backward: NaN passes dh
    } else {
      d = where(y > A(0), dh, dh * A(r.k[0]));  // torch's leaky_relu_backward
    }
    st(r.gx + j, clamp_abs(d, A(r.clip)));
    direct = A(0);
  }
};

}  // namespace pyrnn
