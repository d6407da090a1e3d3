// A float32 SIMD type for the CPU time loops, built on GCC/Clang vector extensions
// (the width of the target's registers). It supplies exactly what the cells use: arithmetic, comparisons,
// where(), ld/st (through Mem) and the helpers of poly_exp and poly_tanh.
#pragma once
#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors passed by value, internal only
#endif

#include "../cells/common.h"

namespace pyrnn {

// The width of the target's vector registers: 16 lanes with AVX-512, 8 with AVX, else 4
// (SSE). A wider vector type would be split by the compiler through the stack.
// A copy compiled under a GCC target pragma (kernels_impl.h) states its width in
// PYRNN_SIMD_LANES, since the pragma does not define the __AVX*__ macros.
#if !defined(PYRNN_SIMD_LANES)
#if defined(__AVX512F__)
#define PYRNN_SIMD_LANES 16
#elif defined(__AVX__)
#define PYRNN_SIMD_LANES 8
#else
#define PYRNN_SIMD_LANES 4
#endif
#endif
constexpr int kSimdLanes = PYRNN_SIMD_LANES;
typedef float v8f __attribute__((vector_size(4 * kSimdLanes)));
typedef int32_t v8i __attribute__((vector_size(4 * kSimdLanes)));

struct MaskF {
  v8i m;
};

struct VecF {
  static constexpr int kLanes = kSimdLanes;
  v8f v;
  VecF() = default;
  VecF(float s) : v(s - v8f{}) {}  // broadcast (implicit, like a scalar literal); keeps -0
  VecF(v8f x) : v(x) {}
};

inline VecF operator+(VecF a, VecF b) { return a.v + b.v; }
inline VecF operator-(VecF a, VecF b) { return a.v - b.v; }
inline VecF operator*(VecF a, VecF b) { return a.v * b.v; }
inline VecF operator/(VecF a, VecF b) { return a.v / b.v; }
inline VecF operator-(VecF a) { return -a.v; }
inline MaskF operator<(VecF a, VecF b) { return {a.v < b.v}; }
inline MaskF operator>(VecF a, VecF b) { return {a.v > b.v}; }
inline MaskF operator<=(VecF a, VecF b) { return {a.v <= b.v}; }
inline VecF where(MaskF c, VecF a, VecF b) { return c.m ? a.v : b.v; }

// fmin_(a, b), fmax_(a, b): b when either is NaN, like the scalar ones in common.h.
inline VecF fmin_(VecF a, VecF b) { return where(a < b, a, b); }  // vminps
inline VecF fmax_(VecF a, VecF b) { return where(a > b, a, b); }  // vmaxps
inline VecF abs_(VecF a) { return (v8f)((v8i)a.v & 0x7fffffff); }
inline VecF copysign_(VecF mag, VecF sign) {
  return (v8f)(((v8i)mag.v & 0x7fffffff) | ((v8i)sign.v & int32_t(0x80000000u)));
}
inline VecF scale_of(VecF t) {
  const v8i magic = (v8i)(v8f{} + kRoundMagic);
  return (v8f)(((v8i)t.v - magic + 127) << 23);
}

inline VecF math_exp(VecF x) { return poly_exp(x); }
inline VecF math_tanh(VecF x) { return poly_tanh(x); }

// The lanes of a widened to double, and their sum in lane order.
typedef double v8d __attribute__((vector_size(8 * kSimdLanes)));
inline v8d widen(VecF a) { return __builtin_convertvector(a.v, v8d); }
inline double hsum(v8d a) {
  double s = 0.0;
  for (int k = 0; k < kSimdLanes; ++k) s += a[k];
  return s;
}

inline float hsum(VecF a) {
  float s = 0.f;
  for (int k = 0; k < kSimdLanes; ++k) s += a.v[k];
  return s;
}

template <>
struct Mem<VecF, float> {
  static VecF ld(const float* p) {
    v8f x;
    __builtin_memcpy(&x, p, sizeof x);
    return x;
  }
  static void st(float* p, VecF a) { __builtin_memcpy(p, &a.v, sizeof a.v); }
};

}  // namespace pyrnn
