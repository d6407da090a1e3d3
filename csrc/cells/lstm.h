// LSTM cell, gate blocks in torch.nn order i, f, g, o (G = 4):
//   i = s(a_i), f = s(a_f), g = tanh(a_g), o = s(a_o)
//   c = f * c_prev + i * g,  h = o * tanh(c)
// The forward overwrites the input-projection row with the activated gates, which
// (with c_t, kept by the caller) is all that BPTT needs. Interface: see rnn.h.
#pragma once
#include "common.h"

namespace pyrnn {

struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr bool kHasCell = true;
  static constexpr int kSaved = 0;

  template <typename T, typename A>
  PYRNN_HD static A pre(int64_t k, int64_t j, int64_t H, const T* xg, const T* hg,
                        const T* bh) {
    // summed as torch.nn does: (W_hh h + b_hh) + (W_ih x + b_ih)
    const A hgk = ld<A>(hg + k * H + j);
    return ld<A>(xg + k * H + j) + (bh ? hgk + ld<A>(bh + k * H + j) : hgk);
  }

  template <typename T, typename A>
  PYRNN_HD static void forward(int64_t j, int64_t H, T* xg, const T* hg, const T* bh,
                               const T* h_prev, const T* c_prev, T* h, T* c, T* saved) {
    (void)h_prev; (void)saved;
    const A i = sigmoid(pre<T, A>(0, j, H, xg, hg, bh));
    const A f = sigmoid(pre<T, A>(1, j, H, xg, hg, bh));
    const A g = math_tanh(pre<T, A>(2, j, H, xg, hg, bh));
    const A o = sigmoid(pre<T, A>(3, j, H, xg, hg, bh));
    const A cn = f * ld<A>(c_prev + j) + i * g;
    st(c + j, cn);
    st(h + j, o * math_tanh(cn));
    st(xg + j, i);
    st(xg + H + j, f);
    st(xg + 2 * H + j, g);
    st(xg + 3 * H + j, o);
  }

  // xg: the saved activated gates of this step; c: c_t; c_prev: c_{t-1}.
  template <typename T, typename A>
  PYRNN_HD static void backward(int64_t j, int64_t H, A dh, A* dc, const T* xg, const T* saved,
                                const T* h, const T* h_prev, const T* c, const T* c_prev,
                                T* gx, T* gh, A* dh_direct, A clip) {
    (void)saved; (void)h; (void)h_prev; (void)gh;  // gh aliases gx for the LSTM
    const A i = ld<A>(xg + j), f = ld<A>(xg + H + j), g = ld<A>(xg + 2 * H + j),
            o = ld<A>(xg + 3 * H + j);
    const A tc = math_tanh(ld<A>(c + j));
    const A dct = *dc + dh * o * (A(1) - tc * tc);
    *dc = dct;
    // products in torch's order (sigmoid' as (grad * (1 - s)) * s), so that Inf and NaN
    // land where torch.nn puts them
    st(gx + j, clamp_abs((dct * g) * (A(1) - i) * i, clip));
    st(gx + H + j, clamp_abs((dct * ld<A>(c_prev + j)) * (A(1) - f) * f, clip));
    st(gx + 2 * H + j, clamp_abs(dct * i * (A(1) - g * g), clip));
    st(gx + 3 * H + j, clamp_abs((dh * tc) * (A(1) - o) * o, clip));
    *dh_direct = A(0);
  }

  // dLoss/dc_{t-1} from the total dLoss/dc_t: the additive path through the forget gate.
  template <typename T, typename A>
  PYRNN_HD static A carry(int64_t j, int64_t H, A dct, const T* xg) {
    return dct * ld<A>(xg + H + j);
  }
};

}  // namespace pyrnn
