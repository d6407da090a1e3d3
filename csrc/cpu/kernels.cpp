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

// float64 products: fixed tiles of the result, one sequential BLAS call each (see
// over_tiles in blas.h), so that no sum is split by the number of threads.
void matmul_tn(const double* A, int64_t M, int64_t K, const double* Bm, int64_t N, double* C) {
  constexpr int64_t kTile = 256;  // rows of C (columns of A) per call
  over_tiles((M + kTile - 1) / kTile, 2.0 * M * N * K, [&](int64_t i) {
    const int64_t m0 = i * kTile, w = std::min(kTile, M - m0);
    mm_tn<double>(int(w), int(N), int(K), A + m0, int(M), Bm, C + m0 * N, int(N));
  });
}

void matmul(const double* A, int64_t M, int64_t K, const double* Wm, int64_t N,
            bool transposed, double* C, int64_t ldc, const double* bias) {
  constexpr int64_t kTile = 256;  // rows of A and C per call
  over_tiles((M + kTile - 1) / kTile, 2.0 * M * N * K, [&](int64_t i) {
    const int64_t m0 = i * kTile, rows = std::min(kTile, M - m0);
    const double* a = A + m0 * K;
    double* c = C + m0 * ldc;
    if (bias)
      for (int64_t r = 0; r < rows; ++r) std::memcpy(c + r * ldc, bias, sizeof(double) * N);
    if (transposed)
      mm_nt<double>(int(rows), int(N), int(K), a, int(K), Wm, int(K), c, int(ldc), bias != nullptr);
    else
      mm_nn<double>(int(rows), int(N), int(K), a, int(K), Wm, int(N), c, int(ldc), bias != nullptr);
  });
}

// out[N] = sum over the M rows of A[M, N]: each column summed in blocks of kRows rows, one
// row after the other, and the blocks' sums added in order; threads take whole columns.
// The order of every sum is fixed by M alone.
template <typename T>
static void column_sums_impl(const T* A, int64_t M, int64_t N, T* out) {
  constexpr int64_t kRows = 256, kCols = 256;
  const int64_t chunks = (N + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (M * N >= (1 << 16) && chunks > 1)
  for (int64_t q = 0; q < chunks; ++q) {
    const int64_t c0 = q * kCols, w = std::min(kCols, N - c0);
    T total[kCols], part[kCols];
    for (int64_t j = 0; j < w; ++j) total[j] = T(0);
    for (int64_t r0 = 0; r0 < M; r0 += kRows) {
      const int64_t r1 = std::min(M, r0 + kRows);
      for (int64_t j = 0; j < w; ++j) part[j] = T(0);
      for (int64_t r = r0; r < r1; ++r) {
        const T* row = A + r * N + c0;
        for (int64_t j = 0; j < w; ++j) part[j] += row[j];
      }
      for (int64_t j = 0; j < w; ++j) total[j] += part[j];
    }
    std::memcpy(out + c0, total, sizeof(T) * w);
  }
}

PYRNN_FLAT void column_sums(const float* A, int64_t M, int64_t N, float* out) {
  column_sums_impl(A, M, N, out);
}
void column_sums(const double* A, int64_t M, int64_t N, double* out) {
  column_sums_impl(A, M, N, out);
}

}  // namespace pyrnn::cpu
