// The CPU loops for x86-64-v4 (AVX-512 F, BW, DQ, VL): 16-lane vectors.
#if defined(__x86_64__)
#define PYRNN_ISA pyrnn_isa_avx512
#define PYRNN_TARGET "arch=x86-64-v4"
#define PYRNN_SIMD_LANES 16
#include "kernels_impl.h"
#endif
