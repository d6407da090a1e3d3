// The CPU loops for x86-64-v3 (AVX2, FMA): 8-lane vectors.
#if defined(__x86_64__)
#define PYRNN_ISA pyrnn_isa_avx2
#define PYRNN_TARGET "arch=x86-64-v3"
#define PYRNN_SIMD_LANES 8
#include "kernels_impl.h"
#endif
