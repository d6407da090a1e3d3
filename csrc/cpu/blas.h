// Row-major matrix products on raw pointers for the CPU time loops.
// They call the Fortran BLAS that ships inside libtorch (sgemm_/dgemm_), so no
// dispatcher call, no allocation and no tensor is made inside a time loop. A build
// against a libtorch without those symbols defines PYRNN_NO_BLAS and falls back to
// at::mm_out on borrowed tensors (same results, a little dispatch overhead).
#pragma once
#include <cstdint>
#include <memory>

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

namespace pyrnn::cpu {

#ifndef PYRNN_NO_BLAS
inline void fgemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                  const float* b, int ldb, float beta, float* c, int ldc) {
  lda = lda < 1 ? 1 : lda; ldb = ldb < 1 ? 1 : ldb; ldc = ldc < 1 ? 1 : ldc;
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void fgemm(char ta, char tb, int m, int n, int k, double alpha, const double* a,
                  int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  lda = lda < 1 ? 1 : lda; ldb = ldb < 1 ? 1 : ldb; ldc = ldc < 1 ? 1 : ldc;
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
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

// C[M, N] = A[K, M]^T @ B[K, N]
template <typename T>
void mm_tn(int M, int N, int K, const T* A, const T* B, T* C) {
  if (M == 0 || N == 0) return;
#ifdef PYRNN_NO_BLAS
  auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto a = at::from_blob(const_cast<T*>(A), {K, M}, opt);
  auto b = at::from_blob(const_cast<T*>(B), {K, N}, opt);
  auto c = at::from_blob(C, {M, N}, opt);
  at::mm_out(c, a.t(), b);
#else
  // column-major view: C^T[N, M] = B^T[N, K] @ A[K, M]
  fgemm('N', 'T', N, M, K, T(1), B, N, A, M, T(0), C, N);
#endif
}

// The recurrent product of a time loop: C[M, N] (+)= A[M, K] @ op(Wm), with the same
// right-hand matrix Wm at every step. op(Wm) = Wm^T for Wm [N, K] (transposed = true) or
// Wm for Wm [K, N]. float32 packs Wm once (gemm.h); float64 calls the BLAS per step.
template <typename T>
class RecurrentGemm {
 public:
  RecurrentGemm(int M, int N, int K, const T* Wm, bool transposed)
      : M_(M), N_(N), K_(K), Wm_(Wm), transposed_(transposed) {}
  // rows: how many leading rows of A and C take part (M by default).
  void run(const T* A, T* C, bool accumulate, int rows = -1) const {
    const int M = rows < 0 ? M_ : rows;
    if (transposed_) mm_nt<T>(M, N_, K_, A, K_, Wm_, K_, C, N_, accumulate);
    else mm_nn<T>(M, N_, K_, A, K_, Wm_, N_, C, N_, accumulate);
  }

 private:
  int M_, N_, K_;
  const T* Wm_;
  bool transposed_;
};

template <>
class RecurrentGemm<float> {  // float32: the packed register-blocked kernel of gemm.h
 public:
  RecurrentGemm(int M, int N, int K, const float* Wm, bool transposed)
      : gemm_(M, N, K, Wm, transposed) {}
  void run(const float* A, float* C, bool accumulate, int rows = -1) const {
    gemm_.run(A, rows < 0 ? gemm_.rows() : rows, gemm_.depth(), C, gemm_.width(), accumulate);
  }

 private:
  PackedGemm gemm_;
};

}  // namespace pyrnn::cpu
