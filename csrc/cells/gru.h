// GRU cell, PyTorch's variant, gate blocks r, z, n (G = 3):
//   r = s(x_r + h_r), z = s(x_z + h_z), n = tanh(x_n + r * h_n),
//   h = (1 - z) * n + z * h_prev,
// where x_* include b_i* and h_* = W_h* h_prev + b_h*.
// Saved per step: the activated r, z, n (overwriting the input-projection row) and
// h_n (kSaved = 1 value per hidden unit), which the reset-gate gradient needs.
// Interface: see rnn.h.
#pragma once
#include "common.h"

namespace pyrnn {

struct GruCell {
  static constexpr int kGates = 3;
  static constexpr bool kHasCell = false;
  static constexpr int kSaved = 1;

  template <typename T, typename A>
  PYRNN_HD static void forward(int64_t j, int64_t H, T* xg, const T* hg, const T* bh,
                               const T* h_prev, const T* c_prev, T* h, T* c, T* saved) {
    (void)c_prev; (void)c;
    const A hr = ld<A>(hg + j) + (bh ? ld<A>(bh + j) : A(0));
    const A hz = ld<A>(hg + H + j) + (bh ? ld<A>(bh + H + j) : A(0));
    const A hn = ld<A>(hg + 2 * H + j) + (bh ? ld<A>(bh + 2 * H + j) : A(0));
    const A r = sigmoid(ld<A>(xg + j) + hr);
    const A z = sigmoid(ld<A>(xg + H + j) + hz);
    const A n = math_tanh(ld<A>(xg + 2 * H + j) + r * hn);
    const A hp = ld<A>(h_prev + j);
    st(h + j, (hp - n) * z + n);  // torch.nn's form of (1 - z) n + z h_prev
    st(xg + j, r);
    st(xg + H + j, z);
    st(xg + 2 * H + j, n);
    st(saved + j, hn);
  }

  template <typename T, typename A>
  PYRNN_HD static void backward(int64_t j, int64_t H, A dh, A* dc, const T* xg, const T* saved,
                                const T* h, const T* h_prev, const T* c, const T* c_prev,
                                T* gx, T* gh, A* dh_direct, A clip) {
    (void)dc; (void)h; (void)c; (void)c_prev;
    const A r = ld<A>(xg + j), z = ld<A>(xg + H + j), n = ld<A>(xg + 2 * H + j);
    const A hn = ld<A>(saved + j), hp = ld<A>(h_prev + j);
    // the derivatives of the forward's form, in torch's order of operations, so that
    // Inf and NaN land where torch.nn puts them (dh - dh z is NaN for an infinite dh)
    const A dan = clamp_abs((dh - dh * z) * (A(1) - n * n), clip);
    const A daz = clamp_abs((dh * (hp - n)) * (A(1) - z) * z, clip);
    const A dar = clamp_abs((dan * hn) * (A(1) - r) * r, clip);
    *dh_direct = dh * z;
    st(gx + j, dar);
    st(gx + H + j, daz);
    st(gx + 2 * H + j, dan);
    st(gh + j, dar);
    st(gh + H + j, daz);
    st(gh + 2 * H + j, dan * r);
  }
};

}  // namespace pyrnn
