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
enum class Act { kTanh = 0, kRelu = 1 };

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
// F is float or a SIMD float type with matching helpers fmin_, fmax_, abs_, copysign_
// and scale_of (below for float, in csrc/cpu/simd.h for the SIMD type).
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

// tanh |x| = -m / (m + 2) with m = e^(-2|x|) - 1, computed as 2^n (p + 1) - 1 from the
// reduced exp, so that small |x| keeps its relative precision (about 2e-7 overall);
// |x| is capped at 9, where tanh rounds to 1 in float32 (NaN passes the cap).
template <typename F>
inline F poly_tanh(F x) {
  F t;
  const F pm1 = exp_reduced(F(-2.f) * fmin_(F(9.f), abs_(x)), t);
  const F scale = scale_of(t);
  const F m = scale * pm1 + (scale - F(1.f));
  return copysign_(-m / (m + F(2.f)), x);
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
