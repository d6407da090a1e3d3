// LSTM cell, gate blocks in torch.nn order i, f, g, o (G = 4):
//   i = s(a_i), f = s(a_f), g = tanh(a_g), o = s(a_o)
//   c = f * c_prev + i * g,  h = o * tanh(c)
// The forward overwrites the input-projection row with the activated gates, which
// (with c) is all that BPTT needs.
#pragma once
#include "common.h"

namespace pyrnn {

struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr bool kHasCell = true;
  static constexpr int kSaved = 0;

  // xg: [4H] in: input projection (b_ih included); out: activated gates i, f, g, o.
  template <typename T, typename A>
  PYRNN_HD static void forward(int j, int H, T* xg, const T* hg, const T* bh,
                               const T* h_prev, const T* c_prev, T* h, T* c, T* saved) {
    (void)h_prev; (void)saved;
    A pre[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
      pre[k] = load<A>(xg[k * H + j]) + load<A>(hg[k * H + j]) + (bh ? load<A>(bh[k * H + j]) : A(0));
    A i = sigmoid(pre[0]), f = sigmoid(pre[1]), g = tanh(pre[2]), o = sigmoid(pre[3]);
    A cn = f * load<A>(c_prev[j]) + i * g;
    c[j] = store<T>(cn);
    h[j] = store<T>(o * tanh(cn));
    xg[j] = store<T>(i);
    xg[H + j] = store<T>(f);
    xg[2 * H + j] = store<T>(g);
    xg[3 * H + j] = store<T>(o);
  }

  // dh: total dLoss/dh_t; *dc: in dLoss/dc_t from step t+1, out dLoss/dc_{t-1}.
  // xg: saved activated gates of this step; c: c_t; c_prev: c_{t-1}.
  // Writes the (clipped) pre-activation gradients into gx (gh aliases gx).
  // Returns through *dc_total the total dLoss/dc_t (for the gradient-norm record).
  template <typename T, typename A>
  PYRNN_HD static void backward(int j, int H, A dh, A* dc, const T* xg, const T* saved,
                                const T* h, const T* h_prev, const T* c, const T* c_prev,
                                T* gx, T* gh, A* dh_direct, A clip) {
    (void)saved; (void)h; (void)h_prev; (void)dh_direct;
    A i = load<A>(xg[j]), f = load<A>(xg[H + j]), g = load<A>(xg[2 * H + j]), o = load<A>(xg[3 * H + j]);
    A tc = tanh(load<A>(c[j]));
    A dct = *dc + dh * o * (A(1) - tc * tc);
    *dc = dct;  // caller reads the total, then calls carry() for dc_prev
    A dai = clamp_abs(dct * g * i * (A(1) - i), clip);
    A daf = clamp_abs(dct * load<A>(c_prev[j]) * f * (A(1) - f), clip);
    A dag = clamp_abs(dct * i * (A(1) - g * g), clip);
    A dao = clamp_abs(dh * tc * o * (A(1) - o), clip);
    gx[j] = store<T>(dai);
    gx[H + j] = store<T>(daf);
    gx[2 * H + j] = store<T>(dag);
    gx[3 * H + j] = store<T>(dao);
    if (gh != gx) {
      gh[j] = store<T>(dai);
      gh[H + j] = store<T>(daf);
      gh[2 * H + j] = store<T>(dag);
      gh[3 * H + j] = store<T>(dao);
    }
  }

  // dLoss/dc_{t-1} from the total dLoss/dc_t: the additive path through the forget gate.
  template <typename T, typename A>
  PYRNN_HD static A carry(int j, int H, A dct, const T* xg) {
    return dct * load<A>(xg[H + j]);
  }
};

}  // namespace pyrnn
