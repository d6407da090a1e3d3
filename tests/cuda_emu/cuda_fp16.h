// Stand-in for cuda_fp16.h as torch's build sees it (-D__CUDA_NO_HALF_OPERATORS__,
// -D__CUDA_NO_HALF_CONVERSIONS__, -D__CUDA_NO_HALF2_OPERATORS__): __half is 16 bits of
// storage with no arithmetic and no implicit conversions; only the explicit conversion
// functions exist, rounding to nearest even as the device does.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t __x;
};
static_assert(sizeof(__half) == 2, "__half is 16 bits");

inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // IEEE binary16, round to nearest even
  __half r;
  std::memcpy(&r.__x, &h, 2);
  return r;
}
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.__x, 2);
  return static_cast<float>(v);
}
