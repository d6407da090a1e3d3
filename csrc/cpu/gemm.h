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
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#include <omp.h>

#include "simd.h"

namespace pyrnn::cpu {

typedef float vgf __attribute__((vector_size(4 * kSimdLanes)));

// bfloat16 products. A layer whose weights are bfloat16 (bf16_products() while the op
// runs, loops.h) multiplies operands rounded to bfloat16 and sums in float32. The copy
// of the loops for AVX512-BF16 (PYRNN_BF16_DOT) packs them as bfloat16 pairs and sums
// each pair with vdpbf16ps; the other copies multiply the rounded values in float32 (a
// product of two bfloat16 values is exact in float32): the same products, summed in
// another order.
#ifndef PYRNN_BF16_DOT
#define PYRNN_BF16_DOT 0
#endif
constexpr bool kBf16Dot = PYRNN_BF16_DOT && kSimdLanes == 16;

// The bfloat16 nearest to f (ties to even, as torch's), as its 16 bits; NaN stays NaN.
inline uint32_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r;
}
typedef uint32_t vgu __attribute__((vector_size(4 * kSimdLanes)));
// The same for the kSimdLanes floats at p, lane by lane.
inline vgu bf16_bits_at(const float* p) {
  vgu u;
  std::memcpy(&u, p, sizeof u);
  const vgu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? vgu{} + 0x7fc0u : r;
}
// The bfloat16 pairs (k, k + 1) of the kSimdLanes floats at p: kSimdLanes / 2 words.
typedef uint64_t vgq __attribute__((vector_size(4 * kSimdLanes)));
typedef uint32_t vgh __attribute__((vector_size(2 * kSimdLanes)));
inline vgh bf16_pairs_at(const float* p) {
  const vgq q = (vgq)bf16_bits_at(p);
  return __builtin_convertvector((q & 0xffffu) | ((q >> 16) & 0xffff0000u), vgh);
}
// v[r][l] becomes v[l][r] for a square block of words, kSimdLanes rows of kSimdLanes
// lanes: the transpose as swaps of off-diagonal blocks, of kSimdLanes / 2, ..., 2 and 1
// rows and lanes.
template <int b>
inline void swap_blocks(vgu& x, vgu& y) {
  vgu lo, hi;  // lane masks: 0 - 15 pick x's lanes, 16 - 31 y's
  for (int l = 0; l < kSimdLanes; ++l) {
    lo[l] = (l & b) ? kSimdLanes + l - b : l;
    hi[l] = (l & b) ? kSimdLanes + l : l + b;
  }
  const vgu nx = __builtin_shuffle(x, y, lo), ny = __builtin_shuffle(x, y, hi);
  x = nx;
  y = ny;
}
template <int b>
inline void swap_all(vgu* v) {
  for (int i = 0; i < kSimdLanes; ++i)
    if (!(i & b)) swap_blocks<b>(v[i], v[i + b]);
}
inline void transpose_lanes(vgu* v) {
  if constexpr (kSimdLanes >= 16) swap_all<8>(v);
  if constexpr (kSimdLanes >= 8) swap_all<4>(v);
  swap_all<2>(v);
  swap_all<1>(v);
}
inline float bf16_round(float f) {
  const uint32_t u = bf16_bits(f) << 16;
  float r;
  std::memcpy(&r, &u, sizeof r);
  return r;
}

