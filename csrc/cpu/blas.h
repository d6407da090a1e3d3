// Row-major matrix products on raw pointers for the CPU loops: float64's, and the float32
// products outside the time loops where the BLAS is chosen for them (blas_products(),
// loops.h; float32 otherwise has its own kernel, gemm.h). They call the Fortran BLAS that
// ships inside libtorch (dgemm_, sgemm_), so no dispatcher call, no allocation and no tensor
// is made inside a time loop. A build against a libtorch without those symbols defines
// PYRNN_NO_BLAS and falls back to at::mm_out on borrowed tensors (same results, a little
// dispatch overhead; float32 then never takes the BLAS).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#include "gemm.h"

#ifdef PYRNN_NO_BLAS
#include <ATen/ATen.h>
#else
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b,
            const int* ldb, const float* beta, float* c, const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
}
#endif

// MKL's per-thread thread count (in the MKL that libtorch links, absent elsewhere).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace pyrnn::cpu {

// While alive, the BLAS calls of this thread run on this thread alone: a threaded BLAS
// splits a product by the number of threads, and may split its sums (a product with a
// long inner dimension), which makes the result depend on the thread count.
class SequentialBlas {
 public:
  SequentialBlas() : prev_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev_);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int prev_;
};

// Runs f(i) for the tiles i in [0, n) of a product whose tiles are fixed by its shape
// alone, each with a sequential BLAS, on the team's threads when the product has at
// least team_flops flops. Every entry of the result is then computed by one call whose
// operands do not depend on the number of threads, and so are its bits, whichever thread
// makes it: the threads take the next tile as they come free (the LSTM at T = 100, B = 32,
// H = 512 infers in 0.96 - 1.00 of the time against a static split, median 0.98, in 5
// alternating runs; the GRU 0.99, training 1.00; Intel Xeon with AMX, 2 threads).
template <typename F>
inline void over_tiles(int64_t n, double flops, F&& f, double team_flops = double(1 << 20)) {
#pragma omp parallel if (n > 1 && flops >= team_flops)
  {
    SequentialBlas sequential;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) f(i);
  }
}

#ifndef PYRNN_NO_BLAS
// sgemm_ or dgemm_ by T, with leading dimensions of at least 1 (as the BLAS requires).
template <typename T>
inline void fgemm(char ta, char tb, int m, int n, int k, T alpha, const T* a, int lda,
                  const T* b, int ldb, T beta, T* c, int ldc) {
  lda = lda < 1 ? 1 : lda; ldb = ldb < 1 ? 1 : ldb; ldc = ldc < 1 ? 1 : ldc;
  if constexpr (std::is_same_v<T, float>)
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  else
    dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
#endif

#ifndef PYRNN_NO_BLAS
// C[M, N] = A[M, K] @ op(Wm) (+ bias[N] in every row) on MKL's packed product: op(Wm)
// (Wm^T for Wm [N, K] if transposed, else Wm [K, N]) packed once, a copy, then tiles of
// `tile` rows of A and C, one sequential call each (over_tiles): the same bits for any
// number of threads. Needs packed_blas().
inline void packed_matmul(const float* A, int64_t M, int64_t K, const float* Wm, int64_t N,
                          bool transposed, float* C, int64_t ldc, const float* bias,
                          int64_t tile, double team_flops) {
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kB = 162;
  const int t = int(std::min(tile, M)), n = int(N), k = int(K);
  const size_t bytes = cblas_sgemm_pack_get_size(kB, t, n, k);
  PackBuffers::Ptr buf = PackBuffers::take(int64_t(bytes / sizeof(vgf)) + 1);
  float* packed = reinterpret_cast<float*>(buf.get());
  cblas_sgemm_pack(kRowMajor, kB, transposed ? kTrans : kNoTrans, t, n, k, 1.0f, Wm,
                   transposed ? k : n, packed);
  over_tiles((M + t - 1) / t, 2.0 * M * N * K, [&](int64_t i) {
    const int64_t m0 = i * t, rows = std::min<int64_t>(t, M - m0);
    float* c = C + m0 * ldc;
    if (bias)
      for (int64_t r = 0; r < rows; ++r) std::memcpy(c + r * ldc, bias, sizeof(float) * N);
    cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, int(rows), n, k, A + m0 * K, k, packed,
                        n, bias ? 1.0f : 0.0f, c, int(ldc));
  }, team_flops);
}
#endif

// C[M, N] (+)= A[M, K] @ B[N, K]^T    (row-major, leading dimensions lda, ldb, ldc)
template <typename T>
void mm_nt(int M, int N, int K, const T* A, int lda, const T* B, int ldb, T* C, int ldc,
           bool accumulate) {
  if (M == 0 || N == 0) return;
#ifdef PYRNN_NO_BLAS
  auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opt);
  auto b = at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opt);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  if (accumulate) c.addmm_(a, b.t()); else at::mm_out(c, a, b.t());
#else
  // Column-major view: C^T[N, M] = B[N, K] * A^T[K, M].
  fgemm('T', 'N', N, M, K, T(1), B, ldb, A, lda, accumulate ? T(1) : T(0), C, ldc);
