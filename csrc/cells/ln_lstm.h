// LayerNorm-LSTM (Ba, Kiros and Hinton 2016), gate blocks in torch.nn's order i, f, g, o:
//   a   = LN(W_ih x_t) * gamma_ih + b_ih  +  LN(W_hh h_{t-1}) * gamma_hh + b_hh   [4H]
//   i, f, o = s(a_i), s(a_f), s(a_o);  g = tanh(a_g)
//   c_t = f * c_{t-1} + i * g
//   h_t = o * tanh(LN(c_t) * gamma_c + beta_c)
// LN(v) = (v - mean(v)) / sqrt(var(v) + eps), the mean and the biased variance over the
// whole vector (4H entries for the pre-activations, H for c_t), as torch's layer_norm.
// The input side does not depend on the recurrence: the op normalises x W_ih^T over all
// T*B rows before the time loop, and the loop hands the cell that side of a (with b_ih) in
// gates[]. The cell weights (FwdRow::w) are [gamma_ih 4H | gamma_hh 4H |
// gamma_c H | beta_c H]; the biases are the op's bias_ih and bias_hh.
//
// A row cell (kRowWise): the mean and the variance need every unit of a row, so the cell
// runs one whole row at a time against a row context X, which each backend implements:
//   X::S                          the arithmetic scalar type
//   x.each(n, f)                  f(V zero, j) for every unit j < n, V a scalar or a SIMD
//                                 type over units j ..; every write of f is visible to
//                                 the calls after each() returns
//   x.sum(n, f)                   the sum over j < n of f(V zero, j) as S (f may write
//                                 its own entries, as in each)
// Workspace row: [activated gates 4H | LN(hg) normalised 4H | LN(c) normalised H |
// 1/sigma of hg in all H entries | 1/sigma of c_t likewise | c_t H]. The cell
// interface: common.h.
#pragma once
#include <type_traits>

#include "common.h"

namespace pyrnn {

// What a row cell's backward reads and writes besides its BwdRow: the incoming output
// gradient, the state that the loop carries from step to step (S: its storage, T or a
// wider type) and the gradient its own weights need.
template <typename T, typename S>
struct RowGrad {
  const T* dy;  // [H] dLoss/dy_t
  S* dh;        // [H] in: dLoss/dh_t from step t+1; out: the part of dLoss/dh_{t-1}
                // that does not pass through W_hh (0 here)
  S* dc;        // [H] in: dLoss/dc_t from step t+1; out: dLoss/dc_{t-1}
  T* dnorm;     // [H] out: dLoss/d(LN(c_t) * gamma_c + beta_c), for the gradients of
                // gamma_c and beta_c
};

struct LnLstmCell {
  static constexpr const char* kName = "ln_lstm";
  static constexpr int kGates = 4;
  static constexpr int kSaved = 7;
  static constexpr bool kHasCell = true;
  static constexpr bool kSplitGrad = true;  // gh = dLoss/d(W_hh h_{t-1}), before its LN
  static constexpr bool kKeepsRow = true;
  static constexpr bool kProjection = false;
  static constexpr bool kRowWise = true;
  static constexpr bool kLayerNorm = true;
  static constexpr const char* kParams = "eps=1e-05";

  // The mean of v[0, n) and 1 / sqrt(its biased variance + eps), in two passes.
  template <typename T, class X>
  PYRNN_HD static void moments(X& x, const T* v, int64_t n, typename X::S eps,
                               typename X::S& mean, typename X::S& rstd) {
    using S = typename X::S;
    const S m = x.sum(n, [&](auto z, int64_t j) { return ld<decltype(z)>(v + j); }) / S(n);
    const S var = x.sum(n, [&](auto z, int64_t j) {
      using V = decltype(z);
      const V d = ld<V>(v + j) - V(m);
      return d * d;
    }) / S(n);
    mean = m;
    rstd = S(1) / sqrt(var + eps);
  }

  // A row's mean m (in S) as hi + lo, hi representable in T's arithmetic: v - m is then
  // computed as (v - hi) - lo, whose first difference is exact where v sits close to m.
  // Rounding m to float32 first would move every centred value by up to half an ulp of
  // m, which the division by a small deviation multiplies (H = 2, c_t near -1.17 with a
  // deviation of 0.013: 77 ulp in the normalised values). lo is 0 unless T is float and
  // S wider.
  template <typename T, typename S>
  PYRNN_HD static void split(S m, S& hi, S& lo) {
    if constexpr (std::is_same_v<T, float> && !std::is_same_v<S, float>) {
      hi = S(static_cast<float>(m));
      lo = m - hi;
    } else {
      hi = m;
      lo = S(0);
    }
  }

