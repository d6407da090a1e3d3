// The CPU time loops and products, compiled once per CPU capability: kernels_<isa>.cpp
// define PYRNN_ISA (the namespace of that copy, which must not collide with another) and,
// for an instruction set above the build's baseline, PYRNN_TARGET (a GCC target, e.g.
// "arch=x86-64-v3") and PYRNN_SIMD_LANES (its vector width in floats), then include this
// file. Everything this file defines or instantiates lives in namespace PYRNN_ISA (the
// name `pyrnn` is redefined to it below), so that no inline function or template compiled
// for one instruction set can be merged by the linker with another's; the standard and
// OpenMP headers come first, outside the target, and so are shared, compiled for the
// baseline. The copy ends with a table of its entry points, kernels_<isa>, which
// dispatch.cpp chooses from when the library loads. No torch header is included (except
// ATen for the fallback products of a build without BLAS), which keeps a copy's compile
// short.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>

#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#ifdef PYRNN_NO_BLAS
#include <ATen/ATen.h>
#endif

#include "loops.h"

#ifndef PYRNN_ISA
#error "define PYRNN_ISA (the namespace of this copy) before including kernels_impl.h"
#endif
#define PYRNN_CAT2(a, b) a##b
#define PYRNN_CAT(a, b) PYRNN_CAT2(a, b)
#define PYRNN_TABLE PYRNN_CAT(kernels_, PYRNN_ISA)

namespace PYRNN_ISA::cpu {
using ::pyrnn::cpu::KernelsOf;
using ::pyrnn::cpu::BackwardArgs;
using ::pyrnn::cpu::ForwardArgs;
using ::pyrnn::cpu::LayerArgs;
using ::pyrnn::cpu::bf16_products;
using ::pyrnn::cpu::matrix_gemm;
using ::pyrnn::cpu::MatrixGemm;
using ::pyrnn::cpu::second_level_cache;
using ::pyrnn::cpu::gemm_rows;
using ::pyrnn::cpu::cpu_is_intel;
using ::pyrnn::cpu::blas_products;
using ::pyrnn::cpu::projection_on_blas;
}

#ifdef PYRNN_TARGET
#define PYRNN_PRAGMA2(x) _Pragma(#x)
#define PYRNN_PRAGMA_TARGET(t) PYRNN_PRAGMA2(GCC target(t))
#pragma GCC push_options
PYRNN_PRAGMA_TARGET(PYRNN_TARGET)
#endif
#define pyrnn PYRNN_ISA

#include "../cells/registry.h"
#include "loops_impl.h"

#define PYRNN_FLAT __attribute__((flatten))

