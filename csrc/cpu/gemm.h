// A small float32 GEMM for the recurrent product of the time loops:
//   C[M, N] (+)= A[M, K] @ op(Wm),   op(Wm) = Wm^T for Wm [N, K], or Wm for Wm [K, N].
// The same right-hand matrix serves every time step, so it is packed once per call into
// panels of kNR columns ([N / kNR][K][kNR], zero-padded), and each step runs a register-
// blocked kernel (kMR rows x kNR columns of C in registers) over the panels. M is the
// batch (small), which is the shape a general-purpose BLAS handles worst.
// Torch-free. The vectors have the width of the target's registers (kSimdLanes of
// simd.h), so that the kMR x kV accumulators, the kV vectors of a panel row and a
// broadcast stay in registers: a vector type wider than the registers is split by the
// compiler into halves that live on the stack.
#pragma once
#include <cstdint>
#include <cstring>
#include <memory>

#include <omp.h>

#include "simd.h"

namespace pyrnn::cpu {

typedef float vgf __attribute__((vector_size(4 * kSimdLanes)));

// The packed weights' memory, kept by each thread for its next calls. A fresh buffer of
// megabytes comes from the system as new pages, zeroed and faulted in on first touch, at
// about the cost of the packing itself; the loops pack their weights on every call, so
// they reuse the buffers of the last ones (up to kKeep of them and kKeepBytes in all).
class PackBuffers {
  struct List;

 public:
  struct Release {
    List* owner;
    void operator()(vgf* p) const { if (p) owner->give_back(p); }
  };
  using Ptr = std::unique_ptr<vgf[], Release>;

  // A buffer of at least n vectors (contents undefined), to be released on this thread.
  static Ptr take(int64_t n) {
    List& l = list();
    return Ptr(l.take(n), Release{&l});
  }

 private:
  static constexpr int kKeep = 8;
  static constexpr int64_t kKeepBytes = int64_t(64) << 20;
  struct List {
    vgf* buf[kKeep] = {};
    int64_t size[kKeep] = {};
    bool busy[kKeep] = {};
    int count = 0;
    ~List() {
      for (int i = 0; i < count; ++i) delete[] buf[i];
    }
    vgf* take(int64_t n) {
      int best = -1;  // the smallest free buffer that fits
      for (int i = 0; i < count; ++i)
        if (!busy[i] && size[i] >= n && (best < 0 || size[i] < size[best])) best = i;
      if (best >= 0) {
        busy[best] = true;
        return buf[best];
      }
      vgf* p = new vgf[n];
      int64_t bytes = n * int64_t(sizeof(vgf));
      for (int i = 0; i < count; ++i) bytes += size[i] * int64_t(sizeof(vgf));
      if (count < kKeep && bytes <= kKeepBytes) {  // kept for later calls
        buf[count] = p; size[count] = n; busy[count] = true; ++count;
      }
      return p;
    }
    void give_back(vgf* p) {
      for (int i = 0; i < count; ++i)
        if (buf[i] == p) {
          busy[i] = false;
          return;
        }
      delete[] p;  // not kept
    }
  };
  static List& list() {
    static thread_local List l;
    return l;
  }
};

class PackedGemm {
 public:
  static constexpr int64_t kV = 2;                    // vectors per panel row
  static constexpr int64_t kNR = kV * kSimdLanes;     // columns per panel
  // rows per block: 8 x 2 = 16 of AVX-512's 32 registers (measured faster than 6 x 4);
  // 6 x 2 = 12 of AVX2's and SSE's 16, leaving room for the panel row and a broadcast.
  static constexpr int64_t kMR = kSimdLanes == 16 ? 8 : 6;

