// Bodies of the CPU time loops declared in loops.h; included by kernels.cpp only.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../cells/common.h"
#include "blas.h"
#include "loops.h"
#include "simd.h"

namespace pyrnn::cpu {

template <typename T>
inline bool active(const LoopArgs<T>& p, int64_t t, int64_t b) {
  return p.lengths == nullptr || t < p.lengths[b];
}

// Index of the step that ran just before step t of sequence b, or -1 if t was its first.
template <typename T>
inline int64_t prev_step(const LoopArgs<T>& p, int64_t t, int64_t b) {
  if (!p.reverse) return t - 1;
  const int64_t last = p.lengths ? p.lengths[b] : p.steps;
  return t + 1 < last ? t + 1 : -1;
}

template <class Cell>
constexpr int64_t cell_offset() {  // offset of c_t inside a workspace row, in units of H
  return Cell::kGates + Cell::kSaved;
}

// SIMD type used for the hidden units of a row: 8 float lanes, or none for double.
template <typename T>
struct Lanes {
  using V = T;
  static constexpr int64_t kWidth = 1;
};
template <>
struct Lanes<float> {
  using V = VecF;
  static constexpr int64_t kWidth = VecF::kLanes;
};

// Calls f(V{}, j) over SIMD runs of hidden units, then f(A{}, j) for the tail.
template <typename T, typename A, typename F>
inline void over_units(int64_t H, F&& f) {
  int64_t j = 0;
  if constexpr (Lanes<T>::kWidth > 1) {
    for (; j + Lanes<T>::kWidth <= H; j += Lanes<T>::kWidth) f(typename Lanes<T>::V(0.f), j);
  }
  for (; j < H; ++j) f(A(0), j);
}

// Rows of a step are split across threads when a step has at least this many gate units.
constexpr int64_t kParallelUnits = 8192;

template <typename A>
inline A lane_sum(A a) {
  return a;
}
inline float lane_sum(VecF a) { return hsum(a); }

template <class Cell, typename T, typename A>
void forward_steps(const LoopArgs<T>& p) {
  const int64_t Tn = p.steps, B = p.batch, H = p.hidden, W = p.width;
  const int64_t GH = Cell::kGates * H;
  const bool keep_c = Cell::kHasCell && W >= (cell_offset<Cell>() + 1) * H;
  std::memcpy(p.hT, p.h0, sizeof(T) * B * H);
  if (Cell::kHasCell) std::memcpy(p.cT, p.c0, sizeof(T) * B * H);
  const RecurrentGemm<T> recurrent(int(B), int(GH), int(H), p.w_hh, true);
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = p.reverse ? Tn - 1 - s : s;
    // hg[B, G*H] = h_{t-1}[B, H] @ W_hh^T
    recurrent.run(p.hT, p.hg, false);
#pragma omp parallel for schedule(static) if (B * GH >= kParallelUnits)
    for (int64_t b = 0; b < B; ++b) {
      T* yrow = p.y + (t * B + b) * H;
      T* row = p.ws + (t * B + b) * W;
      if (!active(p, t, b)) {  // zeros, so that the saved workspace is deterministic
        std::memset(yrow, 0, sizeof(T) * H);
        std::memset(row, 0, sizeof(T) * W);
        continue;
      }
      T* h = p.hT + b * H;
      T* c = Cell::kHasCell ? p.cT + b * H : nullptr;
      T* saved = Cell::kSaved ? row + GH : nullptr;
      const T* hg = p.hg + b * GH;
      over_units<T, A>(H, [&](auto zero, int64_t j) {
        using V = decltype(zero);
        Cell::template forward<T, V>(j, H, row, hg, p.b_hh, h, c, h, c, saved);
      });
      std::memcpy(yrow, h, sizeof(T) * H);
      if (keep_c) std::memcpy(row + cell_offset<Cell>() * H, c, sizeof(T) * H);
    }
  }
}

template <class Cell, typename T, typename A>
void backward_steps(const LoopArgs<T>& p) {
  const int64_t Tn = p.steps, B = p.batch, H = p.hidden, W = p.width;
  const int64_t GH = Cell::kGates * H;
  if (p.dhT) std::memcpy(p.dh0, p.dhT, sizeof(T) * B * H);
  else std::memset(p.dh0, 0, sizeof(T) * B * H);
  if (Cell::kHasCell) {
    if (p.dcT) std::memcpy(p.dc0, p.dcT, sizeof(T) * B * H);
    else std::memset(p.dc0, 0, sizeof(T) * B * H);
  }
  const RecurrentGemm<T> recurrent(int(B), int(H), int(GH), p.w_hh, false);
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = p.reverse ? s : Tn - 1 - s;  // the forward order, reversed
#pragma omp parallel for schedule(static) if (B * GH >= kParallelUnits)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t r = t * B + b;
      T* gx = p.gx + r * GH;
      T* gh = p.gh + r * GH;
      T* hprev = p.hprev + r * H;
      if (!active(p, t, b)) {
        std::memset(gx, 0, sizeof(T) * GH);
        if (gh != gx) std::memset(gh, 0, sizeof(T) * GH);
        std::memset(hprev, 0, sizeof(T) * H);
        if (p.norm_h) p.norm_h[r] = T(0);
        if (p.norm_c) p.norm_c[r] = T(0);
        continue;
      }
      const int64_t q = prev_step(p, t, b);
      const T* row = p.ws + r * W;
      const T* saved = Cell::kSaved ? row + GH : nullptr;
      const T* h = p.y + r * H;
      const T* hp = q >= 0 ? p.y + (q * B + b) * H : p.h0 + b * H;
      const T* c = nullptr;
      const T* cp = nullptr;
      if (Cell::kHasCell) {
        c = row + cell_offset<Cell>() * H;
        cp = q >= 0 ? p.ws + (q * B + b) * W + cell_offset<Cell>() * H : p.c0 + b * H;
      }
      std::memcpy(hprev, hp, sizeof(T) * H);
      const T* dy = p.dy + r * H;
      T* dh_state = p.dh0 + b * H;
      T* dc_state = Cell::kHasCell ? p.dc0 + b * H : nullptr;
      A sum_h = 0, sum_c = 0;
      over_units<T, A>(H, [&](auto zero, int64_t j) {
        using V = decltype(zero);
        const V dh = ld<V>(dy + j) + ld<V>(dh_state + j);
        V dc = zero, direct = zero;
        if constexpr (Cell::kHasCell) dc = ld<V>(dc_state + j);
        Cell::template backward<T, V>(j, H, dh, &dc, row, saved, h, hp, c, cp, gx, gh,
                                      &direct, V(A(p.clip)));
        sum_h += lane_sum(dh * dh);
        if constexpr (Cell::kHasCell) {
          sum_c += lane_sum(dc * dc);
          st(dc_state + j, Cell::template carry<T, V>(j, H, dc, row));
        }
        st(dh_state + j, direct);
      });
      if (p.norm_h) p.norm_h[r] = T(std::sqrt(sum_h));
      if (p.norm_c) p.norm_c[r] = T(std::sqrt(sum_c));
    }
    // dh_{t-1} += gh_t[B, G*H] @ W_hh[G*H, H]   (inactive rows of gh_t are zero)
    recurrent.run(p.gh + t * B * GH, p.dh0, true);
  }
}

}  // namespace pyrnn::cpu
