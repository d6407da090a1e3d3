// Shared helpers for the cell headers: host/device qualifiers and scalar activations.
// Torch-free, so that nvcc and a plain C++ compiler can both include it.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PYRNN_HD __host__ __device__ __forceinline__
#else
#define PYRNN_HD inline
#endif

namespace pyrnn {

// Activation ids used by the Elman cell.
enum class Act { kTanh = 0, kRelu = 1, kLeakyRelu = 2 };

// ---- The cell interface ----
// A cell is a struct with the constants below and two (three with a cell state) static
// member templates, written once for the CPU loops (A: a scalar or a SIMD type covering
// units j .. j+lanes-1) and the CUDA kernels (A: a scalar, one thread per unit). T is
// the storage type. The registry (registry.h) lists the cells; everything else about a
// cell is derived from these members:
//   kName       its mode string ("lstm")
//   kGates      G, the gate blocks of its pre-activations (W_ih is [G*H, I])
//   kSaved      values per unit that the forward saves for backward besides the gates
//   kHasCell    it carries a cell state c (cx, c_n, dLoss/dc)
//   kSplitGrad  the recurrent side of its pre-activations gets its own gradient gh
//               (otherwise dLoss/d(W_hh h + b_hh) equals gx, and gh is nullptr)
//   kKeepsRow   its workspace row (gates and saved values) is needed for backward, so
//               the forward keeps it; false: the output alone suffices
//   kProjection it accepts a projection weight_hr (LSTM)
//   kRowWise    it needs a whole row at once (a mean, a variance over the units): instead
//               of forward/backward per unit it has forward_row/backward_row, which run
//               against a row context (ln_lstm.h says what a row context offers)
//   kLayerNorm  it layer-normalises its pre-activations and has its own weights (w, see
//               ln_lstm.h); the op normalises the input side before the time loop
//   kParams     its constants, "name=default" separated by commas ("" for none); their
//               values reach the cell in k[] (finite, >= 0), in that order
//
//   forward<T, A>(const FwdRow<T>& r, int64_t j): one unit j of one row and step.
//   backward<T, A>(const BwdRow<T>& r, int64_t j, A dh, A& dc, A& direct):
//     dh: the total dLoss/dh_t of unit j; dc (kHasCell): in dLoss/dc_t from step t+1,
//     out the total dLoss/dc_t; direct: out the part of dLoss/dh_{t-1} that does not
//     pass through W_hh. Writes gx (and gh) at unit j of every gate block, clamped to
//     [-clip, clip] when clip > 0.
//   carry<T, A>(const BwdRow<T>& r, int64_t j, A dc) (kHasCell): dLoss/dc_{t-1} from
//     the total dLoss/dc_t.
//   output<T, A>(const BwdRow<T>& r, int64_t j) (kProjection): the cell's output m_t at
//     unit j, recomputed from what the forward kept (the projection's weight gradient
//     needs m_t of every step; with a projection the cell's forward writes m_t where
//     FwdRow::h points and reads no h_{t-1}, and its backward gets dLoss/dm_t as dh).
// A unit reads and writes only its own entries (j, k*H + j) of every buffer, so units
// may run in any order and in parallel. A row cell (kRowWise) has instead
//   forward_row<T>(const FwdRow<T>& r, X& x) and
//   backward_row<T>(const BwdRow<T>& r, const RowGrad<T, S>& d, X& x, S& sum_h, S& sum_c)
// for one row at one step, with a row context x (ln_lstm.h).

// What a cell sees of one batch row at one step of the forward. Every pointer is at the
// row's first entry.
template <typename T>
struct FwdRow {
  int64_t H;
  T* gates;          // [G*H] in: x_t W_ih^T + b_ih; out: what backward needs (the
                     // activated gates)
  const T* hg;       // [G*H] h_{t-1} W_hh^T (without b_hh)
  const T* b_hh;     // [G*H] or nullptr
  const T* h_prev;   // [H] h_{t-1}; may be the same buffer as h (entry j is read first)
  T* h;              // [H] out: h_t (m_t = o * tanh(c_t) for an LSTM with a projection)
  T* c;              // [H] (kHasCell) in: c_{t-1}, out: c_t, in place; else nullptr
  T* saved;          // [kSaved*H] out; nullptr when kSaved = 0
  const double* k;   // the cell's constants (kParams)
  const T* w = nullptr;  // the cell's own weights (kLayerNorm), else nullptr
};

// What a cell sees of one batch row at one step of BPTT.
template <typename T>
struct BwdRow {
  int64_t H;
  const T* gates;    // [G*H] the activated gates the forward left
  const T* saved;    // [kSaved*H] or nullptr
  const T* h;        // [H] h_t (nullptr with a projection)
  const T* h_prev;   // [H] h_{t-1} (nullptr with a projection)
  const T* c;        // [H] c_t (kHasCell), else nullptr
  const T* c_prev;   // [H] c_{t-1} (kHasCell), else nullptr
  T* gx;             // [G*H] out: dLoss/d(input-side pre-activations)
  T* gh;             // [G*H] out (kSplitGrad): dLoss/d(W_hh h_{t-1} + b_hh); else nullptr
  const double* k;   // the cell's constants
  double clip;       // > 0: clamp every pre-activation gradient to [-clip, clip]
  const T* w = nullptr;  // the cell's own weights (kLayerNorm), else nullptr
};

// Storage <-> arithmetic conversions. Cells read every stored value through load<A>()
// and write through store<T>(), so that a storage type without implicit conversions
// (the CUDA half types) only needs overloads of these two.
template <typename A, typename T>
PYRNN_HD A load(T v) {
  return static_cast<A>(v);
}
template <typename T, typename A>
PYRNN_HD T store(A v) {
  return static_cast<T>(v);
}

// Pointer access used by the cells: ld<A>(p) reads *p as arithmetic type A, st(p, v)
// writes v to *p. A SIMD type specialises Mem to read and write a run of lanes.
template <typename A, typename T>
struct Mem {
  PYRNN_HD static A ld(const T* p) { return load<A>(*p); }
  PYRNN_HD static void st(T* p, A v) { *p = store<T>(v); }
};
template <typename A, typename T>
PYRNN_HD A ld(const T* p) {
  return Mem<A, T>::ld(p);
}
template <typename T, typename A>
PYRNN_HD void st(T* p, A v) {
  Mem<A, T>::st(p, v);
}

// Branch-free select; SIMD types overload it with a lane mask.
template <typename A>
PYRNN_HD A where(bool c, A a, A b) {
  return c ? a : b;
}

// ---- float32 exp and tanh for the host, written once for scalars and SIMD lanes ----
// F is float or a SIMD float type with matching helpers fmin_, fmax_, abs_, copysign_,
// where and scale_of (below for float, in csrc/cpu/simd.h for the SIMD type).
// exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then the Taylor series of
// e^r to r^7 (truncation error < 1e-8 relative) and 2^n built from the exponent bits.
// n is rounded by adding 1.5 * 2^23, which leaves n in the low mantissa bits of the sum.
// fmin_(a, b) and fmax_(a, b) return b when either is NaN (as the x86 min and max
// instructions do), so every clamp below puts its bound first and lets NaN through.
constexpr float kRoundMagic = 12582912.f;  // 1.5 * 2^23

inline float fmin_(float a, float b) { return a < b ? a : b; }
inline float fmax_(float a, float b) { return a > b ? a : b; }
inline float abs_(float a) { return std::fabs(a); }
inline float copysign_(float mag, float sign) { return std::copysign(mag, sign); }
// 2^n for t = n + kRoundMagic (-126 <= n <= 127).
inline float scale_of(float t) {
  int32_t bits, magic;
  const float m = kRoundMagic;
  __builtin_memcpy(&bits, &t, sizeof bits);
  __builtin_memcpy(&magic, &m, sizeof magic);
  const int32_t e = (bits - magic + 127) << 23;
  float f;
  __builtin_memcpy(&f, &e, sizeof f);
  return f;
}

// Returns e^r - 1 for the reduced argument and sets t to n + kRoundMagic, where
// x = n ln2 + r.
template <typename F>
inline F exp_reduced(F x, F& t) {
  t = x * F(1.44269504088896341f) + F(kRoundMagic);
  const F nf = t - F(kRoundMagic);
  F r = x - nf * F(0.693145751953125f);
  r = r - nf * F(1.42860682030941723e-6f);
  F p = F(1.f / 5040.f);
  p = p * r + F(1.f / 720.f);
  p = p * r + F(1.f / 120.f);
  p = p * r + F(1.f / 24.f);
  p = p * r + F(1.f / 6.f);
  p = p * r + F(0.5f);
  return (p * r) * r + r;
}

// e^x as float32 rounds it: +Inf above ln(FLT_MAX) = 88.7228 (so that a sigmoid reaches 0
// there, as 1 / (1 + e^-x) does in float32), NaN for NaN. The result is built as
// 2 * 2^(n-1) e^r so that n = 128 (x up to 89) overflows only in the final doubling.
// Arguments below -86.5 give e^-86.5 (2.6e-38): the sigmoid, its only user, adds 1 to it.
template <typename F>
inline F poly_exp(F x) {
  F t;
  const F pm1 = exp_reduced(fmin_(F(89.f), fmax_(F(-86.5f), x)), t);
  const F half = scale_of(t - F(1.f));  // 2^(n-1)
  return (half * pm1 + half) * F(2.f);
}

// tanh |x|: below 0.7, |x| + |x|^3 P(x^2) with P of degree 5 (its coefficients fitted to
// tanh's relative error on [0, 0.7] by iteratively reweighted least squares, then rounded
// to float); from 0.7, 1 - 2 / (1 + e^(2|x|)), whose quotient is at most 0.39 there, so
// its rounding counts at most half in the result's ulp. Over every float from 1e-6 to
// 10.5 (below, the result is x): 0.75 ulp at most below 0.7, 1.07 above; 0.17 ulp on
// average, as torch's tanh (the one form -m / (m + 2) with m = e^(-2|x|) - 1 reaches 2.5
// ulp, 0.47 on average, which a recurrence amplifies). |x| is capped at 10, where tanh
// rounds to 1 in float32 (from 9.01 on; NaN passes the cap and both branches).
template <typename F>
inline F poly_tanh(F x) {
  const F ax = fmin_(F(10.f), abs_(x));
  F t;
  const F pm1 = exp_reduced(ax * F(2.f), t);
  const F e = scale_of(t);  // e^(2|x|) = e * (pm1 + 1)
  const F far = F(1.f) - F(2.f) / (e * pm1 + e + F(1.f));
  const F s = ax * ax;
  F p = F(0.0019286194583401084f);
  p = p * s + F(-0.00792780239135027f);
  p = p * s + F(0.02159322053194046f);
  p = p * s + F(-0.05392590910196304f);
  p = p * s + F(0.1333303153514862f);
  p = p * s + F(-0.33333325386047363f);
  const F near = ax + (ax * s) * p;
  return copysign_(where(ax < F(0.7f), near, far), x);
}

// The activations the cells call. double uses the C library; float uses the C
// library on the device and the functions above on the host (vectorisable, and the
// same result in a SIMD lane as in a scalar tail).
template <typename A>
PYRNN_HD A math_exp(A x) {
  return exp(x);
}
template <typename A>
PYRNN_HD A math_tanh(A x) {
  return tanh(x);
}
PYRNN_HD float math_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return poly_exp(x);
#endif
}
PYRNN_HD float math_tanh(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  return poly_tanh(x);
#endif
}

template <typename A>
PYRNN_HD A sigmoid(A x) {
  return A(1) / (A(1) + math_exp(-x));
}

template <typename A>
PYRNN_HD A clamp_abs(A v, A c) {
  // c <= 0 means "no clipping".
  return where(c > A(0), where(v > c, c, where(v < -c, -c, v)), v);
}

}  // namespace pyrnn

#if defined(__CUDACC__)
// CUDA half storage types (arithmetic in float). Torch builds with
// __CUDA_NO_HALF_CONVERSIONS__ and __CUDA_NO_BFLOAT16_CONVERSIONS__, so the conversions
// are spelled out here, as specialisations that Mem<float, T> picks up.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pyrnn {

template <>
PYRNN_HD float load<float, __half>(__half v) {
  return __half2float(v);
}
template <>
PYRNN_HD float load<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
PYRNN_HD __half store<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
PYRNN_HD __nv_bfloat16 store<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace pyrnn
#endif  // __CUDACC__