#endif
}

// C[M, N] (+)= A[M, K] @ B[K, N]
template <typename T>
void mm_nn(int M, int N, int K, const T* A, int lda, const T* B, int ldb, T* C, int ldc,
           bool accumulate) {
  if (M == 0 || N == 0) return;
#ifdef PYRNN_NO_BLAS
  auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opt);
  auto b = at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opt);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  if (accumulate) c.addmm_(a, b); else at::mm_out(c, a, b);
#else
  fgemm('N', 'N', N, M, K, T(1), B, ldb, A, lda, accumulate ? T(1) : T(0), C, ldc);
#endif
}

// C[M, N] = A[K, M]^T @ B[K, N]; A, B and C have leading dimensions lda (>= M), ldb
// (>= N) and ldc (>= N)
template <typename T>
void mm_tn(int M, int N, int K, const T* A, int lda, const T* B, int ldb, T* C, int ldc) {
  if (M == 0 || N == 0) return;
#ifdef PYRNN_NO_BLAS
  auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto a = at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opt);
  auto b = at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opt);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  at::mm_out(c, a.t(), b);
#else
  // column-major view: C^T[N, M] = B^T[N, K] @ A[K, M]
  fgemm('N', 'T', N, M, K, T(1), B, ldb, A, lda, T(0), C, ldc);
#endif
}

// The recurrent product of a time loop, C[M, N] (+)= A[M, K] @ op(Wm) with the same Wm at
// every step (op(Wm) = Wm^T for Wm [N, K] if transposed, else Wm for Wm [K, N]), split
// into panels of columns that never straddle two gate blocks of width `block`, so that a
// thread of a team can compute the columns of its own hidden units: float32 uses the packed kernel (panels of 32 columns), float64 the BLAS with one
// panel per gate block (so the float64 loops run on one thread).
template <typename T>
class StepGemm;

template <>
class StepGemm<float> {
 public:
  StepGemm(int64_t M, int64_t N, int64_t K, const float* Wm, bool transposed, int64_t block)
      : gemm_(M, N, K, Wm, transposed, block) {}
  int64_t panels_per_block() const { return gemm_.panels_per_block(); }
  int64_t panel_width() const { return PackedGemm::kNR; }
  // every: the panels [p0, p1) of each gate block (p1 <= panels_per_block()).
  void run_panels(const float* A, int64_t M, int64_t lda, float* C, int64_t ldc, bool accumulate,
                  int64_t p0, int64_t p1, bool every = false) const {
    gemm_.run_panels(A, M, lda, C, ldc, accumulate, p0, p1, nullptr, every);
  }
  // All columns, split across threads when large enough.
  void run(const float* A, int64_t M, int64_t lda, float* C, int64_t ldc, bool accumulate) const {
    gemm_.run(A, M, lda, C, ldc, accumulate);
  }
  bool on_units() const { return gemm_.on_units(); }

 private:
  PackedGemm gemm_;
};

template <>
class StepGemm<double> {
 public:
  StepGemm(int64_t M, int64_t N, int64_t K, const double* Wm, bool transposed, int64_t block)
      : N_(N), K_(K), block_(block), Wm_(Wm), transposed_(transposed) {
    (void)M;
  }
  int64_t panels_per_block() const { return 1; }
  int64_t panel_width() const { return block_; }
  bool on_units() const { return false; }
  void run(const double* A, int64_t M, int64_t lda, double* C, int64_t ldc,
           bool accumulate) const {
    run_panels(A, M, lda, C, ldc, accumulate, 0, N_ / block_);
  }
  // Column tiles of kTile within each gate block, one sequential BLAS call each (see
  // over_tiles): the same bits for any number of threads.
  void run_panels(const double* A, int64_t M, int64_t lda, double* C, int64_t ldc,
                  bool accumulate, int64_t p0, int64_t p1, bool every = false) const {
    if (every) {  // one panel per gate block: [p0, p1) of each
      for (int64_t g = 0; g < N_ / block_; ++g)
        run_panels(A, M, lda, C, ldc, accumulate, g + p0, g + p1);
      return;
    }
    constexpr int64_t kTile = 128;
    const int64_t per = (block_ + kTile - 1) / kTile;
    over_tiles((p1 - p0) * per, 2.0 * M * (p1 - p0) * block_ * K_, [&](int64_t i) {
      const int64_t n0 = (p0 + i / per) * block_ + i % per * kTile;
      const int64_t w = std::min(kTile, block_ - i % per * kTile);
      if (transposed_)
        mm_nt<double>(int(M), int(w), int(K_), A, int(lda), Wm_ + n0 * K_, int(K_), C + n0,
                      int(ldc), accumulate);
      else
        mm_nn<double>(int(M), int(w), int(K_), A, int(lda), Wm_ + n0, int(N_), C + n0,
                      int(ldc), accumulate);
    });
  }

 private:
  int64_t N_, K_, block_;
  const double* Wm_;
  bool transposed_;
};

}  // namespace pyrnn::cpu
