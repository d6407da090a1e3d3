// The CPU loops for x86-64-v4 with AVX512-BF16: the avx512 copy, whose bfloat16 products
// (a layer with bfloat16 weights) run in vdpbf16ps.
#if defined(__x86_64__)
#define PYRNN_ISA pyrnn_isa_avx512_bf16
#define PYRNN_TARGET "arch=x86-64-v4,avx512bf16"
#define PYRNN_SIMD_LANES 16
#define PYRNN_BF16_DOT 1
#include "kernels_impl.h"
#endif