  // block: the columns form N / block blocks of that width (the gate blocks of a
  // recurrent matrix); panels never straddle two blocks, so a thread can own a slice of
  // hidden units across all gates. block = N (the default) is one block.
  PackedGemm(int64_t M, int64_t N, int64_t K, const float* Wm, bool transposed,
             int64_t block = 0)
      : M_(M), N_(N), K_(K), block_(block > 0 ? block : (N > 0 ? N : 1)),
        per_block_((block_ + kNR - 1) / kNR), panels_(N / block_ * per_block_) {
    packed_ = PackBuffers::take(panels_ * K * kV + 1);
    float* base = reinterpret_cast<float*>(packed_.get());
    // A pure copy, so the threads may split it (from outside a parallel region, and when
    // the weights are large enough to pay for waking them: a one-step call with H = 512
    // spends about as long packing as multiplying).
#pragma omp parallel for schedule(static) if (panels_ > 1 && panels_ * K * kNR >= (1 << 17) && !omp_in_parallel())
    for (int64_t p = 0; p < panels_; ++p) {
      float* dst = base + p * K * kNR;
      const int64_t n0 = first_column(p), cols = columns(p);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < kNR; ++c) {
          const int64_t n = n0 + c;
          *dst++ = c < cols ? (transposed ? Wm[n * K + k] : Wm[k * N + n]) : 0.f;
        }
    }
  }

  int64_t panels_per_block() const { return per_block_; }

  // The panels [p0, p1) only, for all M rows of A (no threads of its own). bias: as
  // for run.
  void run_panels(const float* A, int64_t M, int64_t lda, float* C, int64_t ldc,
                  bool accumulate, int64_t p0, int64_t p1, const float* bias = nullptr) const {
    int64_t p = p0;
    // One or two rows (a batch of one or two): a panel alone gives kV or 2 kV chains of
    // dependent FMAs, too few to hide their latency; kWide panels at once give kWide
    // times more. Every column is still summed over k in order: the same bits.
    if (M == 1)
      for (; p + kWide <= p1; p += kWide) wide<1>(A, lda, p, C, ldc, accumulate, bias);
    else if (M == 2)
      for (; p + kWide <= p1; p += kWide) wide<2>(A, lda, p, C, ldc, accumulate, bias);
    for (; p < p1; ++p) {
      const vgf* panel = packed_.get() + p * K_ * kV;
      const int64_t n0 = first_column(p), cols = columns(p);
      const float* bp = bias ? bias + n0 : nullptr;
      over_row_blocks(M, [&](int64_t i, int64_t r) {
        row_block(r, A + i * lda, lda, 1, panel, C + i * ldc + n0, ldc, cols, accumulate, bp);
      });
    }
  }

  // C[M, N] (+)= A[M, K] @ op(Wm), A and C with leading dimensions lda, ldc. Rows go in chunks of
  // kChunk, so that a chunk of A stays in cache while every panel passes over it.
  // bias: [N] added to every row of C (only with accumulate = false), or nullptr.
  void run(const float* A, int64_t M, int64_t lda, float* C, int64_t ldc, bool accumulate,
           const float* bias = nullptr) const {
    run_strided(A, M, lda, 1, C, ldc, accumulate, bias);
  }

