// Bodies of the CPU time loops declared in loops.h; included by kernels_impl.h only.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>

#include <omp.h>

#include "../cells/common.h"
#include "../cells/ln_lstm.h"
#include "blas.h"
#include "loops.h"
#include "simd.h"

namespace pyrnn::cpu {

template <typename T>
inline bool active(const LayerArgs<T>& p, int64_t t, int64_t b) {
  return p.lengths == nullptr || t < p.lengths[b];
}

// With lengths sorted longest first (PackedSequence order), the sequences still running
// at step t are a prefix of the batch: the products of a step then skip the rest.
template <typename T>
inline bool prefix_active(const LayerArgs<T>& p) {
  if (!p.lengths) return false;
  for (int64_t b = 1; b < p.batch; ++b)
    if (p.lengths[b] > p.lengths[b - 1]) return false;
  return true;
}
template <typename T>
inline int64_t rows_running(const LayerArgs<T>& p, bool prefix, int64_t t) {
  int64_t n = p.batch;
  if (prefix)
    while (n > 0 && p.lengths[n - 1] <= t) --n;
  return n;
}

// Index of the step that ran just before step t of sequence b, or -1 if t was its first.
template <typename T>
inline int64_t prev_step(const LayerArgs<T>& p, int64_t t, int64_t b) {
  if (!p.reverse) return t - 1;
  const int64_t last = p.lengths ? p.lengths[b] : p.steps;
  return t + 1 < last ? t + 1 : -1;
}

template <class Cell>
constexpr int64_t cell_offset() {  // offset of c_t inside a workspace row, in units of H
  return Cell::kGates + Cell::kSaved;
}

// SIMD type used for the hidden units of a row: VecF for float, none for double.
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

// Calls f(V{}, j) over SIMD runs of the hidden units [u0, u1), then f(A{}, j) for the tail.
template <typename T, typename A, typename F>
inline void over_units(int64_t u0, int64_t u1, F&& f) {
  int64_t j = u0;
  if constexpr (Lanes<T>::kWidth > 1) {
    for (; j + Lanes<T>::kWidth <= u1; j += Lanes<T>::kWidth) f(typename Lanes<T>::V(0.f), j);
  }
  for (; j < u1; ++j) f(A(0), j);
}
template <typename T, typename A, typename F>
inline void over_units(int64_t H, F&& f) {
  over_units<T, A>(0, H, f);
}

// BPTT's running gradients start as the incoming ones: dh0 [B, P] = dLoss/dh_n and, for
// a cell with a cell state, dc0 [B, H] = dLoss/dc_n (zero where they are not given).
template <typename T>
inline void start_grads(const BackwardArgs<T>& p, int64_t P, bool has_cell) {
  const int64_t B = p.batch, H = p.hidden;
  if (p.dh_n) std::memcpy(p.dh0, p.dh_n, sizeof(T) * B * P);
  else std::memset(p.dh0, 0, sizeof(T) * B * P);
  if (has_cell) {
    if (p.dc_n) std::memcpy(p.dc0, p.dc_n, sizeof(T) * B * H);
    else std::memset(p.dc0, 0, sizeof(T) * B * H);
  }
}

// Runs body(nt, id) on a team of OpenMP threads (nt of them, id = 0 .. nt-1), or with
// team false on this thread alone (nt = 1): the loops below are written as such a body,
// which meets the other threads at barriers.
template <class F>
inline void run_team(bool team, F&& body) {
  if (team) {
#pragma omp parallel
    body(omp_get_num_threads(), omp_get_thread_num());
  } else {
    body(1, 0);
  }
}

template <typename A>
inline A lane_sum(A a) {
  return a;
}
inline float lane_sum(VecF a) { return hsum(a); }

// A barrier that a thread may pass through in two halves: arrive() says that its part of
// a step is written, wait() returns once every thread of the team has arrived as often as
// this one; in between, a thread does work of its own that no other thread reads (the
// forward projects the next step's inputs there). It spins, and yields the core after a
// while (a team with more threads than cores).
class SplitBarrier {
 public:
  explicit SplitBarrier(int64_t threads) : threads_(threads) {}
  void arrive() { count_.fetch_add(1, std::memory_order_release); }
  // round: how many times this thread has arrived
  void wait(int64_t round) const {
    const int64_t goal = round * threads_;
    for (int spins = 0; count_.load(std::memory_order_acquire) < goal;) {
      if (spins < kSpins) {
        ++spins;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  static constexpr int kSpins = 1 << 14;
  const int64_t threads_;
  std::atomic<int64_t> count_{0};
};

// Whether a team of nt threads splits the time loops by batch rows rather than by hidden
// units: float32 without a projection, each thread with four rows or more. Each thread
// then runs every unit of its rows, and the threads share no data within a step: no
// barriers, and no lines of h that one thread writes and another reads. Split by units,
// every step exchanges h_{t-1} (or the gate gradients) between the threads and waits at
// a barrier. The products' sums do not depend on the split (each element of C is summed
// over k in order by the same kernel): the same bits. Each thread reads all of the
// weights at every step instead of its share of them, which costs where a thread has
// few rows and the weights leave the second-level cache. Measured (AMD EPYC model 17,
// 2 threads, medians of 9 - 41 interleaved rounds in one process, time split by rows
// against by units): T = 100, B = 32, H = 128: LSTM inference 0.90 - 0.92, training
// 0.86 - 0.88; GRU 0.73 and 0.93; Elman RNN 0.80 and 0.85; the LSTM with bfloat16
// products 0.66 and 0.74; H = 512: LSTM inference 0.94, training 1.00. Four rows per
// thread: T = 500, B = 8, H = 256: LSTM inference 0.82, training 0.87, GRU inference
// 0.85, Elman RNN 0.95 (with the AVX2 copy: LSTM inference 0.98, GRU training 0.87);
// B = 8, H = 512 and 1024: LSTM inference 0.92 and 0.99, Elman RNN training at 1024
// 0.94. Two rows per thread: B = 4, H = 256 0.93 - 0.96, but H = 512 1.12 and 1024 1.23;
// one row, B = 2, H = 512: 1.33. On that machine the split by units ran, for seconds at
// a time, no faster on two threads than on one (the stores of h_t and the barrier's
// atomic add stalled on lines the other core held), where the split by rows kept its
// speed. weights: the floats of the matrices a step multiplies by. With many threads,
// the split by rows reads them nt times over at every step: it is taken where they take
// 1 MB or less, or nt copies of them 32 MB or less (a last-level cache) while a thread's
// share of them would not fit in a core's second-level cache either (on that EPYC,
// 512 KB; only two threads were measured). Where the share fits in it and the whole does
// not, each thread keeps its share there split by units. On an Intel Xeon with AMX (2 MB
// second-level caches per core, 2 threads, medians of 11 interleaved rounds, split by
// units against by rows): T = 500, B = 8, H = 256 (2 MB of weights with the input
// projection in the loop): LSTM inference 0.62, training 0.87, GRU (1.5 MB) inference
// 0.77, training 0.98; T = 100, B = 32, H = 128 (512 KB): 1.05 - 1.28 (the split by rows
// stays); H = 512 (8 MB, a 4 MB share): LSTM inference 0.88, training 0.99 (not taken).
// units: the products run on the matrix units, whose packed weights take 2 bytes each:
// at H = 512 (2 MB) LSTM inference 0.89, training 0.95; at H = 128 and 256 (1 MB or
// less) the split by rows stays 0.79 - 0.97 of the time by units.
template <typename T, bool proj>
inline bool by_rows(int64_t B, int64_t nt, int64_t weights, bool units = false) {
  if constexpr (std::is_same_v<T, float> && !proj) {
    const int64_t bytes = weights * int64_t(units ? 2 : sizeof(float));
    const bool share_fits = nt > 0 && bytes / nt <= second_level_cache();
    const bool fit = bytes <= (int64_t(1) << 20) ||
                     (!share_fits && nt * bytes <= (int64_t(32) << 20));
    return nt > 1 && B >= nt * 4 && fit;
  } else {
    return false;
  }
}

// The forward with one team of threads for the whole sequence (float32; float64 runs it
// on one thread). Split by rows (by_rows), each thread runs the steps of its batch rows
// alone. Split by units, each thread owns a
// slice of hidden units [u0, u1) across all gate blocks: per step it computes the
// recurrent product for its columns, then the pointwise update of its units, then meets
// the others at one barrier (every thread reads all of h_{t-1}).
// With a projection (p.proj = P > 0, a cell with kProjection) the cell writes
// m_t = o * tanh(c_t) for its units, and a second phase after a barrier computes
// h_t = m_t W_hr^T, each thread for its own slice [v0, v1) of the P columns.
template <class Cell, typename T, bool proj>
void forward_steps_of(const ForwardArgs<T>& p) {
  const int64_t Tn = p.steps, B = p.batch, H = p.hidden, W = p.width;
  const int64_t G = Cell::kGates, GH = G * H;
  const int64_t P = proj ? p.proj : H;  // the width of h
  const bool keep_c = Cell::kHasCell && W >= (cell_offset<Cell>() + 1) * H;
  std::memcpy(p.h_n, p.h0, sizeof(T) * B * P);
  if (Cell::kHasCell) std::memcpy(p.c_n, p.c0, sizeof(T) * B * H);
  // Without a projection and without lengths, h_t is written straight into its rows of
  // the output y and h_{t-1} read from there (no copy of h into y at every step); with
  // lengths, a finished row keeps its state while its output is zero, so h lives in two
  // buffers of its own.
  const bool in_y = !proj && !p.lengths;
  std::unique_ptr<T[]> other(in_y ? nullptr : new T[B * P + 1]);
  T* bufs[2] = {p.h_n, other.get()};
  const StepGemm<T> gemm(B, GH, P, p.w_hh, true, H);
  // h_t[B, P] = m_t[B, H] @ W_hr^T (projection), in panels of the P columns
  std::unique_ptr<StepGemm<T>> pgemm;
  if (proj) pgemm.reset(new StepGemm<T>(B, P, H, p.w_hr, true, P));
  // The input projection, when the loop computes it (float32): the same panel layout, so
  // each thread projects the columns of its own units, one step ahead (split, below).
  std::unique_ptr<PackedGemm> xgemm;
  if constexpr (std::is_same_v<T, float>) {
    if (p.project) xgemm.reset(new PackedGemm(B, GH, p.input, p.w_ih, true, H));
  }
  const int64_t per = gemm.panels_per_block();
  const int64_t pper = proj ? pgemm->panels_per_block() : 0;
  const bool prefix = prefix_active(p);
  // One thread when the step is small, and for float64 (whose BLAS must not be called
  // from inside a parallel region: it would start a nested team on every call).
  const bool team = per > 1 && 2 * B * GH * (P + p.input * p.project) >= (1 << 19);
  // With the input projection in the loop, a step ends in a split barrier: a thread
  // arrives once its units of h_t are written, projects the next step's inputs for its
  // own columns (which no other thread reads), and then waits for the team, so that the
  // projection fills the time it would have waited for a slower thread.
  std::unique_ptr<SplitBarrier> split;
  // The rows of step t in ws: those of one step, reused, where the loop projects the
  // inputs of a forward that saves nothing.
  auto ws_step = [&](int64_t t) { return p.project && !p.every_step ? int64_t(0) : t; };
  auto body = [&](int64_t nt, int64_t id) {
    const bool rows_split =
        by_rows<T, proj>(B, nt, GH * (P + (xgemm ? p.input : 0)), gemm.on_units());
    // this thread's units [u0, u1) (their panels [q0, q1) of each gate block) of the batch
    // rows [b0, b1)
    const int64_t q0 = rows_split ? 0 : per * id / nt, q1 = rows_split ? per : per * (id + 1) / nt;
    const int64_t u0 = std::min(q0 * gemm.panel_width(), H);
    const int64_t u1 = std::min(q1 * gemm.panel_width(), H);
    const int64_t b0 = rows_split ? B * id / nt : 0, b1 = rows_split ? B * (id + 1) / nt : B;
    auto my_rows = [&](int64_t t) {  // those of [b0, b1) that run at step t
      return std::max<int64_t>(0, std::min(rows_running(p, prefix, t), b1) - b0);
    };
    const int64_t pq0 = pper * id / nt, pq1 = pper * (id + 1) / nt;
    const int64_t v0 = proj ? std::min(pq0 * pgemm->panel_width(), P) : 0;
    const int64_t v1 = proj ? std::min(pq1 * pgemm->panel_width(), P) : 0;
    // ws[0, :, my columns] = x_t @ W_ih^T + b_ih for step s (project)
    auto project = [&](int64_t s) {
      if constexpr (std::is_same_v<T, float>) {
        const int64_t t = p.reverse ? Tn - 1 - s : s;
        xgemm->run_panels(p.x + (t * B + b0) * p.input, my_rows(t), p.input,
                          p.ws + (ws_step(t) * B + b0) * W, W, false, q0, q1, p.b_ih, true);
      }
    };
    if (xgemm) {  // (the same for every thread of the team)
      if (!rows_split) {
#pragma omp single
        split.reset(new SplitBarrier(nt));  // (the single's barrier publishes it)
      }
      project(0);
    }
    for (int64_t s = 0; s < Tn; ++s) {
      const int64_t t = p.reverse ? Tn - 1 - s : s;
      const T* hcur = !in_y    ? bufs[s % 2]
                      : s == 0 ? p.h0
                               : p.y + (p.reverse ? t + 1 : t - 1) * B * P;
      T* hnext = in_y ? p.y + t * B * P : bufs[(s + 1) % 2];
      const int64_t rows = rows_running(p, prefix, t);
      // hg[my rows, my columns of every gate] = h_{t-1} @ W_hh^T
      gemm.run_panels(hcur + b0 * P, my_rows(t), P, p.hg + b0 * GH, GH, false, q0, q1, true);
      for (int64_t b = b0; b < b1 && u1 > u0; ++b) {
        T* yrow = p.y + (t * B + b) * P;
        T* row = p.ws + (ws_step(t) * B + b) * W;
        // the cell's output: h_t, or m_t with a projection
        T* h = proj ? p.m + b * H : hnext + b * H;
        if (!active(p, t, b)) {  // state unchanged, zero output and workspace
          if (!proj) {
            std::memcpy(h + u0, hcur + b * H + u0, sizeof(T) * (u1 - u0));
            std::memset(yrow + u0, 0, sizeof(T) * (u1 - u0));
          }
          for (int64_t k = 0; k < W / H; ++k) std::memset(row + k * H + u0, 0, sizeof(T) * (u1 - u0));
          continue;
        }
        T* c = Cell::kHasCell ? p.c_n + b * H : nullptr;
        const FwdRow<T> r{H, row, p.hg + b * GH, p.b_hh, proj ? nullptr : hcur + b * H, h, c,
                          Cell::kSaved ? row + GH : nullptr, p.k};
        over_units<T, T>(u0, u1, [&](auto zero, int64_t j) {
          using V = decltype(zero);
          Cell::template forward<T, V>(r, j);
          if (!proj && !in_y) st(yrow + j, ld<V>(h + j));
        });
        if (keep_c) std::memcpy(row + cell_offset<Cell>() * H + u0, c + u0, sizeof(T) * (u1 - u0));
      }
      if (proj) {
#pragma omp barrier
        // h_t[:, my columns] = m_t @ W_hr^T; where t is inactive the state stays
        pgemm->run_panels(p.m, rows, H, hnext, P, false, pq0, pq1);
        for (int64_t b = 0; b < B && v1 > v0; ++b) {
          T* yrow = p.y + (t * B + b) * P;
          if (active(p, t, b)) {
            std::memcpy(yrow + v0, hnext + b * P + v0, sizeof(T) * (v1 - v0));
          } else {
            std::memcpy(hnext + b * P + v0, hcur + b * P + v0, sizeof(T) * (v1 - v0));
            std::memset(yrow + v0, 0, sizeof(T) * (v1 - v0));
          }
        }
      }
      if (split) {
        split->arrive();
        if (s + 1 < Tn) project(s + 1);
        split->wait(s + 1);
      } else if (rows_split) {
        if (xgemm && s + 1 < Tn) project(s + 1);
      } else {
#pragma omp barrier
      }
    }
  };
  run_team(team, body);
  if (in_y && Tn > 0)
    std::memcpy(p.h_n, p.y + (p.reverse ? 0 : Tn - 1) * B * P, sizeof(T) * B * P);
  else if (!in_y && Tn % 2) std::memcpy(p.h_n, bufs[1], sizeof(T) * B * P);
}

// BPTT with one team of threads (float32; float64 on one thread), split like the
// forward. By rows, each thread runs its batch rows alone (their norms summed in the
// same order of panels). By units, a thread owns the hidden units [u0, u1), so the
// pointwise backward of its units reads the dh it produced itself in the step before.
// One barrier per step, before the recurrent product (which reads every unit's gate
// gradients). The norms are summed per panel of units (fixed by H, not by the threads),
// double-buffered, and the panels' sums added in order after that barrier: the same bits
// for any number of threads.
// With a projection (P > 0) each step first forms the total dLoss/dh_t [P] per batch
// row (rows split between the threads; its norm in one thread), then, after a barrier,
// dm_t = dh_t W_hr for the thread's units, on which the cell runs; the recurrent product
// then gives dLoss/dh_{t-1} [P] for the thread's slice of the P columns, and a barrier
// ends the step (the next one reads whole rows of it).
template <class Cell, typename T, bool proj>
void backward_steps_of(const BackwardArgs<T>& p) {
  const int64_t Tn = p.steps, B = p.batch, H = p.hidden, W = p.width;
  const int64_t G = Cell::kGates, GH = G * H;
  const int64_t P = proj ? p.proj : H;  // the width of h
  start_grads(p, P, Cell::kHasCell);
  // dh[B, P] += gh[B, G*H] @ W_hh
  const StepGemm<T> gemm(B, P, GH, p.w_hh, false, P);
  // dm[B, H] = dh_t[B, P] @ W_hr (projection); its panels are then the threads' units
  std::unique_ptr<StepGemm<T>> mgemm;
  if (proj) mgemm.reset(new StepGemm<T>(B, H, P, p.w_hr, false, H));
  const StepGemm<T>& units = proj ? *mgemm : gemm;
  const int64_t per = units.panels_per_block(), pw = units.panel_width();
  const int64_t dper = gemm.panels_per_block();
  const bool prefix = prefix_active(p);
  const bool record = p.norm_h != nullptr;
  // partial sums of squares: [2 buffers][panel][h, c][B]
  std::unique_ptr<T[]> part(new T[2 * per * 2 * B + 1]);
  // One thread when the step is small, and for float64 (whose BLAS must not be called
  // from inside a parallel region: it would start a nested team on every call).
  const bool team = per > 1 && 2 * B * GH * P >= (1 << 19);
  auto body = [&](int64_t nt, int64_t id) {
    const bool rows_split = by_rows<T, proj>(B, nt, GH * P, gemm.on_units());
    const int64_t q0 = rows_split ? 0 : per * id / nt, q1 = rows_split ? per : per * (id + 1) / nt;
    const int64_t u0 = std::min(q0 * pw, H);
    const int64_t u1 = std::min(q1 * pw, H);
    const int64_t n = u1 - u0;
    const int64_t dq0 = rows_split ? 0 : dper * id / nt;
    const int64_t dq1 = rows_split ? dper : dper * (id + 1) / nt;
    const int64_t b0 = B * id / nt, b1 = B * (id + 1) / nt;
    // the batch rows of this thread's units: all of them, or [b0, b1)
    const int64_t r0 = rows_split ? b0 : 0, r1 = rows_split ? b1 : B;
    for (int64_t s = 0; s < Tn; ++s) {
      const int64_t t = p.reverse ? s : Tn - 1 - s;  // the forward order, reversed
      T* buf = part.get() + (s % 2) * per * 2 * B;
      const int64_t rows = rows_running(p, prefix, t);
      if (proj) {
        // total dLoss/dh_t = output path + recurrent path, its norm, and h_{t-1}; the
        // running dh starts over (no path to h_{t-1} but through W_hh)
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t r = t * B + b;
          T* d = p.dhtot + r * P;
          T* hprev = p.hprev + r * P;
          if (!active(p, t, b)) {
            std::memset(d, 0, sizeof(T) * P);
            std::memset(hprev, 0, sizeof(T) * P);
            if (record) p.norm_h[r] = T(0);
            continue;
          }
          const int64_t q = prev_step(p, t, b);
          std::memcpy(hprev, q >= 0 ? p.y + (q * B + b) * P : p.h0 + b * P, sizeof(T) * P);
          const T* dy = p.dy + r * P;
          T* dh = p.dh0 + b * P;
          T sum = 0;
          for (int64_t j = 0; j < P; ++j) {
            d[j] = dy[j] + dh[j];
            sum += d[j] * d[j];
          }
          if (record) p.norm_h[r] = std::sqrt(sum);
          std::memset(dh, 0, sizeof(T) * P);
        }
#pragma omp barrier
        // dm_t[:, my units] = dh_t @ W_hr
        mgemm->run_panels(p.dhtot + t * B * P, rows, P, p.dm, H, false, q0, q1);
      }
      for (int64_t b = r0; b < r1; ++b) {
        const int64_t r = t * B + b;
        T* gx = p.gx + r * GH;
        T* gh = p.gh + r * GH;
        if (record)
          for (int64_t q = q0; q < q1; ++q) buf[q * 2 * B + b] = buf[q * 2 * B + B + b] = T(0);
        if (n <= 0) continue;
        if (!active(p, t, b)) {
          for (int64_t g = 0; g < G; ++g) {
            std::memset(gx + g * H + u0, 0, sizeof(T) * n);
            if (Cell::kSplitGrad) std::memset(gh + g * H + u0, 0, sizeof(T) * n);
          }
          if (proj) std::memset(p.mall + r * H + u0, 0, sizeof(T) * n);
          else std::memset(p.hprev + r * H + u0, 0, sizeof(T) * n);
          continue;
        }
        const int64_t q = prev_step(p, t, b);
        const T* row = p.ws + r * W;
        const T* hp = proj ? nullptr : q >= 0 ? p.y + (q * B + b) * H : p.h0 + b * H;
        const T* c = nullptr;
        const T* cp = nullptr;
        if (Cell::kHasCell) {
          c = row + cell_offset<Cell>() * H;
          cp = q >= 0 ? p.ws + (q * B + b) * W + cell_offset<Cell>() * H : p.c0 + b * H;
        }
        const BwdRow<T> cr{H, row, Cell::kSaved ? row + GH : nullptr,
                           proj ? nullptr : p.y + r * H, hp, c, cp,
                           gx, Cell::kSplitGrad ? gh : nullptr, p.k, p.clip};
        if (!proj) std::memcpy(p.hprev + r * H + u0, hp + u0, sizeof(T) * n);
        const T* dy = proj ? nullptr : p.dy + r * H;
        const T* dm = proj ? p.dm + b * H : nullptr;
        T* mrow = proj ? p.mall + r * H : nullptr;
        T* dh_state = p.dh0 + b * P;
        T* dc_state = Cell::kHasCell ? p.dc0 + b * H : nullptr;
        // one panel at a time when recording (its sums go to its own slot), else all units
        for (int64_t v0 = u0; v0 < u1; v0 += record ? pw : n) {
          const int64_t v1 = std::min(u1, v0 + (record ? pw : n));
          T sum_h = 0, sum_c = 0;
          over_units<T, T>(v0, v1, [&](auto zero, int64_t j) {
            using V = decltype(zero);
            const V dh = proj ? ld<V>(dm + j) : ld<V>(dy + j) + ld<V>(dh_state + j);
            V dc = zero, direct = zero;
            if constexpr (Cell::kHasCell) dc = ld<V>(dc_state + j);
            Cell::template backward<T, V>(cr, j, dh, dc, direct);
            if (record) sum_h += lane_sum(dh * dh);
            if constexpr (Cell::kHasCell) {
              if (record) sum_c += lane_sum(dc * dc);
              st(dc_state + j, Cell::template carry<T, V>(cr, j, dc));
            }
            if constexpr (Cell::kProjection) {
              if (proj) st(mrow + j, Cell::template output<T, V>(cr, j));
            }
            if (!proj) st(dh_state + j, direct);
          });
          if (record) {
            T* slot = buf + v0 / pw * 2 * B;
            slot[b] = sum_h;
            slot[B + b] = sum_c;
          }
        }
      }
      if (!rows_split) {
#pragma omp barrier
      }
      if (record && (rows_split || id == 0)) {
        for (int64_t b = r0; b < r1; ++b) {
          T sh = 0, sc = 0;
          for (int64_t q = 0; q < per; ++q) {
            sh += buf[q * 2 * B + b];
            sc += buf[q * 2 * B + B + b];
          }
          if (!proj) p.norm_h[t * B + b] = std::sqrt(sh);
          if (p.norm_c) p.norm_c[t * B + b] = std::sqrt(sc);
        }
      }
      // dh_{t-1}[:, my columns] += gh_t[B, G*H] @ W_hh[:, my columns]  (inactive rows are 0)
      const int64_t mine = std::max<int64_t>(0, std::min(rows, r1) - r0);
      gemm.run_panels(p.gh + (t * B + r0) * GH, mine, GH, p.dh0 + r0 * P, P, true, dq0, dq1);
      if (p.u_out && n > 0)  // an Elman cell leaves 0 in dh before the product (direct)
        for (int64_t b = r0; b < r1; ++b) {
          T* dst = p.u_out + (t * B + b) * H + u0;
          if (active(p, t, b)) std::memcpy(dst, p.dh0 + b * H + u0, sizeof(T) * n);
          else std::memset(dst, 0, sizeof(T) * n);
        }
      if (proj) {
#pragma omp barrier
      }
    }
  };
  run_team(team, body);
}

// The loops above with the projection as a compile-time choice, so that the loops
// without one carry none of its branches.
template <class Cell, typename T>
void forward_steps(const ForwardArgs<T>& p) {
  if constexpr (Cell::kProjection) {
    if (p.proj > 0) return forward_steps_of<Cell, T, true>(p);
  }
  forward_steps_of<Cell, T, false>(p);
}
template <class Cell, typename T>
void backward_steps(const BackwardArgs<T>& p) {
  if constexpr (Cell::kProjection) {
    if (p.proj > 0) return backward_steps_of<Cell, T, true>(p);
  }
  backward_steps_of<Cell, T, false>(p);
}

// The row context of a row cell (cells/ln_lstm.h) on the CPU: one thread runs a whole
// row, SIMD over its units. The sums accumulate in double (per lane, the lanes added at
// the end), also for float32: the layer norms' backward subtracts means of products
// from values of similar size and multiplies the difference by 1/sigma, so float32 sums
// would lose digits that the float32 reference keeps (tests/test_ln_lstm.py). The order
// is fixed by the row's length: the same bits for any number of threads.
template <typename T>
struct CpuRow {
  using S = double;
  template <class F>
  void each(int64_t n, F&& f) const {
    over_units<T, T>(0, n, f);
  }
  template <class F>
  double sum(int64_t n, F&& f) const {
    double tail = 0.0;
    if constexpr (std::is_same_v<T, float>) {
      v8d lanes = v8d{} + 0.0;
      over_units<T, T>(0, n, [&](auto z, int64_t j) {
        if constexpr (std::is_same_v<decltype(z), T>) tail += double(f(z, j));
        else lanes += widen(f(z, j));
      });
      return hsum(lanes) + tail;
    } else {
      over_units<T, T>(0, n, [&](auto z, int64_t j) { tail += f(z, j); });
      return tail;
    }
  }
};

// The forward of a row cell. A step is two phases with a barrier after each: the
// recurrent product hg = h_{t-1} W_hh^T, split by columns as in forward_steps; then the
// rows, split by batch rows (a row's mean and variance stay in one thread; rows do not
// depend on each other within a step).
template <class Cell, typename T>
void forward_rows(const ForwardArgs<T>& p) {
  const int64_t Tn = p.steps, B = p.batch, H = p.hidden, W = p.width;
  const int64_t G = Cell::kGates, GH = G * H;
  const bool keep_c = W >= (cell_offset<Cell>() + 1) * H;
  std::memcpy(p.h_n, p.h0, sizeof(T) * B * H);
  std::memcpy(p.c_n, p.c0, sizeof(T) * B * H);
  std::unique_ptr<T[]> other(new T[B * H + 1]);
  T* bufs[2] = {p.h_n, other.get()};
  const StepGemm<T> gemm(B, GH, H, p.w_hh, true, H);
  const int64_t per = gemm.panels_per_block();
  const bool prefix = prefix_active(p);
  const bool team = per > 1 && 2 * B * GH * H >= (1 << 19);
  auto body = [&](int64_t nt, int64_t id) {
    const int64_t q0 = per * id / nt, q1 = per * (id + 1) / nt;
    const int64_t b0 = B * id / nt, b1 = B * (id + 1) / nt;
    const CpuRow<T> x;
    for (int64_t s = 0; s < Tn; ++s) {
      const int64_t t = p.reverse ? Tn - 1 - s : s;
      const T* hcur = bufs[s % 2];
      T* hnext = bufs[(s + 1) % 2];
      const int64_t rows = rows_running(p, prefix, t);
      // hg[:, my columns of every gate] = h_{t-1} @ W_hh^T
      gemm.run_panels(hcur, rows, H, p.hg, GH, false, q0, q1, true);
#pragma omp barrier
      for (int64_t b = b0; b < b1; ++b) {
        T* yrow = p.y + (t * B + b) * H;
        T* row = p.ws + (t * B + b) * W;
        T* h = hnext + b * H;
        if (!active(p, t, b)) {  // state unchanged, zero output and workspace
          std::memcpy(h, hcur + b * H, sizeof(T) * H);
          std::memset(yrow, 0, sizeof(T) * H);
          std::memset(row, 0, sizeof(T) * W);
          continue;
        }
        T* c = p.c_n + b * H;
        const FwdRow<T> r{H, row, p.hg + b * GH, p.b_hh, hcur + b * H, h, c, row + GH, p.k, p.cw};
        Cell::template forward_row<T>(r, x);
        std::memcpy(yrow, h, sizeof(T) * H);
        if (keep_c) std::memcpy(row + cell_offset<Cell>() * H, c, sizeof(T) * H);
      }
#pragma omp barrier
    }
  };
  run_team(team, body);
  if (Tn % 2) std::memcpy(p.h_n, bufs[1], sizeof(T) * B * H);
}

// BPTT of a row cell, in the same two phases per step: the rows' backward split by batch
// rows (each writes its gx, gh, dnorm, its running dc, zero into its dh, and its norms),
// then dh_{t-1} += gh_t @ W_hh split by columns.
template <class Cell, typename T>
void backward_rows(const BackwardArgs<T>& p) {
  const int64_t Tn = p.steps, B = p.batch, H = p.hidden, W = p.width;
  const int64_t G = Cell::kGates, GH = G * H;
  start_grads(p, H, true);
  const StepGemm<T> gemm(B, H, GH, p.w_hh, false, H);  // dh[B, H] += gh[B, G*H] @ W_hh
  const int64_t per = gemm.panels_per_block();
  const bool prefix = prefix_active(p);
  const bool team = per > 1 && 2 * B * GH * H >= (1 << 19);
  auto body = [&](int64_t nt, int64_t id) {
    const int64_t q0 = per * id / nt, q1 = per * (id + 1) / nt;
    const int64_t b0 = B * id / nt, b1 = B * (id + 1) / nt;
    const CpuRow<T> x;
    for (int64_t s = 0; s < Tn; ++s) {
      const int64_t t = p.reverse ? s : Tn - 1 - s;  // the forward order, reversed
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r = t * B + b;
        T* gx = p.gx + r * GH;
        T* gh = p.gh + r * GH;
        T* hprev = p.hprev + r * H;
        T* dn = p.dnorm + r * H;
        if (!active(p, t, b)) {
          std::memset(gx, 0, sizeof(T) * GH);
          std::memset(gh, 0, sizeof(T) * GH);
          std::memset(hprev, 0, sizeof(T) * H);
          std::memset(dn, 0, sizeof(T) * H);
          continue;
        }
        const int64_t q = prev_step(p, t, b);
        const T* row = p.ws + r * W;
        const T* hp = q >= 0 ? p.y + (q * B + b) * H : p.h0 + b * H;
        const T* c = row + cell_offset<Cell>() * H;
        const T* cp = q >= 0 ? p.ws + (q * B + b) * W + cell_offset<Cell>() * H : p.c0 + b * H;
        std::memcpy(hprev, hp, sizeof(T) * H);
        const BwdRow<T> cr{H, row, row + GH, p.y + r * H, hp, c, cp, gx, gh, p.k, p.clip, p.cw};
        const RowGrad<T, T> d{p.dy + r * H, p.dh0 + b * H, p.dc0 + b * H, dn};
        typename CpuRow<T>::S sum_h = 0, sum_c = 0;
        Cell::template backward_row<T>(cr, d, x, sum_h, sum_c);
        if (p.norm_h) p.norm_h[r] = T(std::sqrt(sum_h));
        if (p.norm_c) p.norm_c[r] = T(std::sqrt(sum_c));
      }
#pragma omp barrier
      // dh_{t-1}[:, my units] += gh_t[B, G*H] @ W_hh[:, my units]  (inactive rows are zero)
      gemm.run_panels(p.gh + t * B * GH, rows_running(p, prefix, t), GH, p.dh0, H, true, q0, q1);
#pragma omp barrier
    }
  };
  run_team(team, body);
}

}  // namespace pyrnn::cpu
