// CPU time loops: the fused forward and BPTT of one layer in one direction, templated
// on the cell (csrc/cells/). Raw pointers only; every buffer is allocated by the
// caller, so the loops allocate nothing, dispatch nothing and never touch Python.
//
// Shapes (one layer, one direction):
//   ws:     [T, B, W]  per-step workspace row; its first G*H entries hold the input
//                      projection on entry and the activated gates on exit, then
//                      Cell::kSaved*H saved values, then (LSTM) c_t
//   y:      [T, B, H]  output; zero at steps past a sequence's length
//   h0, hT: [B, H]     (c0, cT likewise for LSTM)
//   w_hh:   [G*H, H],  b_hh: [G*H] or nullptr
//   lengths:[B] or nullptr: step t of sequence b runs iff t < lengths[b], in either
//           direction, so a reversed sequence starts at its own last step.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../cells/common.h"
#include "blas.h"

namespace pyrnn::cpu {

template <typename T>
struct LoopArgs {
  int64_t steps = 0, batch = 0, hidden = 0, width = 0;  // T, B, H, W
  bool reverse = false;
  const int64_t* lengths = nullptr;
  T* ws = nullptr;
  T* y = nullptr;
  const T* h0 = nullptr;
  const T* c0 = nullptr;
  const T* w_hh = nullptr;
  const T* b_hh = nullptr;
  T* hT = nullptr;   // forward: running h state, then h_n
  T* cT = nullptr;   // forward: running c state, then c_n
  T* hg = nullptr;   // scratch [B, G*H]

  // backward only
  const T* dy = nullptr;    // [T, B, H]
  const T* dhT = nullptr;   // [B, H] or nullptr
  const T* dcT = nullptr;   // [B, H] or nullptr
  T* gx = nullptr;          // [T, B, G*H] gate gradients, input side
  T* gh = nullptr;          // [T, B, G*H] gate gradients, recurrent side (== gx unless GRU)
  T* hprev = nullptr;       // [T, B, H] h_{t-1} of every active step (for dW_hh)
  T* dh0 = nullptr;         // [B, H] running dLoss/dh, then dLoss/dh0
  T* dc0 = nullptr;         // [B, H] running dLoss/dc, then dLoss/dc0
  double clip = 0;          // <= 0: off
  T* norm_h = nullptr;      // [T, B] or nullptr: ||dLoss/dh_t|| per step and sample
  T* norm_c = nullptr;      // [T, B] or nullptr: ||dLoss/dc_t|| (LSTM)
};

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

template <class Cell, typename T, typename A>
void forward_loop(const LoopArgs<T>& p) {
  const int64_t Tn = p.steps, B = p.batch, H = p.hidden, W = p.width;
  const int64_t GH = Cell::kGates * H;
  std::memcpy(p.hT, p.h0, sizeof(T) * B * H);
  if (Cell::kHasCell) std::memcpy(p.cT, p.c0, sizeof(T) * B * H);
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = p.reverse ? Tn - 1 - s : s;
    // hg[B, G*H] = h_{t-1}[B, H] @ W_hh^T
    mm_nt<T>(B, GH, H, p.hT, H, p.w_hh, H, p.hg, GH, false);
    for (int64_t b = 0; b < B; ++b) {
      T* yrow = p.y + (t * B + b) * H;
      if (!active(p, t, b)) {
        std::memset(yrow, 0, sizeof(T) * H);
        continue;
      }
      T* row = p.ws + (t * B + b) * W;
      T* h = p.hT + b * H;
      T* c = Cell::kHasCell ? p.cT + b * H : nullptr;
      T* saved = Cell::kSaved ? row + GH : nullptr;
      const T* hg = p.hg + b * GH;
      for (int64_t j = 0; j < H; ++j)
        Cell::template forward<T, A>(j, H, row, hg, p.b_hh, h, c, h, c, saved);
      std::memcpy(yrow, h, sizeof(T) * H);
      if (Cell::kHasCell && W >= (cell_offset<Cell>() + 1) * H)
        std::memcpy(row + cell_offset<Cell>() * H, c, sizeof(T) * H);
    }
  }
}

template <class Cell, typename T, typename A>
void backward_loop(const LoopArgs<T>& p) {
  const int64_t Tn = p.steps, B = p.batch, H = p.hidden, W = p.width;
  const int64_t GH = Cell::kGates * H;
  const A clip = A(p.clip);
  if (p.dhT) std::memcpy(p.dh0, p.dhT, sizeof(T) * B * H);
  else std::memset(p.dh0, 0, sizeof(T) * B * H);
  if (Cell::kHasCell) {
    if (p.dcT) std::memcpy(p.dc0, p.dcT, sizeof(T) * B * H);
    else std::memset(p.dc0, 0, sizeof(T) * B * H);
  }
  for (int64_t s = 0; s < Tn; ++s) {
    const int64_t t = p.reverse ? s : Tn - 1 - s;  // the forward order, reversed
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
      for (int64_t j = 0; j < H; ++j) {
        const A dh = A(dy[j]) + A(dh_state[j]);
        sum_h += dh * dh;
        A dc = Cell::kHasCell ? A(dc_state[j]) : A(0);
        A direct = 0;
        Cell::template backward<T, A>(j, H, dh, &dc, row, saved, h, hp, c, cp, gx, gh,
                                      &direct, clip);
        if constexpr (Cell::kHasCell) {
          sum_c += dc * dc;
          dc_state[j] = T(Cell::template carry<T, A>(j, H, dc, row));
        }
        dh_state[j] = T(direct);
      }
      if (p.norm_h) p.norm_h[r] = T(std::sqrt(sum_h));
      if (p.norm_c) p.norm_c[r] = T(std::sqrt(sum_c));
    }
    // dh_{t-1} += gh_t[B, G*H] @ W_hh[G*H, H]   (inactive rows of gh_t are zero)
    mm_nn<T>(B, H, GH, p.gh + t * B * GH, GH, p.w_hh, H, p.dh0, H, true);
  }
}

}  // namespace pyrnn::cpu