  // The same with A(i, k) = A[i * ars + k * aks], e.g. ars = 1, aks = M for a transposed A.
  void run_strided(const float* A, int64_t M, int64_t ars, int64_t aks, float* C, int64_t ldc,
                   bool accumulate, const float* bias = nullptr) const {
    constexpr int64_t kChunk = 96;   // rows of A per tile
    // K per pass: a row-major A streams, and one pass avoids re-reading C. A strided A
    // (aks > 1, the transposed A of a weight gradient) is read a cache line per k and
    // block of rows: in passes of 256; and where C is 256 columns wide or more, each
    // thread first copies the chunk of A it works on into a buffer of its own, block by
    // block in the order the kernel reads it, in passes of 1024. Read in place, every k
    // of a block is a line of its own, and with aks a multiple of 1024 floats (4 gates of
    // 256 units) a block's lines all fall in one set of the first-level cache. Measured
    // (AVX2, 2 threads, medians of paired runs): 2048 x 512 x 3200 (dW of an LSTM,
    // H = 512) 1.20x and 1.23x faster copied in two runs; 512 x 512 x 3200 and
    // 1024 x 256 x 4000 0.97x to 1.17x; 512 x 128 x 3200 0.83x to 0.91x, where the copy
    // costs more than it saves. The copy changes no sum: the same bits.
    const bool copy = aks != 1 && N_ >= 256;
    const int64_t kDepth = copy ? 1024 : aks != 1 ? 256 : (K_ > 0 ? K_ : 1);
    const int64_t chunks = (M + kChunk - 1) / kChunk;
    for (int64_t k0 = 0; k0 < K_ || k0 == 0; k0 += kDepth) {
      const int64_t kn = K_ - k0 < kDepth ? K_ - k0 : kDepth;
      const bool acc = accumulate || k0 > 0;
      const float* bias0 = k0 == 0 ? bias : nullptr;
      // Threads split the (chunk, panel) tiles of a product of 2^22 flops or more (about
      // 50 us on one thread). Below that one thread does it: a call that comes after an
      // idle pause finds the team's other thread asleep, and waking it costs more than it
      // saves (measured, AVX2, 2 threads, 5 ms pauses: an RNN-tanh layer at T = 100,
      // B = 1, H = 64, whose input projection has 2^19.6 flops, 1.1 ms with the team
      // against 0.38 ms without; warm, 0.07 - 0.09 ms either way).
#pragma omp parallel if (2 * M * N_ * kn >= (int64_t(1) << 22))
      {
        PackBuffers::Ptr kept;  // the copy's memory, kept by this thread for its next calls
        if (copy) kept = PackBuffers::take((kChunk * kn + kSimdLanes - 1) / kSimdLanes);
        float* own = reinterpret_cast<float*>(kept.get());
        int64_t own_q = -1;  // the chunk in own
#pragma omp for collapse(2) schedule(static)
        for (int64_t q = 0; q < chunks; ++q) {
          for (int64_t p = 0; p < panels_; ++p) {
            const int64_t m0 = q * kChunk;
            const int64_t rows = M - m0 < kChunk ? M - m0 : kChunk;
            const float* Ac = A + m0 * ars + k0 * aks;
            if (copy && own_q != q) {  // block i of r rows at own + i * kn, as [kn][r]
              over_row_blocks(rows, [&](int64_t i, int64_t r) {
                float* dst = own + i * kn;
                for (int64_t k = 0; k < kn; ++k)
                  for (int64_t j = 0; j < r; ++j) dst[k * r + j] = Ac[(i + j) * ars + k * aks];
              });
              own_q = q;
            }
            float* Cc = C + m0 * ldc;
            const vgf* panel = packed_.get() + p * K_ * kV + k0 * kV;
            const int64_t n0 = first_column(p), cols = columns(p);
            const float* bp = bias0 ? bias0 + n0 : nullptr;
            over_row_blocks(rows, [&](int64_t i, int64_t r) {  // A from own, or in place
              row_block(r, copy ? own + i * kn : Ac + i * ars, copy ? 1 : ars, copy ? r : aks,
                        panel, Cc + i * ldc + n0, ldc, cols, acc, bp, kn);
            });
          }
        }
      }
      if (K_ == 0) break;
    }
  }

 private:
  static constexpr int kWide = 4;  // panels per wide<R> call

