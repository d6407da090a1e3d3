// The CPU time loops, compiled once per cell and dtype. This translation unit includes
// no torch header, so it compiles in seconds. setup.py compiles it for the building
// machine's CPU (-march=native unless PYRNN_MARCH says otherwise), so that the SIMD
// types of simd.h and gemm.h map onto its widest vectors, threads included.
#include "../cells/gru.h"
#include "../cells/lstm.h"
#include "../cells/rnn.h"
#include "loops_impl.h"

#define PYRNN_FLAT __attribute__((flatten))

namespace pyrnn::cpu {

#define PYRNN_DEFINE_LOOPS(CELL, T)                                     \
  template <>                                                           \
  PYRNN_FLAT void forward_loop<CELL, T, T>(const LoopArgs<T>& p) {    \
    forward_steps<CELL, T>(p);                                       \
  }                                                                     \
  template <>                                                           \
  PYRNN_FLAT void backward_loop<CELL, T, T>(const LoopArgs<T>& p) {   \
    backward_steps<CELL, T>(p);                                      \
  }

using RnnTanh = RnnCell<Act::kTanh>;
using RnnRelu = RnnCell<Act::kRelu>;

PYRNN_DEFINE_LOOPS(RnnTanh, float)
PYRNN_DEFINE_LOOPS(RnnTanh, double)
PYRNN_DEFINE_LOOPS(RnnRelu, float)
PYRNN_DEFINE_LOOPS(RnnRelu, double)
PYRNN_DEFINE_LOOPS(LstmCell, float)
PYRNN_DEFINE_LOOPS(LstmCell, double)
PYRNN_DEFINE_LOOPS(GruCell, float)
PYRNN_DEFINE_LOOPS(GruCell, double)

template <>
PYRNN_FLAT void forward_proj_loop<float>(const LoopArgs<float>& p) { forward_proj_steps(p); }
template <>
PYRNN_FLAT void forward_proj_loop<double>(const LoopArgs<double>& p) { forward_proj_steps(p); }
template <>
PYRNN_FLAT void backward_proj_loop<float>(const LoopArgs<float>& p) { backward_proj_steps(p); }
template <>
PYRNN_FLAT void backward_proj_loop<double>(const LoopArgs<double>& p) { backward_proj_steps(p); }

PYRNN_FLAT void matmul(const float* A, int64_t M, int64_t K, const float* Wm, int64_t N,
                       bool transposed, float* C, int64_t ldc, const float* bias) {
  if (M == 0 || N == 0) return;
  const PackedGemm gemm(M, N, K, Wm, transposed);
  gemm.run(A, M, K, C, ldc, false, bias);
}

PYRNN_FLAT void matmul_tn(const float* A, int64_t M, int64_t K, const float* Bm, int64_t N,
                          float* C) {
  if (M == 0 || N == 0) return;
  const PackedGemm gemm(M, N, K, Bm, false);
  gemm.run_strided(A, M, 1, M, C, N, false);
}

void matmul_tn(const double* A, int64_t M, int64_t K, const double* Bm, int64_t N, double* C) {
  mm_tn<double>(int(M), int(N), int(K), A, Bm, C);
}

void matmul(const double* A, int64_t M, int64_t K, const double* Wm, int64_t N,
            bool transposed, double* C, int64_t ldc, const double* bias) {
  if (bias)
    for (int64_t i = 0; i < M; ++i) std::memcpy(C + i * ldc, bias, sizeof(double) * N);
  if (transposed)
    mm_nt<double>(int(M), int(N), int(K), A, int(K), Wm, int(K), C, int(ldc), bias != nullptr);
  else
    mm_nn<double>(int(M), int(N), int(K), A, int(K), Wm, int(N), C, int(ldc), bias != nullptr);
}

}  // namespace pyrnn::cpu
