// LSTM cell, gate blocks in torch.nn order i, f, g, o (G = 4):
//   i = s(a_i), f = s(a_f), g = tanh(a_g), o = s(a_o)
//   c = f * c_prev + i * g,  h = o * tanh(c)
// The forward overwrites the input-projection row with the activated gates, which
// (with c_t, kept by the loop after the saved values) is all that BPTT needs. The cell
// interface: common.h.
#pragma once
#include "common.h"

namespace pyrnn {

struct LstmCell {
  static constexpr const char* kName = "lstm";
  static constexpr int kGates = 4;
  static constexpr int kSaved = 0;
  static constexpr bool kHasCell = true;
  static constexpr bool kSplitGrad = false;
  static constexpr bool kKeepsRow = true;
  static constexpr bool kProjection = true;
  static constexpr bool kRowWise = false;
  static constexpr bool kLayerNorm = false;
  static constexpr const char* kParams = "";

  template <typename T, typename A>
  PYRNN_HD static A pre(const FwdRow<T>& r, int64_t k, int64_t j) {
    // summed as torch.nn does: (W_hh h + b_hh) + (W_ih x + b_ih)
    const int64_t at = k * r.H + j;
    const A hg = ld<A>(r.hg + at);
    return ld<A>(r.gates + at) + (r.b_hh ? hg + ld<A>(r.b_hh + at) : hg);
  }

  template <typename T, typename A>
  PYRNN_HD static void forward(const FwdRow<T>& r, int64_t j) {
    const int64_t H = r.H;
    const A i = sigmoid(pre<T, A>(r, 0, j));
    const A f = sigmoid(pre<T, A>(r, 1, j));
    const A g = math_tanh(pre<T, A>(r, 2, j));
    const A o = sigmoid(pre<T, A>(r, 3, j));
    const A cn = f * ld<A>(r.c + j) + i * g;
    st(r.c + j, cn);
    st(r.h + j, o * math_tanh(cn));
    st(r.gates + j, i);
    st(r.gates + H + j, f);
    st(r.gates + 2 * H + j, g);
    st(r.gates + 3 * H + j, o);
  }

  template <typename T, typename A>
  PYRNN_HD static void backward(const BwdRow<T>& r, int64_t j, A dh, A& dc, A& direct) {
    const int64_t H = r.H;
    const A i = ld<A>(r.gates + j), f = ld<A>(r.gates + H + j), g = ld<A>(r.gates + 2 * H + j),
            o = ld<A>(r.gates + 3 * H + j);
    const A clip = A(r.clip);
    const A tc = math_tanh(ld<A>(r.c + j));
    const A dct = dc + dh * o * (A(1) - tc * tc);
    dc = dct;
    // products in torch's order (sigmoid' as (grad * (1 - s)) * s), so that Inf and NaN
    // land where torch.nn puts them
    st(r.gx + j, clamp_abs((dct * g) * (A(1) - i) * i, clip));
    st(r.gx + H + j, clamp_abs((dct * ld<A>(r.c_prev + j)) * (A(1) - f) * f, clip));
    st(r.gx + 2 * H + j, clamp_abs(dct * i * (A(1) - g * g), clip));
    st(r.gx + 3 * H + j, clamp_abs((dh * tc) * (A(1) - o) * o, clip));
    direct = A(0);
  }

  // (kProjection) The cell's output m_t = o * tanh(c_t) again, from what the forward
  // kept: the projection's weight gradient needs it at every step.
  template <typename T, typename A>
  PYRNN_HD static A output(const BwdRow<T>& r, int64_t j) {
    return ld<A>(r.gates + 3 * r.H + j) * math_tanh(ld<A>(r.c + j));
  }

  // dLoss/dc_{t-1} from the total dLoss/dc_t: the additive path through the forget gate.
  template <typename T, typename A>
  PYRNN_HD static A carry(const BwdRow<T>& r, int64_t j, A dct) {
    return dct * ld<A>(r.gates + r.H + j);
  }
};

}  // namespace pyrnn
