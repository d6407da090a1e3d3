// GRU cell, PyTorch's variant, gate blocks r, z, n (G = 3):
//   r = s(x_r + h_r), z = s(x_z + h_z), n = tanh(x_n + r * h_n),
//   h = (1 - z) * n + z * h_prev,
// where x_* include b_i* and h_* = W_h* h_prev + b_h*.
// Saved per step: the activated r, z, n (overwriting the input-projection row) and
// h_n (kSaved = 1 value per hidden unit), which the reset-gate gradient needs.
#pragma once
#include "common.h"

namespace pyrnn {

struct GruCell {
  static constexpr int kGates = 3;
  static constexpr bool kHasCell = false;
  static constexpr int kSaved = 1;

  template <typename T, typename A>
  PYRNN_HD static void forward(int j, int H, T* xg, const T* hg, const T* bh,
                               const T* h_prev, const T* c_prev, T* h, T* c, T* saved) {
    (void)c_prev; (void)c;
    A hr = load<A>(hg[j]) + (bh ? load<A>(bh[j]) : A(0));
    A hz = load<A>(hg[H + j]) + (bh ? load<A>(bh[H + j]) : A(0));
    A hn = load<A>(hg[2 * H + j]) + (bh ? load<A>(bh[2 * H + j]) : A(0));
    A r = sigmoid(load<A>(xg[j]) + hr);
    A z = sigmoid(load<A>(xg[H + j]) + hz);
    A n = tanh(load<A>(xg[2 * H + j]) + r * hn);
    A hp = load<A>(h_prev[j]);
    h[j] = store<T>((A(1) - z) * n + z * hp);
    xg[j] = store<T>(r);
    xg[H + j] = store<T>(z);
    xg[2 * H + j] = store<T>(n);
    if (saved) saved[j] = store<T>(hn);
  }

  // gx: gradient w.r.t. the input-side pre-activations (x_r, x_z, x_n);
  // gh: gradient w.r.t. the recurrent-side ones (h_r, h_z, h_n), which differ in the
  // n block by the factor r. *dh_direct: the part of dLoss/dh_prev that bypasses W_hh.
  template <typename T, typename A>
  PYRNN_HD static void backward(int j, int H, A dh, A* dc, const T* xg, const T* saved,
                                const T* h, const T* h_prev, const T* c, const T* c_prev,
                                T* gx, T* gh, A* dh_direct, A clip) {
    (void)dc; (void)h; (void)c; (void)c_prev;
    A r = load<A>(xg[j]), z = load<A>(xg[H + j]), n = load<A>(xg[2 * H + j]), hn = load<A>(saved[j]);
    A hp = load<A>(h_prev[j]);
    A dan = clamp_abs(dh * (A(1) - z) * (A(1) - n * n), clip);
    A daz = clamp_abs(dh * (hp - n) * z * (A(1) - z), clip);
    A dar = clamp_abs(dan * hn * r * (A(1) - r), clip);
    *dh_direct = dh * z;
    gx[j] = store<T>(dar);
    gx[H + j] = store<T>(daz);
    gx[2 * H + j] = store<T>(dan);
    gh[j] = store<T>(dar);
    gh[H + j] = store<T>(daz);
    gh[2 * H + j] = store<T>(dan * r);
  }
};

}  // namespace pyrnn
