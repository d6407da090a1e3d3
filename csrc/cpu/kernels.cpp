// The CPU time loops, compiled once per cell and dtype. This translation unit includes
// no torch header, so it compiles in seconds. On x86-64 with GCC each loop is also
// cloned for x86-64-v4 (AVX-512) and x86-64-v3 (AVX2, FMA), picked at load time by the CPU it runs on.
#include "../cells/gru.h"
#include "../cells/lstm.h"
#include "../cells/rnn.h"
#include "loops_impl.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYRNN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define PYRNN_CLONES __attribute__((flatten))
#endif

namespace pyrnn::cpu {

#define PYRNN_DEFINE_LOOPS(CELL, T)                                     \
  template <>                                                           \
  PYRNN_CLONES void forward_loop<CELL, T, T>(const LoopArgs<T>& p) {    \
    forward_steps<CELL, T, T>(p);                                       \
  }                                                                     \
  template <>                                                           \
  PYRNN_CLONES void backward_loop<CELL, T, T>(const LoopArgs<T>& p) {   \
    backward_steps<CELL, T, T>(p);                                      \
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

PYRNN_CLONES void matmul(const float* A, int64_t M, int64_t K, const float* Wm, int64_t N,
                         bool transposed, float* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  const PackedGemm gemm(M, N, K, Wm, transposed);
  gemm.run(A, M, K, C, ldc, accumulate);
}

void matmul(const double* A, int64_t M, int64_t K, const double* Wm, int64_t N,
            bool transposed, double* C, int64_t ldc, bool accumulate) {
  if (transposed) mm_nt<double>(int(M), int(N), int(K), A, int(K), Wm, int(K), C, int(ldc), accumulate);
  else mm_nn<double>(int(M), int(N), int(K), A, int(K), Wm, int(N), C, int(ldc), accumulate);
}

}  // namespace pyrnn::cpu