  template <typename T, class X>
  PYRNN_HD static void forward_row(const FwdRow<T>& r, X& x) {
    using S = typename X::S;
    const int64_t H = r.H, GH = 4 * H;
    const S eps = S(r.k[0]);
    const T* g_hh = r.w + GH;
    const T* g_c = r.w + 2 * GH;
    const T* b_c = g_c + H;
    T* xh = r.saved;           // normalised hg
    T* xc = r.saved + GH;      // normalised c_t
    T* stat = r.saved + GH + H;
    S mh, rh, mh_lo;
    moments(x, r.hg, GH, eps, mh, rh);
    split<T>(mh, mh, mh_lo);
    x.each(H, [&](auto z, int64_t j) {
      using V = decltype(z);
      V a[4];
      for (int k = 0; k < 4; ++k) {
        const int64_t at = k * H + j;
        const V n = ((ld<V>(r.hg + at) - V(mh)) - V(mh_lo)) * V(rh);
        st(xh + at, n);
        const V rec = r.b_hh ? n * ld<V>(g_hh + at) + ld<V>(r.b_hh + at) : n * ld<V>(g_hh + at);
        a[k] = ld<V>(r.gates + at) + rec;
      }
      const V i = sigmoid(a[0]), f = sigmoid(a[1]), g = math_tanh(a[2]), o = sigmoid(a[3]);
      st(r.c + j, f * ld<V>(r.c + j) + i * g);
      st(r.gates + j, i);
      st(r.gates + H + j, f);
      st(r.gates + 2 * H + j, g);
      st(r.gates + 3 * H + j, o);
    });
    S mc, rc, mc_lo;
    moments(x, r.c, H, eps, mc, rc);
    split<T>(mc, mc, mc_lo);
    x.each(H, [&](auto z, int64_t j) {
      using V = decltype(z);
      const V n = ((ld<V>(r.c + j) - V(mc)) - V(mc_lo)) * V(rc);
      st(xc + j, n);
      st(r.h + j, ld<V>(r.gates + 3 * H + j) * math_tanh(n * ld<V>(g_c + j) + ld<V>(b_c + j)));
      st(stat + j, V(rh));  // the two statistics fill their blocks
      st(stat + H + j, V(rc));
    });
  }

  // Writes gx (dLoss/da, clamped when r.clip > 0) and gh (dLoss/d(W_hh h_{t-1})) of the
  // row; sum_h and sum_c receive ||dLoss/dh_t||^2 and ||dLoss/dc_t||^2.
  template <typename T, typename S2, class X>
  PYRNN_HD static void backward_row(const BwdRow<T>& r, const RowGrad<T, S2>& d, X& x,
                                    typename X::S& sum_h, typename X::S& sum_c) {
    using S = typename X::S;
    const int64_t H = r.H, GH = 4 * H;
    const T* g_hh = r.w + GH;
    const T* g_c = r.w + 2 * GH;
    const T* b_c = g_c + H;
    const T* xh = r.saved;
    const T* xc = r.saved + GH;
    const S rh = load<S>(r.saved[GH + H]);
    const S rc = load<S>(r.saved[GH + 2 * H]);
    // dLoss/dh_t, the output gate's gradient, and dLoss/d(LN(c) gamma_c + beta_c); u =
    // that times gamma_c goes to gh[0, H) until the last pass writes gh (stored, so that
    // every later use, the means included, sees the same rounded value: with H = 1,
    // u - mean(u) is then exactly 0, whatever the compiler fuses)
    T* u_row = r.gh;
    sum_h = x.sum(H, [&](auto z, int64_t j) {
      using V = decltype(z);
      const V dh = ld<V>(d.dy + j) + ld<V>(d.dh + j);
      const V o = ld<V>(r.gates + 3 * H + j);
      const V tc = math_tanh(ld<V>(xc + j) * ld<V>(g_c + j) + ld<V>(b_c + j));
      st(d.dnorm + j, dh * o * (V(1) - tc * tc));
      st(u_row + j, ld<V>(d.dnorm + j) * ld<V>(g_c + j));
      st(r.gx + 3 * H + j, clamp_abs((dh * tc) * (V(1) - o) * o, V(r.clip)));
      return dh * dh;
    });
    // through LN(c): dc = rc (u - mean(u) - xc mean(u xc))
    const S m1 = x.sum(H, [&](auto z, int64_t j) { return ld<decltype(z)>(u_row + j); }) / S(H);
    const S m2 = x.sum(H, [&](auto z, int64_t j) {
      using V = decltype(z);
      return ld<V>(u_row + j) * ld<V>(xc + j);
    }) / S(H);
    sum_c = x.sum(H, [&](auto z, int64_t j) {
      using V = decltype(z);
      const V u = ld<V>(u_row + j);
      const V dct = ld<V>(d.dc + j) + V(rc) * (u - V(m1) - ld<V>(xc + j) * V(m2));
      const V i = ld<V>(r.gates + j), f = ld<V>(r.gates + H + j), g = ld<V>(r.gates + 2 * H + j);
      const V clip = V(r.clip);
      st(r.gx + j, clamp_abs((dct * g) * (V(1) - i) * i, clip));
      st(r.gx + H + j, clamp_abs((dct * ld<V>(r.c_prev + j)) * (V(1) - f) * f, clip));
      st(r.gx + 2 * H + j, clamp_abs(dct * i * (V(1) - g * g), clip));
      st(d.dc + j, dct * f);
      st(d.dh + j, V(0));
      return dct * dct;
    });
    // through LN(hg): gh = rh (u - mean(u) - xh mean(u xh)) with u = gx * gamma_hh
    const S n1 = x.sum(GH, [&](auto z, int64_t j) {
      using V = decltype(z);
      return ld<V>(r.gx + j) * ld<V>(g_hh + j);
    }) / S(GH);
    const S n2 = x.sum(GH, [&](auto z, int64_t j) {
      using V = decltype(z);
      return ld<V>(r.gx + j) * ld<V>(g_hh + j) * ld<V>(xh + j);
    }) / S(GH);
    x.each(GH, [&](auto z, int64_t j) {
      using V = decltype(z);
      const V u = ld<V>(r.gx + j) * ld<V>(g_hh + j);
      st(r.gh + j, V(rh) * (u - V(n1) - ld<V>(xh + j) * V(n2)));
    });
  }
};

}  // namespace pyrnn