namespace pyrnn::cpu {

template <class Cell, typename T>
PYRNN_FLAT void forward_loop(const ForwardArgs<T>& p) {
  if constexpr (Cell::kRowWise) forward_rows<Cell, T>(p);
  else forward_steps<Cell, T>(p);
}
template <class Cell, typename T>
PYRNN_FLAT void backward_loop(const BackwardArgs<T>& p) {
  if constexpr (Cell::kRowWise) backward_rows<Cell, T>(p);
  else backward_steps<Cell, T>(p);
}
// The weight gradients on the BLAS in fixed tiles of the result, one sequential call
// each (see over_tiles in blas.h), so that no sum is split by the number of threads:
// C[M, N + N2] = A^T @ [Bm | B2] (A [K, M]) in tiles of `tile` rows of C by `cols`
// columns of Bm or of B2.
template <typename T>
void tiled_matmul_tn(const T* A, int64_t M, int64_t K, const T* Bm, int64_t N, const T* B2,
                     int64_t N2, T* C, int64_t tile, int64_t cols, double team_flops) {
  const int64_t ldc = N + N2;
  const int64_t rt = (M + tile - 1) / tile;
  const int64_t c1 = (N + cols - 1) / cols, c2 = N2 > 0 ? (N2 + cols - 1) / cols : 0;
  over_tiles(rt * (c1 + c2), 2.0 * M * ldc * K, [&](int64_t i) {
    const int64_t m0 = i / (c1 + c2) * tile, w = std::min(tile, M - m0);
    const int64_t j = i % (c1 + c2);
    const bool second = j >= c1;
    const int64_t n0 = (second ? j - c1 : j) * cols, width = std::min(cols, (second ? N2 : N) - n0);
    const T* b = (second ? B2 : Bm) + n0;
    mm_tn<T>(int(w), int(width), int(K), A + m0, int(M), b, second ? int(N2) : int(N),
             C + m0 * ldc + (second ? N : 0) + n0, int(ldc));
  }, team_flops);
}

// The rows of a float32 tile on the BLAS: an even number of tiles of `most` rows or
// fewer (whole multiples of 16), so that two threads get equal shares; fixed by M alone.
inline int64_t blas_tile(int64_t M, int64_t most) {
  int64_t n = (M + most - 1) / most;
  if (n > 1 && n % 2) ++n;
  return std::max<int64_t>(16, ((M + n - 1) / n + 15) / 16 * 16);
}

PYRNN_FLAT void matmul(const float* A, int64_t M, int64_t K, const float* Wm, int64_t N,
                       bool transposed, float* C, int64_t ldc, const float* bias) {
  if (M == 0 || N == 0) return;
#ifndef PYRNN_NO_BLAS
  if (projection_on_blas(M, N, K))
    return packed_matmul(A, M, K, Wm, N, transposed, C, ldc, bias, blas_tile(M, 512),
                         double(PackedGemm::kTeamFlops));
#endif
  const PackedGemm gemm(M, N, K, Wm, transposed);
  gemm.run(A, M, K, C, ldc, false, bias);
}

PYRNN_FLAT void matmul_tn(const float* A, int64_t M, int64_t K, const float* Bm, int64_t N,
                          const float* B2, int64_t N2, float* C) {
  if (M == 0 || N + N2 == 0) return;
  if (!bf16_products() && blas_products(M, N + N2, K))
    return tiled_matmul_tn(A, M, K, Bm, N, B2, N2, C, blas_tile(M, 256), 512,
                           double(PackedGemm::kTeamFlops));
  const PackedGemm gemm(M, N + N2, K, Bm, false, 0, bf16_products(), B2, N);
  gemm.run_strided(A, M, 1, M, C, N + N2, false);
}

// float64 products: fixed tiles of the result, one sequential BLAS call each (see
// over_tiles in blas.h), so that no sum is split by the number of threads. The weight
// gradients: tiles of 256 rows of C (columns of A), each right-hand matrix whole.
void matmul_tn(const double* A, int64_t M, int64_t K, const double* Bm, int64_t N,
               const double* B2, int64_t N2, double* C) {
  tiled_matmul_tn(A, M, K, Bm, N, B2, N2, C, 256, std::max<int64_t>({N, N2, 1}), 1 << 20);
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
// The order of every sum is fixed by M alone. float32 accumulates in double: a sum of
// M = T*B rows one after the other in float32 gathers up to M half-ulp roundings (the
// bias gradients of an RNN-tanh layer with H = 1 and M = 30 came out 22 ulp off, where
// torch's cascaded sum was 5 ulp off), in double it is rounded once.
template <typename T>
static void column_sums_impl(const T* A, int64_t M, int64_t N, T* out) {
  using Acc = std::conditional_t<std::is_same_v<T, float>, double, T>;
  constexpr int64_t kRows = 256, kCols = 256;
  const int64_t chunks = (N + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (M * N >= (1 << 16) && chunks > 1)
  for (int64_t q = 0; q < chunks; ++q) {
    const int64_t c0 = q * kCols, w = std::min(kCols, N - c0);
    Acc total[kCols], part[kCols];
    for (int64_t j = 0; j < w; ++j) total[j] = Acc(0);
    for (int64_t r0 = 0; r0 < M; r0 += kRows) {
      const int64_t r1 = std::min(M, r0 + kRows);
      for (int64_t j = 0; j < w; ++j) part[j] = Acc(0);
      for (int64_t r = r0; r < r1; ++r) {
        const T* row = A + r * N + c0;
        for (int64_t j = 0; j < w; ++j) part[j] += Acc(row[j]);
      }
      for (int64_t j = 0; j < w; ++j) total[j] += part[j];
    }
    for (int64_t j = 0; j < w; ++j) out[c0 + j] = T(total[j]);
  }
}

PYRNN_FLAT void column_sums(const float* A, int64_t M, int64_t N, float* out) {
  column_sums_impl(A, M, N, out);
}
void column_sums(const double* A, int64_t M, int64_t N, double* out) {
  column_sums_impl(A, M, N, out);
}

// The loops of every cell of the registry, in its order.
template <typename T, class... Cells>
struct CellLoops {
  static constexpr void (*forward[])(const ForwardArgs<T>&) = {&forward_loop<Cells, T>...};
  static constexpr void (*backward[])(const BackwardArgs<T>&) = {&backward_loop<Cells, T>...};
};

template <typename T, class... Cells>
constexpr KernelsOf<T> table(CellList<Cells...>) {
  return {CellLoops<T, Cells...>::forward, CellLoops<T, Cells...>::backward,
          static_cast<void (*)(const T*, int64_t, int64_t, const T*, int64_t, bool, T*, int64_t,
                               const T*)>(&matmul),
          static_cast<void (*)(const T*, int64_t, int64_t, const T*, int64_t, const T*, int64_t,
                               T*)>(&matmul_tn),
          static_cast<void (*)(const T*, int64_t, int64_t, T*)>(&column_sums)};
}

}  // namespace pyrnn::cpu

#undef pyrnn
#ifdef PYRNN_TARGET
#pragma GCC pop_options
#endif

namespace pyrnn::cpu {
extern const Kernels PYRNN_TABLE;
// float64 runs its products in the BLAS and its pointwise math in scalars, as fast from
// the baseline copy as from any other (measured): only the baseline copy has float64 loops.
#ifdef PYRNN_TARGET
const Kernels PYRNN_TABLE = {PYRNN_ISA::cpu::table<float>(PYRNN_ISA::AllCells{}), {}};
#else
const Kernels PYRNN_TABLE = {PYRNN_ISA::cpu::table<float>(PYRNN_ISA::AllCells{}), PYRNN_ISA::cpu::table<double>(PYRNN_ISA::AllCells{})};
#endif
}  // namespace pyrnn::cpu