#if PYRNN_BF16_DOT
// acc + a0 w0 + a1 w1 in every lane: a = (a0, a1) a pair of bfloat16 broadcast, w the
// pairs of a panel row.
inline vgf dot2(vgf acc, uint32_t a, vgf w) {
  return (vgf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)_mm512_set1_epi32(int(a)), (__m512bh)w);
}
#else
inline vgf dot2(vgf acc, uint32_t, vgf) { return acc; }  // never called (kBf16Dot false)
#endif

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
  // Rows per block, at most: 12 x 2 = 24 of AVX-512's 32 registers; 6 x 2 = 12 of
  // AVX2's and SSE's 16, leaving room for the panel row and a broadcast. With AVX-512 a
  // block takes gemm_rows() rows (loops.h): 12 on Intel CPUs, 8 on others (on an AMD
  // EPYC model 17, 8 x 2 ran faster than 6 x 4; 12 was not measured there). Measured on
  // an Intel Xeon with AMX (2 threads, 15 interleaved rounds in one process, medians of
  // the ratios, 12 rows against 8): at T = 100, B = 32, H = 512 GRU inference 0.91 of the
  // time, training 0.95, LSTM 0.96 and 0.97, Elman RNN 0.98 and 1.00; at H = 128 and at
  // T = 500, B = 8, H = 256 0.95 - 1.01. Each element of C is summed over k in the same
  // order whatever the blocks: the same bits (tests/test_dispatch.py).
  static constexpr int64_t kMR = kSimdLanes == 16 ? 12 : 6;
  // The flops from which a product outside the loops is split across the threads (see
  // tiles()); the weight gradients on the BLAS take the same bound (kernels_impl.h).
  static constexpr int64_t kTeamFlops = int64_t(1) << 22;

  // block: the columns form N / block blocks of that width (the gate blocks of a
  // recurrent matrix); panels never straddle two blocks, so a thread can own a slice of
  // hidden units across all gates. block = N (the default) is one block. bf16: products
  // of operands rounded to bfloat16 (see kBf16Dot).
  // Wm2: a second right-hand matrix [K, N - N1] beside Wm [K, N1] (not transposed, one
  // block): op(Wm) is then [Wm | Wm2], so that two products that share their left
  // operand (the weight gradients of x and of h_{t-1}) run as one.
  PackedGemm(int64_t M, int64_t N, int64_t K, const float* Wm, bool transposed,
             int64_t block = 0, bool bf16 = bf16_products(), const float* Wm2 = nullptr,
             int64_t N1 = -1)
      : M_(M), N_(N), K_(K), block_(block > 0 ? block : (N > 0 ? N : 1)),
        per_block_((block_ + kNR - 1) / kNR), panels_(N / block_ * per_block_),
        bf16_(bf16), dot_(bf16 && kBf16Dot), depth_(dot_ ? (K + 1) / 2 : K),
        amx_(dot_ && K > 0 ? matrix_gemm() : nullptr) {
    // A panel row: kNR floats, or kNR pairs of bfloat16 (k even, k odd) with dot_; the
    // same size, so panel p, row k is at packed_ + (p * depth_ + k) * kV either way.
    packed_ = PackBuffers::take(panels_ * depth_ * kV + 1);
    fetch_ = cpu_is_intel() && panels_ * depth_ * int64_t(sizeof(vgf)) * kV > second_level_cache();
    float* base = reinterpret_cast<float*>(packed_.get());
    // Column n of op(Wm), its element k at column(n)[k * kstep(n)]. A whole panel of a
    // Wm [K, N] is packed a panel row at a time, any other a column at a time (along a row
    // of a transposed Wm).
    if (!Wm2 || N1 < 0 || N1 > N) N1 = N;
    auto column = [&](int64_t n) {
      return transposed ? Wm + n * K : n < N1 ? Wm + n : Wm2 + (n - N1);
    };
    auto kstep = [&](int64_t n) -> int64_t { return transposed ? 1 : n < N1 ? N1 : N - N1; };
    // a full panel of a Wm [K, N] (or of Wm2) that lies in one of the two
    auto whole = [&](int64_t n0, int64_t cols) {
      return !transposed && cols == kNR && (n0 >= N1 || n0 + kNR <= N1);
    };
    // A pure copy, so the threads may split it (from outside a parallel region, and when
    // the weights are large enough to pay for waking them: a one-step call with H = 512
    // spends about as long packing as multiplying).
#pragma omp parallel for schedule(static) if (panels_ > 1 && panels_ * K * kNR >= (1 << 17) && !omp_in_parallel())
    for (int64_t p = 0; p < panels_; ++p) {
      const int64_t n0 = first_column(p), cols = columns(p);
      if (kBf16Dot && dot_) {  // (stored with memcpy: the buffer is read as vectors of float)
        char* dst = reinterpret_cast<char*>(base + origin(p));
        const int64_t rs = row_stride();
        if (whole(n0, cols)) {  // rows 2 k2 and 2 k2 + 1 of Wm, a vector at a time
          const int64_t ld = kstep(n0);
          for (int64_t k2 = 0; k2 < depth_; ++k2) {
            const float* lo = column(n0) + 2 * k2 * ld;
            char* row = dst + k2 * rs * sizeof(uint32_t);
            for (int64_t v = 0; v < kV; ++v) {
              vgu pair = bf16_bits_at(lo + v * kSimdLanes);
              if (2 * k2 + 1 < K) pair |= bf16_bits_at(lo + ld + v * kSimdLanes) << 16;
              std::memcpy(row + v * sizeof(vgu), &pair, sizeof pair);
            }
          }
          continue;
        }
        // A transposed Wm (the layers' weights, each column a row in memory): sixteen pairs
        // of sixteen columns at a time, transposed in registers, so that each panel row
        // gets sixteen pairs in one store rather than one pair at a time (the panel rows
        // of the matrix units' layout lie a block's width apart). W_ih and W_hh of an LSTM
        // at H = 512 took 6.6% of the samples of bfloat16 inference at T = 100, B = 32
        // that way. The same bits.
        int64_t k2_done = 0;
        if constexpr (kSimdLanes == 16) {
          if (transposed) {
            for (; k2_done + 16 <= K / 2; k2_done += 16)
              for (int64_t c0 = 0; c0 < kNR; c0 += 16) {
                vgu v[16];
                for (int64_t j = 0; j < 16; ++j) {
                  if (c0 + j >= cols) {
                    v[j] = vgu{};
                    continue;
                  }
                  const float* src = column(n0 + c0 + j) + 2 * k2_done;
                  const vgh a = bf16_pairs_at(src), b = bf16_pairs_at(src + kSimdLanes);
                  std::memcpy(&v[j], &a, sizeof a);
                  std::memcpy(reinterpret_cast<char*>(&v[j]) + sizeof a, &b, sizeof b);
                }
                transpose_lanes(v);
                for (int64_t r = 0; r < 16; ++r)
                  std::memcpy(dst + ((k2_done + r) * rs + c0) * sizeof(uint32_t), &v[r],
                              sizeof v[r]);
              }
          }
        }
        for (int64_t c = 0; c < kNR; ++c) {
          const float* src = c < cols ? column(n0 + c) : nullptr;
          const int64_t ks = kstep(n0 + c);
          int64_t k2 = k2_done;
          // A row of a transposed Wm (the weights as the layers hold them) is rounded
          // kSimdLanes / 2 pairs at a time, the rest one pair at a time: W_hh of an LSTM
          // at H = 128 packs in 14 - 18 us instead of 55 - 58, at H = 512 in 0.27 - 0.43 ms
          // instead of 1.0 - 1.5 (one thread, medians of 300, AMD EPYC model 17).
          if (src && ks == 1)
            for (; k2 + kSimdLanes / 2 <= K / 2; k2 += kSimdLanes / 2) {
              const vgh pairs = bf16_pairs_at(src + 2 * k2);
              for (int64_t j = 0; j < kSimdLanes / 2; ++j)
                std::memcpy(dst + ((k2 + j) * rs + c) * sizeof(uint32_t), &pairs[j],
                            sizeof(uint32_t));
            }
          for (; k2 < depth_; ++k2) {
            const int64_t k = 2 * k2;
            const uint32_t pair =
                src ? bf16_bits(src[k * ks]) | (k + 1 < K ? bf16_bits(src[(k + 1) * ks]) << 16 : 0u)
                    : 0u;
            std::memcpy(dst + (k2 * rs + c) * sizeof pair, &pair, sizeof pair);
          }
        }
        continue;
      }
      float* dst = base + p * K * kNR;
      if (whole(n0, cols)) {
        const int64_t ld = kstep(n0);
        for (int64_t k = 0; k < K; ++k, dst += kNR) {
          const float* src = column(n0) + k * ld;
          if (!bf16_) {
            std::memcpy(dst, src, sizeof(float) * kNR);
            continue;
          }
          for (int64_t v = 0; v < kV; ++v) {  // bfloat16 in the high half of a float
            const vgu r = bf16_bits_at(src + v * kSimdLanes) << 16;
            std::memcpy(dst + v * kSimdLanes, &r, sizeof r);
          }
        }
        continue;
      }
      // A transposed Wm: kSimdLanes columns by kSimdLanes rows of the panel at a time,
      // transposed in registers, so that each panel row gets them in one store rather
      // than one float at a time (a pure copy, or the same rounding: the same bits). An
      // LSTM's one-step call at B = 32, H = 512 (inference) took 0.91 - 0.97 ms instead
      // of 2.19 - 2.24, at T = 100, B = 1, H = 64 107 - 114 us instead of 121 - 122 (an
      // Intel Xeon with AMX, 2 threads, medians of 300 calls, three runs of each).
      int64_t k_done = 0;
      if (transposed)
        for (; k_done + kSimdLanes <= K; k_done += kSimdLanes)
          for (int64_t c0 = 0; c0 < kNR; c0 += kSimdLanes) {
            vgu v[kSimdLanes];
            for (int64_t j = 0; j < kSimdLanes; ++j) {
              if (c0 + j >= cols) {
                v[j] = vgu{};
                continue;
              }
              const float* src = column(n0 + c0 + j) + k_done;
              if (bf16_)
                v[j] = bf16_bits_at(src) << 16;
              else
                std::memcpy(&v[j], src, sizeof v[j]);
            }
            transpose_lanes(v);
            for (int64_t r = 0; r < kSimdLanes; ++r)
              std::memcpy(dst + (k_done + r) * kNR + c0, &v[r], sizeof v[r]);
          }
      for (int64_t c = 0; c < kNR; ++c) {
        const float* src = column(n0 + c);
        const int64_t ks = kstep(n0 + c);
        if (c >= cols)
          for (int64_t k = k_done; k < K; ++k) dst[k * kNR + c] = 0.f;
        else if (bf16_)
          for (int64_t k = k_done; k < K; ++k) dst[k * kNR + c] = bf16_round(src[k * ks]);
        else
          for (int64_t k = k_done; k < K; ++k) dst[k * kNR + c] = src[k * ks];
      }
    }
  }

  int64_t panels_per_block() const { return per_block_; }
  // whether the products run on the matrix units
  bool on_units() const { return amx_ != nullptr; }

  // The panels [p0, p1) only, for all M rows of A (no threads of its own); with every,
  // the panels [p0, p1) of each block (p1 <= panels_per_block()). bias: as for run.
  void run_panels(const float* A, int64_t M, int64_t lda, float* C, int64_t ldc,
                  bool accumulate, int64_t p0, int64_t p1, const float* bias = nullptr,
                  bool every = false) const {
    const int64_t blocks = every ? panels_ / per_block_ : 1;
    const int64_t step = every ? per_block_ : 0;
    if (!bf16_) return panels(A, lda, M, C, ldc, accumulate, p0, p1, blocks, step, bias);
    const Left a = left(A, M, lda, 1);  // rounded once for all blocks
    if constexpr (kBf16Dot) {  // (the pairs' kernels exist in the AVX512-BF16 copy only)
      if (dot_) return panels(a.pairs, a.ld, M, C, ldc, accumulate, p0, p1, blocks, step, bias);
    }
    panels(a.f, a.ld, M, C, ldc, accumulate, p0, p1, blocks, step, bias);
  }

  // C[M, N] (+)= A[M, K] @ op(Wm), A and C with leading dimensions lda, ldc. Rows go in chunks of
  // at most 96, so that a chunk of A stays in cache while every panel passes over it.
  // bias: [N] added to every row of C (only with accumulate = false), or nullptr.
  void run(const float* A, int64_t M, int64_t lda, float* C, int64_t ldc, bool accumulate,
           const float* bias = nullptr) const {
    run_strided(A, M, lda, 1, C, ldc, accumulate, bias);
  }

  // The same with A(i, k) = A[i * ars + k * aks], e.g. ars = 1, aks = M for a transposed A.
  void run_strided(const float* A, int64_t M, int64_t ars, int64_t aks, float* C, int64_t ldc,
                   bool accumulate, const float* bias = nullptr) const {
    if (!bf16_) return tiles(A, M, ars, aks, C, ldc, accumulate, bias);
    const Left a = left(A, M, ars, aks);
    if constexpr (kBf16Dot) {
      if (dot_) return tiles(a.pairs, M, a.ld, 1, C, ldc, accumulate, bias);
    }
    // the rounded copy keeps A's layout, row-major or transposed
    if (aks == 1) return tiles(a.f, M, a.ld, 1, C, ldc, accumulate, bias);
    tiles(a.f, M, 1, a.ld, C, ldc, accumulate, bias);
  }

 private:
  static constexpr int kWide = 4;  // panels per wide<R, Q> call, at most
  static constexpr int64_t kCopyN = 128;  // the width of C from which tiles() copies a strided A

  // The left operand of a bfloat16 product, in this thread's buffer while alive: with
  // dot_, the rows of A as bfloat16 pairs [M][depth_] (ld = depth_ pairs, the odd K
  // padded with 0); else A rounded to bfloat16 in float32, row-major [M][K] (ld = K)
  // when A is (aks == 1), else transposed [K][M] (ld = M).
  struct Left {
    const float* f = nullptr;
    const uint32_t* pairs = nullptr;
    int64_t ld = 0;
    PackBuffers::Ptr keep;
  };
  Left left(const float* A, int64_t M, int64_t ars, int64_t aks) const {
    Left a;
    const int64_t n = dot_ ? M * depth_ : M * K_;
    a.keep = PackBuffers::take(n / kSimdLanes + 1);
    // Threads share a large operand (a weight gradient's, outside any parallel region);
    // inside the loops' teams each thread rounds the rows it multiplies.
    const bool team = M * K_ >= (1 << 18) && !omp_in_parallel();
    if (kBf16Dot && dot_) {
      uint32_t* out = reinterpret_cast<uint32_t*>(a.keep.get());
      a.pairs = out;
      a.ld = depth_;
      // pair (i, k2): A(i, 2 k2) in the low half, A(i, 2 k2 + 1) (or 0 past K) in the high
      // half; blocks of kSimdLanes rows, so that a transposed A is read a vector at a time
      const int64_t full = K_ / 2;  // pairs with both halves in A
      auto pair = [&](int64_t i, int64_t k2) {
        const float* lo = A + i * ars + 2 * k2 * aks;
        out[i * depth_ + k2] = bf16_bits(lo[0]) | (k2 < full ? bf16_bits(lo[aks]) << 16 : 0u);
      };
      for_blocks(M, kSimdLanes, team, [&](int64_t i0, int64_t i1) {
        if (aks == 1) {  // row by row
          for (int64_t i = i0; i < i1; ++i) {
            const float* row = A + i * ars;
            uint32_t* dst = out + i * depth_;
            int64_t k2 = 0;
            for (; k2 + kSimdLanes / 2 <= full; k2 += kSimdLanes / 2) {
              const vgh pairs = bf16_pairs_at(row + 2 * k2);
              std::memcpy(dst + k2, &pairs, sizeof pairs);
            }
            for (; k2 < full; ++k2)
              dst[k2] = bf16_bits(row[2 * k2]) | bf16_bits(row[2 * k2 + 1]) << 16;
            if (full < depth_) pair(i, full);
          }
        } else if (ars == 1 && i1 - i0 == kSimdLanes) {  // transposed: a vector of rows per k
          int64_t k2 = 0;
          if constexpr (kSimdLanes == 16) {
            // Sixteen pairs of k for the block's sixteen rows: sixteen vectors, one per
            // pair, transposed into sixteen rows of sixteen pairs, each stored whole
            // rather than a word at a time. The weight gradients' left operand (the
            // gate gradients of all T*B rows) took 8.8% of the samples of LSTM training
            // at T = 100, B = 32, H = 128 with bfloat16 products; one thread's product
            // for dW at that size (512 x 256 x 3200) takes 6.4 - 6.5 ms instead of 7.5 -
            // 7.6, at H = 512 81 instead of 92 (AMD EPYC model 17). The same bits.
            for (; k2 + 16 <= full; k2 += 16) {
              vgu v[16];
              for (int j = 0; j < 16; ++j) {
                const float* lo = A + i0 + 2 * (k2 + j) * aks;
                v[j] = bf16_bits_at(lo) | bf16_bits_at(lo + aks) << 16;
              }
              transpose_lanes(v);
              for (int j = 0; j < 16; ++j)
                std::memcpy(out + (i0 + j) * depth_ + k2, &v[j], sizeof v[j]);
            }
          }
          for (; k2 < depth_; ++k2) {
            const float* lo = A + i0 + 2 * k2 * aks;
            vgu v = bf16_bits_at(lo);
            if (k2 < full) v |= bf16_bits_at(lo + aks) << 16;
            for (int64_t j = 0; j < kSimdLanes; ++j) out[(i0 + j) * depth_ + k2] = v[j];
          }
        } else {  // transposed: the block's rows lie side by side in each k
          for (int64_t k2 = 0; k2 < depth_; ++k2)
            for (int64_t i = i0; i < i1; ++i) pair(i, k2);
        }
      });
      return a;
    }
    float* out = reinterpret_cast<float*>(a.keep.get());
    a.f = out;
    a.ld = aks == 1 ? K_ : M;
    const int64_t outer = aks == 1 ? M : K_, inner = aks == 1 ? K_ : M;
    const int64_t so = aks == 1 ? ars : aks, si = aks == 1 ? 1 : ars;
    for_blocks(outer, 16, team, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o)
        for (int64_t i = 0; i < inner; ++i) out[o * inner + i] = bf16_round(A[o * so + i * si]);
    });
    return a;
  }

  // f(i0, i1) over [0, n) in blocks of `block`, split across the threads with team.
  template <class F>
  static void for_blocks(int64_t n, int64_t block, bool team, F&& f) {
    if (!team) {
      for (int64_t i0 = 0; i0 < n; i0 += block) f(i0, i0 + block < n ? i0 + block : n);
      return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += block) f(i0, i0 + block < n ? i0 + block : n);
  }

  // The panels [p0, p1) of each of `blocks` blocks, block g's at g * step + [p0, p1), for
  // the M rows of A (float32, or bfloat16 pairs with dot_).
  // Not inlined (one call runs a step's product): the loops are flattened
  // (kernels_impl.h), and its row blocks of eight shapes at every call site of every loop
  // of every cell made the copy for AVX512-BF16 compile in 194 s instead of 48 s; the
  // loops ran as fast either way (measured, S1 - S4, paired in one process: 0.98 - 1.03).
  template <typename TA>
  __attribute__((noinline)) void panels(const TA* A, int64_t lda, int64_t M, float* C,
                                        int64_t ldc, bool accumulate, int64_t p0, int64_t p1,
                                        int64_t blocks, int64_t step, const float* bias) const {
    const int64_t per = p1 - p0, n = blocks * per;
    if (per <= 0) return;
    auto index = [&](int64_t e) { return e / per * step + p0 + e % per; };
    if constexpr (std::is_same_v<TA, uint32_t>) {
      if (amx_) {  // runs of adjacent panels of one block, kGroup at most, a call each
        for (int64_t e = 0; e < n;) {
          const int64_t p = index(e);
          int64_t np = 1;
          while (e + np < n && np < kGroup && index(e + np) == p + np &&
                 (p + np) % per_block_ != 0)
            ++np;
          on_units(A, lda, M, p, np, C, ldc, accumulate, bias);
          e += np;
        }
        amx_->release();
        return;
      }
    }
    int64_t e = 0;  // panels [0, e) done, in the order of index()
    // One or two rows (a batch of one or two): a panel alone gives kV or 2 kV chains of
    // dependent FMAs, too few to hide their latency; up to kWide panels at once, taken
    // across the gate blocks (at H = 64 a block has two panels), give as many times more.
    // Every column is still summed over k in order: the same bits.
    if ((M == 1 || M == 2) && n > 1) {
      for (; e < n; e += kWide) {
        int64_t ps[kWide];
        const int q = n - e < kWide ? int(n - e) : kWide;
        for (int j = 0; j < q; ++j) ps[j] = index(e + j);
        if (M == 1) wide_n<1>(q, A, lda, ps, C, ldc, accumulate, bias);
        else wide_n<2>(q, A, lda, ps, C, ldc, accumulate, bias);
      }
      return;
    }
    for (; e < n; ++e) {
      const int64_t p = index(e);
      const vgf* panel = packed_.get() + p * depth_ * kV;
      const int64_t n0 = first_column(p), cols = columns(p);
      const float* bp = bias ? bias + n0 : nullptr;
      over_row_blocks(M, [&](int64_t i, int64_t r) {
        row_block(r, A + i * lda, lda, 1, panel, C + i * ldc + n0, ldc, cols, accumulate, bp);
      });
    }
  }

  // All panels for all rows, split across threads when large enough (run_strided).
  template <typename TA>
  void tiles(const TA* A, int64_t M, int64_t ars, int64_t aks, float* C, int64_t ldc,
             bool accumulate, const float* bias) const {
    if constexpr (std::is_same_v<TA, uint32_t>) {
      if (amx_) return tiles_on_units(A, M, ars, C, ldc, accumulate, bias);
    }
    // Rows of A per tile: at most 96, in chunks of equal size (rounded up to whole row
    // blocks), so that the threads' shares of the tiles are about equal (96 + 32 rows
    // split a product of M = 128, an RNN's weight gradient at H = 128, 3 : 1 between two
    // threads). Every element of C is summed over k in the same order whatever the chunk:
    // the same bits.
    constexpr int64_t kMaxChunk = 96;
    const int64_t parts = M > kMaxChunk ? (M + kMaxChunk - 1) / kMaxChunk : 1;
    const int64_t chunk = ((M + parts - 1) / parts + rows_ - 1) / rows_ * rows_;
    // K per pass: a row-major A streams, and one pass avoids re-reading C. A strided A
    // (aks > 1, the transposed A of a weight gradient) is read a cache line per k and
    // block of rows: in passes of 256; and where C is kCopyN columns wide or more, each
    // thread first copies the chunk of A it works on into a buffer of its own, block by
    // block in the order the kernel reads it, in passes of 1024. Read in place, every k
    // of a block is a line of its own, and with aks a multiple of 512 floats (4 gates of
    // 128 units) a block's lines fall in at most two sets of a 64-set first-level cache
    // (one set from 1024 floats on). Measured
    // (AVX2, 2 threads, medians of paired runs): 2048 x 512 x 3200 (dW of an LSTM,
    // H = 512) 1.20x and 1.23x faster copied in two runs; 512 x 512 x 3200 and
    // 1024 x 256 x 4000 0.97x to 1.17x. With the block's rows copied a vector at a time,
    // 512 x 128 x 3200 (H = 128) too: 1.20x faster with the AVX2 copy, 1.08x with the
    // AVX-512 copy (an AMD EPYC model 17, medians of 9 paired runs). At N = 64 and 32 no
    // difference showed. The copy changes no sum: the same bits. (bfloat16 pairs come
    // row-major, from left().)
    const bool copy = aks != 1 && N_ >= kCopyN;
    const int64_t kDepth = copy ? 1024 : aks != 1 ? 256 : (depth_ > 0 ? depth_ : 1);
    const int64_t chunks = M > 0 ? (M + chunk - 1) / chunk : 0;
    for (int64_t k0 = 0; k0 < depth_ || k0 == 0; k0 += kDepth) {
      const int64_t kn = depth_ - k0 < kDepth ? depth_ - k0 : kDepth;
      const bool acc = accumulate || k0 > 0;
      const float* bias0 = k0 == 0 ? bias : nullptr;
      // Threads split the (chunk, panel) tiles of a product of 2^22 flops or more (about
      // 50 us on one thread). Below that one thread does it: a call that comes after an
      // idle pause finds the team's other thread asleep, and waking it costs more than it
      // saves (measured, AVX2, 2 threads, 5 ms pauses: an RNN-tanh layer at T = 100,
      // B = 1, H = 64, whose input projection has 2^19.6 flops, 1.1 ms with the team
      // against 0.38 ms without; warm, 0.07 - 0.09 ms either way).
#pragma omp parallel if (2 * M * N_ * kn * (dot_ ? 2 : 1) >= kTeamFlops)
      {
        PackBuffers::Ptr kept;  // the copy's memory, kept by this thread for its next calls
        if (copy) kept = PackBuffers::take((chunk * kn + kSimdLanes - 1) / kSimdLanes);
        TA* own = reinterpret_cast<TA*>(kept.get());
        int64_t own_q = -1;  // the chunk in own
#pragma omp for collapse(2) schedule(static)
        for (int64_t q = 0; q < chunks; ++q) {
          for (int64_t p = 0; p < panels_; ++p) {
            const int64_t m0 = q * chunk;
            const int64_t rows = M - m0 < chunk ? M - m0 : chunk;
            const TA* Ac = A + m0 * ars + k0 * aks;
            if (copy && own_q != q) {  // block i of r rows at own + i * kn, as [kn][r]
              over_row_blocks(rows, [&](int64_t i, int64_t r) {
                TA* dst = own + i * kn;
                if (ars == 1)  // a row of the block is r consecutive values
                  for (int64_t k = 0; k < kn; ++k)
                    std::memcpy(dst + k * r, Ac + i + k * aks, sizeof(TA) * r);
                else
                  for (int64_t k = 0; k < kn; ++k)
                    for (int64_t j = 0; j < r; ++j) dst[k * r + j] = Ac[(i + j) * ars + k * aks];
              });
              own_q = q;
            }
            float* Cc = C + m0 * ldc;
            const vgf* panel = packed_.get() + p * depth_ * kV + k0 * kV;
            const int64_t n0 = first_column(p), cols = columns(p);
            const float* bp = bias0 ? bias0 + n0 : nullptr;
            over_row_blocks(rows, [&](int64_t i, int64_t r) {  // A from own, or in place
              row_block(r, copy ? own + i * kn : Ac + i * ars, copy ? 1 : ars, copy ? r : aks,
                        panel, Cc + i * ldc + n0, ldc, cols, acc, bp, kn);
            });
          }
        }
      }
      if (depth_ == 0) break;
    }
  }

  // On the matrix units, a block's panels lie side by side: row k2 of every panel of block
  // g forms one row of pairs, [g][depth_][per_block_ * kNR], so that a run of adjacent
  // panels is one operand (row stride per_block_ * kNR pairs); elsewhere each panel is
  // [depth_][kNR]. origin(p): panel p's first pair, in floats (a pair takes one).
  int64_t row_stride() const { return amx_ ? per_block_ * kNR : kNR; }
  int64_t origin(int64_t p) const {
    return amx_ ? (p / per_block_ * depth_ * per_block_ + p % per_block_) * kNR
                : p * depth_ * kNR;
  }

  // Panels per call on the matrix units, at most: 256 columns (one call over the 2048 of
  // an LSTM at H = 512, M = 32, K = 512 ran at 645 GFLOP/s, four of 512 at 1000; calls
  // of 64 - 256 columns at M = 8, K = 256 10 - 15% faster than of 32; one thread, Intel
  // Xeon with AMX). Against a call per panel (2 threads, medians of 9 interleaved rounds),
  // bfloat16 autocast LSTM inference at T = 100, B = 32, H = 128 / 512 and T = 500,
  // B = 8, H = 256 takes 0.93 / 0.85 / 0.92 of the time, training 0.98 / 0.94 / 0.99; the
  // GRU 0.91 - 1.10.
  static constexpr int64_t kGroup = 8;

  // Rows [0, rows) of C's columns of the np adjacent panels [p, p + np) of one block (+)=
  // A (bfloat16 pairs, lda pairs a row) @ those panels, in one call on the matrix units.
  // bias (with accumulate false): written to C first, the products then added to it; or,
  // with after, added to the products' sums once the call has written them, while that
  // block of C is in cache. A large product (tiles_on_units) takes it after: written
  // before, it cost a pass over all of C (9% of the samples of bfloat16 LSTM inference at
  // T = 100, B = 32, H = 512; after, that inference takes 0.93 of the time, the GRU's
  // 0.93, training 0.88 - 0.97; Intel Xeon with AMX, 2 threads, 11 interleaved rounds). A
  // step's product takes it before: after, LSTM training at T = 100, B = 32, H = 128 took
  // 1.16 - 1.44 times as long. An element's sum over k does not depend on the other
  // columns or rows of the call: the same bits however the threads split the panels
  // (tests/test_bf16.py).
  void on_units(const uint32_t* A, int64_t lda, int64_t rows, int64_t p, int64_t np, float* C,
                int64_t ldc, bool accumulate, const float* bias, bool after = false) const {
    const int64_t n0 = first_column(p);
    const int64_t cols = first_column(p + np - 1) + columns(p + np - 1) - n0;
    if (rows <= 0) return;
    if (bias && !accumulate && !after) {
      for (int64_t i = 0; i < rows; ++i)
        std::memcpy(C + i * ldc + n0, bias + n0, sizeof(float) * cols);
      accumulate = true;
      bias = nullptr;
    }
    amx_->gemm(rows, cols, 2 * depth_, 2 * lda, row_stride(), ldc, accumulate,
               reinterpret_cast<const uint16_t*>(A),
               reinterpret_cast<const uint16_t*>(reinterpret_cast<const float*>(packed_.get()) +
                                                 origin(p)),
               C + n0);
    if (bias && !accumulate)
      for (int64_t i = 0; i < rows; ++i) {
        float* c = C + i * ldc + n0;
        for (int64_t j = 0; j < cols; ++j) c[j] += bias[n0 + j];
      }
  }

  // tiles() on the matrix units: chunks of at most 128 rows (whole tiles of 16) by runs of
  // kGroup panels of a block, split across the threads from 2^22 flops.
  void tiles_on_units(const uint32_t* A, int64_t M, int64_t lda, float* C, int64_t ldc,
                      bool accumulate, const float* bias) const {
    const int64_t parts = M > 128 ? (M + 127) / 128 : 1;
    const int64_t chunk = ((M + parts - 1) / parts + 15) / 16 * 16;
    const int64_t chunks = M > 0 ? (M + chunk - 1) / chunk : 0;
    const int64_t groups = (per_block_ + kGroup - 1) / kGroup, blocks = panels_ / per_block_;
#pragma omp parallel if (4 * M * N_ * depth_ >= kTeamFlops)
    {
#pragma omp for collapse(2) schedule(static)
      for (int64_t q = 0; q < chunks; ++q) {
        for (int64_t r = 0; r < blocks * groups; ++r) {
          const int64_t m0 = q * chunk, rows = M - m0 < chunk ? M - m0 : chunk;
          const int64_t j0 = r % groups * kGroup;
          const int64_t np = per_block_ - j0 < kGroup ? per_block_ - j0 : kGroup;
          on_units(A + m0 * lda, lda, rows, r / groups * per_block_ + j0, np, C + m0 * ldc, ldc,
                   accumulate, bias, true);
        }
      }
      amx_->release();
    }
  }

  // acc[v] += a * w[v]: float32 a, or (dot_) a pair of bfloat16 against panel-row pairs.
  static void madd(vgf* acc, float a, const vgf* w) {
    for (int v = 0; v < kV; ++v) acc[v] += a * w[v];
  }
  static void madd(vgf* acc, uint32_t a, const vgf* w) {
    for (int v = 0; v < kV; ++v) acc[v] = dot2(acc[v], a, w[v]);
  }

  // wide<R, Q> for 1 <= q <= kWide.
  template <int R, typename TA>
  void wide_n(int q, const TA* A, int64_t lda, const int64_t* ps, float* C, int64_t ldc,
              bool accumulate, const float* bias) const {
    static_assert(kWide == 4);
    switch (q) {
      case 4: wide<R, 4>(A, lda, ps, C, ldc, accumulate, bias); break;
      case 3: wide<R, 3>(A, lda, ps, C, ldc, accumulate, bias); break;
      case 2: wide<R, 2>(A, lda, ps, C, ldc, accumulate, bias); break;
      default: wide<R, 1>(A, lda, ps, C, ldc, accumulate, bias); break;
    }
  }

  // Rows [0, R) of the Q panels ps[0 .. Q), over all of K. Not inlined: the loops are
  // flattened (kernels_impl.h), and eight shapes of this kernel in every loop of every
  // cell would double the build's compile time; one call runs a whole product.
  template <int R, int Q, typename TA>
  __attribute__((noinline)) void wide(const TA* A, int64_t lda, const int64_t* ps, float* C,
                                      int64_t ldc, bool accumulate, const float* bias) const {
    const vgf* panel[Q];
    int64_t n0[Q], cols[Q];
    vgf acc[Q][R][kV];
    for (int q = 0; q < Q; ++q) {
      panel[q] = packed_.get() + ps[q] * depth_ * kV;
      n0[q] = first_column(ps[q]);
      cols[q] = columns(ps[q]);
      float tmp[kNR] = {};
      if (bias) std::memcpy(tmp, bias + n0[q], sizeof(float) * cols[q]);
      vgf init[kV];
      std::memcpy(init, tmp, sizeof tmp);
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < kV; ++v) acc[q][r][v] = init[v];
    }
    for (int64_t k = 0; k < depth_; ++k) {
      TA a[R];
      for (int r = 0; r < R; ++r) a[r] = A[r * lda + k];
      for (int q = 0; q < Q; ++q) {
        const vgf* w = panel[q] + kV * k;
        for (int r = 0; r < R; ++r) madd(acc[q][r], a[r], w);
      }
    }
    for (int q = 0; q < Q; ++q)
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
  void over_row_blocks(int64_t M, F&& f) const {
    const int64_t mr = rows_;
    for (int64_t i = 0; i < M;) {
      const int64_t left = M - i;
      const int64_t r = left == mr || left >= mr + 4 ? mr : left > mr ? (left + 1) / 2 : left;
      f(i, r);
      i += r;
    }
  }

  // block<rows> for 1 <= rows <= kMR.
  template <typename TA>
  void row_block(int64_t rows, const TA* A, int64_t lda, int64_t aks, const vgf* panel,
                 float* C, int64_t ldc, int64_t cols, bool accumulate,
                 const float* bias = nullptr, int64_t kn = -1) const {
    if (rows == kMR) return block<kMR>(A, lda, aks, panel, C, ldc, cols, accumulate, bias, kn);
    switch (rows) {
      case 11: block<std::min<int64_t>(11, kMR)>(A, lda, aks, panel, C, ldc, cols, accumulate, bias, kn); break;
      case 10: block<std::min<int64_t>(10, kMR)>(A, lda, aks, panel, C, ldc, cols, accumulate, bias, kn); break;
      case 9: block<std::min<int64_t>(9, kMR)>(A, lda, aks, panel, C, ldc, cols, accumulate, bias, kn); break;
      case 8: block<std::min<int64_t>(8, kMR)>(A, lda, aks, panel, C, ldc, cols, accumulate, bias, kn); break;
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

  // kn: the depth of this pass (all of it by default); panel and A point at its first k
  // (or pair of k).
  template <int R, typename TA>
  void block(const TA* A, int64_t lda, int64_t aks, const vgf* panel, float* C, int64_t ldc,
             int64_t cols, bool accumulate, const float* bias = nullptr, int64_t kn = -1) const {
    if (kn < 0) kn = depth_;
    vgf acc[R][kV], init[kV] = {};
    if (bias) {
      float tmp[kNR] = {};
      std::memcpy(tmp, bias, sizeof(float) * cols);
      std::memcpy(init, tmp, sizeof tmp);
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kV; ++v) acc[r][v] = init[v];
    auto sums = [&](auto fetch) {
      for (int64_t k = 0; k < kn; ++k) {
        vgf w[kV];
        if constexpr (decltype(fetch)::value) {  // (an address, never read: past the end too)
          const uintptr_t ahead = uintptr_t(panel + kV * k) + kFetch * kV * sizeof(vgf);
          for (int v = 0; v < kV; ++v)
            __builtin_prefetch(reinterpret_cast<const void*>(ahead + v * sizeof(vgf)), 0, 3);
        }
        for (int v = 0; v < kV; ++v) w[v] = panel[kV * k + v];
        for (int r = 0; r < R; ++r) madd(acc[r], A[r * lda + k * aks], w);
      }
    };
    if (std::is_same_v<TA, float> && fetch_ && kn > kFetch * 4)
      sums(std::true_type{});
    else
      sums(std::false_type{});
    for (int r = 0; r < R; ++r) store(acc[r], C + r * ldc, cols, accumulate);
  }

  // On Intel CPUs (fetch_), where the packed matrix is larger than a core's second-level
  // cache, a float32 panel deeper than 4 kFetch rows (64 KB at K = 512, more than a
  // first-level cache) is prefetched kFetch rows ahead of the sums. Measured on an Intel
  // Xeon with AMX (2 threads, 3 - 4 alternating runs a time, medians of the ratios,
  // against no prefetch, four such times): the GRU at T = 100, B = 32, H = 512 inference
  // 0.90 - 0.97 of the time, training 0.96 - 0.98; at H = 1024 0.83 - 0.97 and 0.91 -
  // 0.98; the LSTM at H = 512 0.98 - 1.04 and 0.95 - 1.02 (the noise); the Elman RNN's 1 MB
  // matrices, not prefetched, 0.99 - 1.05 in the same runs. Prefetching every panel of
  // K = 512 (whatever the matrix's size) read 1.00 - 1.04 for that RNN; 8 and 24 rows ahead
  // about as 64 for the GRU. At K = 128 and 256 (H = 128, and T = 500, B = 8, H = 256) it
  // gained nothing (0.95 - 1.03). Not measured on AMD CPUs: not there. A prefetch changes
  // no sum.
  static constexpr int64_t kFetch = 64;
  bool fetch_ = false;

  // rows per block (at most kMR)
  const int64_t rows_ = kSimdLanes == 16 ? std::min<int64_t>(kMR, std::max<int64_t>(1, gemm_rows())) : kMR;
  int64_t M_, N_, K_, block_, per_block_, panels_;
  bool bf16_, dot_;
  int64_t depth_;  // K, or the pairs of K with dot_
  // The matrix units' product (capability avx512_amx), or nullptr: with dot_, runs of up
  // to kGroup adjacent panels of a block are then multiplied by one call of it (on_units;
  // the packing lays a block's panels side by side, origin()) in place of the vdpbf16ps
  // kernel.
  const MatrixGemm* amx_;
  PackBuffers::Ptr packed_;
};

}  // namespace pyrnn::cpu
