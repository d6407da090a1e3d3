// GRU cell, PyTorch's variant, gate blocks r, z, n (G = 3):
//   r = s(x_r + h_r), z = s(x_z + h_z), n = tanh(x_n + r * h_n),
//   h = (1 - z) * n + z * h_prev,
// where x_* include b_i* and h_* = W_h* h_prev + b_h*.
// Saved per step: the activated r, z, n (overwriting the input-projection row) and
// h_n (kSaved = 1 value per hidden unit), which the reset-gate gradient needs. The
// recurrent side gets its own gradient (kSplitGrad): dLoss/dh_n = r * dLoss/da_n.
// The cell interface: common.h.
#pragma once
#include "common.h"

namespace pyrnn {

struct GruCell {
  static constexpr const char* kName = "gru";
  static constexpr int kGates = 3;
  static constexpr int kSaved = 1;
  static constexpr bool kHasCell = false;
  static constexpr bool kSplitGrad = true;
  static constexpr bool kKeepsRow = true;
  static constexpr bool kProjection = false;
  static constexpr bool kRowWise = false;
  static constexpr bool kLayerNorm = false;
  static constexpr const char* kParams = "";

  template <typename T, typename A>
  PYRNN_HD static void forward(const FwdRow<T>& r, int64_t j) {
    const int64_t H = r.H;
    const T* bh = r.b_hh;
    const A hr = ld<A>(r.hg + j) + (bh ? ld<A>(bh + j) : A(0));
    const A hz = ld<A>(r.hg + H + j) + (bh ? ld<A>(bh + H + j) : A(0));
    const A hn = ld<A>(r.hg + 2 * H + j) + (bh ? ld<A>(bh + 2 * H + j) : A(0));
    const A rg = sigmoid(ld<A>(r.gates + j) + hr);
    const A z = sigmoid(ld<A>(r.gates + H + j) + hz);
    const A n = math_tanh(ld<A>(r.gates + 2 * H + j) + rg * hn);
    const A hp = ld<A>(r.h_prev + j);
    st(r.h + j, (hp - n) * z + n);  // torch.nn's form of (1 - z) n + z h_prev
    st(r.gates + j, rg);
    st(r.gates + H + j, z);
    st(r.gates + 2 * H + j, n);
    st(r.saved + j, hn);
  }

  template <typename T, typename A>
  PYRNN_HD static void backward(const BwdRow<T>& r, int64_t j, A dh, A& dc, A& direct) {
    (void)dc;
    const int64_t H = r.H;
    const A rg = ld<A>(r.gates + j), z = ld<A>(r.gates + H + j), n = ld<A>(r.gates + 2 * H + j);
    const A hn = ld<A>(r.saved + j), hp = ld<A>(r.h_prev + j);
    const A clip = A(r.clip);
    // the derivatives of the forward's form, in torch's order of operations, so that
    // Inf and NaN land where torch.nn puts them (dh - dh z is NaN for an infinite dh)
    const A dan = clamp_abs((dh - dh * z) * (A(1) - n * n), clip);
    const A daz = clamp_abs((dh * (hp - n)) * (A(1) - z) * z, clip);
    const A dar = clamp_abs((dan * hn) * (A(1) - rg) * rg, clip);
    direct = dh * z;
    st(r.gx + j, dar);
    st(r.gx + H + j, daz);
    st(r.gx + 2 * H + j, dan);
    st(r.gh + j, dar);
    st(r.gh + H + j, daz);
    st(r.gh + 2 * H + j, dan * rg);
  }
};

}  // namespace pyrnn