  // Rows [0, R) of the panels [p, p + kWide), over all of K.
  template <int R>
  void wide(const float* A, int64_t lda, int64_t p, float* C, int64_t ldc, bool accumulate,
            const float* bias) const {
    const vgf* panel[kWide];
    int64_t n0[kWide], cols[kWide];
    vgf acc[kWide][R][kV];
    for (int q = 0; q < kWide; ++q) {
      panel[q] = packed_.get() + (p + q) * K_ * kV;
      n0[q] = first_column(p + q);
      cols[q] = columns(p + q);
      float tmp[kNR] = {};
      if (bias) std::memcpy(tmp, bias + n0[q], sizeof(float) * cols[q]);
      vgf init[kV];
      std::memcpy(init, tmp, sizeof tmp);
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < kV; ++v) acc[q][r][v] = init[v];
    }
    for (int64_t k = 0; k < K_; ++k) {
      float a[R];
      for (int r = 0; r < R; ++r) a[r] = A[r * lda + k];
      for (int q = 0; q < kWide; ++q)
        for (int v = 0; v < kV; ++v) {
          const vgf w = panel[q][kV * k + v];
          for (int r = 0; r < R; ++r) acc[q][r][v] += a[r] * w;
        }
    }
    for (int q = 0; q < kWide; ++q)
      for (int r = 0; r < R; ++r) store(acc[q][r], C + r * ldc + n0[q], cols[q], accumulate);
  }

  // Writes (or with accumulate adds) the first cols of a block row to c.
  static void store(vgf* acc, float* c, int64_t cols, bool accumulate) {
    if (cols == kNR) {
      if (accumulate) {
        vgf old[kV];
        std::memcpy(old, c, sizeof old);
        for (int v = 0; v < kV; ++v) acc[v] += old[v];
      }
      std::memcpy(c, acc, sizeof(vgf) * kV);
    } else {
      float tmp[kNR];
      std::memcpy(tmp, acc, sizeof tmp);
      for (int64_t j = 0; j < cols; ++j) c[j] = accumulate ? c[j] + tmp[j] : tmp[j];
    }
  }

  int64_t first_column(int64_t p) const { return p / per_block_ * block_ + p % per_block_ * kNR; }
  int64_t columns(int64_t p) const {
    const int64_t left = block_ - p % per_block_ * kNR;
    return left < kNR ? left : kNR;
  }

  // f(i, r) for blocks of r rows from row i: kMR rows each, except that the last kMR + 1
  // to kMR + 3 rows go as two blocks of about half (AVX2's 6 + 2 as 4 + 4), since a block
  // of one to three rows has too few chains of dependent FMAs to keep the FMA units busy
  // (measured: one step of B = 8, 1024 x 256, 6% faster; B = 32, 512 x 128, 10%). Each
  // element of C is summed over k in the same order whatever its block: the same bits.
  template <class F>
  static void over_row_blocks(int64_t M, F&& f) {
    for (int64_t i = 0; i < M;) {
      const int64_t left = M - i;
      const int64_t r = left == kMR || left >= kMR + 4 ? kMR : left > kMR ? (left + 1) / 2 : left;
      f(i, r);
      i += r;
    }
  }

  // block<rows> for 1 <= rows <= kMR.
  void row_block(int64_t rows, const float* A, int64_t lda, int64_t aks, const vgf* panel,
                 float* C, int64_t ldc, int64_t cols, bool accumulate,
                 const float* bias = nullptr, int64_t kn = -1) const {
    if (rows == kMR) return block<kMR>(A, lda, aks, panel, C, ldc, cols, accumulate, bias, kn);
    switch (rows) {
      case 7: block<7>(A, lda, aks, panel, C, ldc, cols, accumulate, bias, kn); break;
      case 6: block<6>(A, lda, aks, panel, C, ldc, cols, accumulate, bias, kn); break;
      case 5: block<5>(A, lda, aks, panel, C, ldc, cols, accumulate, bias, kn); break;
      case 4: block<4>(A, lda, aks, panel, C, ldc, cols, accumulate, bias, kn); break;
      case 3: block<3>(A, lda, aks, panel, C, ldc, cols, accumulate, bias, kn); break;
      case 2: block<2>(A, lda, aks, panel, C, ldc, cols, accumulate, bias, kn); break;
      case 1: block<1>(A, lda, aks, panel, C, ldc, cols, accumulate, bias, kn); break;
      default: break;
    }
  }

  template <int R>
  // kn: the depth of this pass (K by default); panel and A point at its first k.
  void block(const float* A, int64_t lda, int64_t aks, const vgf* panel, float* C, int64_t ldc,
             int64_t cols, bool accumulate, const float* bias = nullptr, int64_t kn = -1) const {
    if (kn < 0) kn = K_;
    vgf acc[R][kV], init[kV] = {};
    if (bias) {
      float tmp[kNR] = {};
      std::memcpy(tmp, bias, sizeof(float) * cols);
      std::memcpy(init, tmp, sizeof tmp);
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kV; ++v) acc[r][v] = init[v];
    for (int64_t k = 0; k < kn; ++k) {
      vgf w[kV];
      for (int v = 0; v < kV; ++v) w[v] = panel[kV * k + v];
      for (int r = 0; r < R; ++r) {
        const float a = A[r * lda + k * aks];
        for (int v = 0; v < kV; ++v) acc[r][v] += a * w[v];
      }
    }
    for (int r = 0; r < R; ++r) store(acc[r], C + r * ldc, cols, accumulate);
  }

  int64_t M_, N_, K_, block_, per_block_, panels_;
  PackBuffers::Ptr packed_;
};

}  // namespace pyrnn::cpu
