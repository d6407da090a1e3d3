// The ATen-facing layer: op schemas, argument checks, dtype dispatch, allocation and
// the matrix products outside the time loop. One pybind11 module for the package.
//
// Ops (one layer, one direction):
//   pyrnn::forward  -> (output [T, B, P], h_n [B, P], c_n [B, H] or [0], workspace)
//   pyrnn::backward -> (grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh,
//                       grad_bias_ih, grad_bias_hh, grad_weight_hr, grad_norms [2, T, B],
//                       vanishing ratio [T, B], vanishing omega [], grad_cell_weight)
// mode names a cell of the registry (cells/registry.h; pyrnn._C.cells() lists them) and
// cell_params gives its constants (empty: the defaults); P = H unless a cell that takes
// a projection (the LSTM) has weight_hr [P, H]; cell_weight holds the own weights of a
// layer-normalised cell (cells/ln_lstm.h). Absent results are empty [0] tensors.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>
#include <vector>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include "checks.h"
#include "layer_norm.h"
#include "cpu/loops.h"

namespace pyrnn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// A weight as the loops read it: contiguous, and bfloat16 widened to float32 (exactly).
Tensor weight_as_run(const Tensor& w, bool bf16) {
  return bf16 ? w.contiguous().to(at::kFloat) : w.contiguous();
}

// left[R, a] and right[R, b] = the columns [0, a) and [a, a + b) of both[R, a + b], all
// contiguous: row copies, which cost less than two strided copies through ATen in the
// fixed cost of a small layer's backward.
void split_columns(const Tensor& both, Tensor& left, Tensor& right) {
  const int64_t rows = both.size(0), a = left.size(1), b = right.size(1);
  const size_t item = both.element_size();
  const char* src = static_cast<const char*>(both.data_ptr());
  char* l = static_cast<char*>(left.data_ptr());
  char* r = static_cast<char*>(right.data_ptr());
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(l + i * a * item, src + i * (a + b) * item, a * item);
    std::memcpy(r + i * b * item, src + (i * (a + b) + a) * item, b * item);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_cpu(
    c10::string_view mode_s, const Tensor& input_, const Tensor& hx_, const OptTensor& cx_,
    const Tensor& w_ih_, const Tensor& w_hh_, const OptTensor& b_ih_, const OptTensor& b_hh_,
    const OptTensor& w_hr_, const OptTensor& lengths_, bool reverse, bool save, double bptt_clip,
    const OptTensor& norm_out, double vanishing_penalty, const OptTensor& ratio_out,
    const OptTensor& omega_out, c10::ArrayRef<double> cell_params,
    const OptTensor& cell_weight_) {
  const CellInfo& m = parse_mode(std::string(mode_s));
  const std::array<double, kMaxCellParams> consts = cell_constants(m, cell_params);
  const Dims d =
      check_forward_args(m, input_, hx_, cx_, w_ih_, w_hh_, b_ih_, b_hh_, w_hr_, lengths_);
  check_cell_weight(m, cell_weight_, input_, d);
  check_norm_out(norm_out, input_, d);
  check_penalty_args(m, vanishing_penalty, ratio_out, omega_out, input_, d);
  check_clip(bptt_clip);  // used by backward; rejected here, where the mistake is made
  const int64_t T = d.T, B = d.B, H = d.H, GH = d.G * d.H, P = d.P;
  if (H == 0) return empty_forward(m, d, input_.options());
  // bfloat16 weights: the products take their operands rounded to bfloat16 (the weights
  // exact) and sum in float32, the rest runs in float32 (cpu/gemm.h).
  const bool bf16 = bf16_weights(input_, w_hh_);
  const cpu::Bf16Products products(bf16);
  const Tensor w_hr = w_hr_ ? weight_as_run(*w_hr_, bf16) : Tensor();
  const Tensor input = input_.contiguous(), w_ih = weight_as_run(w_ih_, bf16);
  const Tensor w_hh = weight_as_run(w_hh_, bf16);
  const Tensor hx = hx_.contiguous();
  const Tensor cx = cx_ ? cx_->contiguous() : Tensor();
  const Tensor b_ih = b_ih_ ? b_ih_->contiguous() : Tensor();
  const Tensor b_hh = b_hh_ ? b_hh_->contiguous() : Tensor();
  const Tensor lengths = lengths_ ? lengths_->contiguous() : Tensor();
  const Tensor cw = cell_weight_ ? cell_weight_->contiguous() : Tensor();
  const auto opt = input.options();

  const int64_t W = run_width(m, H, save);
  // A float32 forward without a projection, batch >= 8, W_ih not too large (below), that
  // saves nothing (inference) or belongs to a cell of three or four gates: the time loop
  // computes each step's input projection itself, each thread for its own rows or units,
  // so that the rows are still in cache when the pointwise update reads them (and in
  // inference it needs the rows of one step only). Otherwise (small batches, where one
  // product over all T*B rows runs faster; the Elman cells' training; a W_ih that the
  // loop would stream from memory at every step; float64; projections) that product
  // comes first: ws[..., :G*H] = x @ W_ih^T + b_ih. The same kernel and
  // order of sums either way, the same bits, unless that product runs on MKL (Intel,
  // cpu/loops.h): then as_training (below) keeps a cell's inference and training on the
  // same side. Measured (2 threads, both ways in turn):
  // with the AVX2 copy (an AVX2-only AMD EPYC), inference at T = 100, B = 32, H = 128
  // 7 - 9% faster in the loop, the LSTM's at H = 512 (W_ih 2^20 elements) 9% slower: W_ih
  // under 2^20 elements. With an AVX-512 copy (AMD EPYC model 17, medians of 21 - 31
  // rounds in one process), the LSTM at T = 100, B = 32, H = 512 5% faster in the loop
  // (8% with bfloat16 products), at B = 8 8%, the GRU at H = 768 (W_ih 2^20.8) 11%,
  // where the Elman RNN at H = 1024 (W_ih 2^20) is 6% slower and the LSTM at H = 1024
  // (2^22) 4%: there, cells of three or four gates take a W_ih under 2^21 elements.
  // Training: 0 - 6% faster with the product first (AVX2) while the loops split the
  // hidden units; split by batch rows (AVX-512 copy, AMD EPYC model 17, 21 - 41 rounds),
  // the LSTM at T = 100, B = 32, H = 128 trains in 0.94 - 0.97 of the time with the
  // projection in the loop, at T = 500, B = 8, H = 256 in 0.98 - 0.99, the GRU in 0.98 -
  // 0.99, and the Elman RNN in 1.01 - 1.05: in the loop for cells of three or four gates.
  const bool avx512 = std::strncmp(cpu::cpu_capability(), "avx512", 6) == 0;
  // With second-level caches of 2 MB a core (an Intel Xeon with AMX, 2 threads, medians
  // of 9 - 11 interleaved rounds, in the loop against outside it), the LSTM at T = 100,
  // B = 32, H = 128 infers in 0.88 of the time, at T = 500, B = 8, H = 256 in 0.84, the
  // GRU in 0.86 and 0.84; at H = 512 (W_ih 2^20 elements) the LSTM takes 1.09 and the GRU
  // 1.11 (training: 0.96 - 1.06, 1.02): a thread's share of W_ih and W_hh together (4 MB)
  // no longer fits there, of W_hh alone it does. On the matrix units (bfloat16 products,
  // 2 bytes a weight), at H = 128 0.86 inference, 1.00 training; at H = 512 1.08 and 1.20,
  // the GRU's 1.23 and 1.10. There the limit is 2^20 elements. In float32 it is 2^19 since
  // the projections over all rows run on MKL (blas_products, loops.h; the same CPU, 11
  // rounds, outside against in the loop): the GRU at H = 512 (W_ih 2^19.6) infers in 0.89
  // of the time and trains in 0.96, the LSTM at H = 384 (2^19.2) infers in 0.95; at H =
  // 384 the GRU reads 0.98, at H = 256 the LSTM and GRU 0.97 - 1.00 (B = 32) and 1.02 -
  // 1.03 (B = 8, T = 500).
  const bool units = bf16 && cpu::matrix_gemm() != nullptr;
  const bool big_l2 = cpu::second_level_cache() >= (int64_t(2) << 20);
  const int64_t in_loop_limit =
      int64_t(1) << (avx512 && d.G >= 3 && !units && !big_l2 ? 21 : big_l2 && !units ? 19 : 20);
  // An Elman cell's training projects before the loop; where that product runs on MKL
  // (cpu/loops.h), its inference does too, so that both give the same bits.
  const bool as_training = d.G >= 3 || !cpu::projection_on_blas(T * B, GH, d.I);
  const bool in_loop = (!save || d.G >= 3) && input.scalar_type() == at::kFloat &&
                       !w_hr.defined() && !m.layer_norm && B >= 8 && GH * d.I < in_loop_limit &&
                       as_training;
  Tensor ws = at::empty({in_loop && !save ? 1 : T, B, W}, opt);
  Tensor output = at::empty({T, B, P}, opt);
  Tensor h_n = at::empty({B, P}, opt);
  Tensor c_n = m.has_cell ? at::empty({B, H}, opt) : at::empty({0}, opt);
  Tensor hg = at::empty({B, GH}, opt);
  Tensor scratch = w_hr.defined() ? at::empty({B, H}, opt) : Tensor();  // m_t

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pyrnn_forward", [&] {
    if (m.layer_norm) {  // ws[..., :G*H] = LN(x @ W_ih^T) * gamma_ih + b_ih
      Tensor proj = at::empty({T * B, GH}, opt);
      cpu::matmul(input.data_ptr<scalar_t>(), T * B, d.I, w_ih.data_ptr<scalar_t>(), GH, true,
                  proj.data_ptr<scalar_t>(), GH, nullptr);
      ws.narrow(2, 0, GH).copy_(normalised_input(proj, cw, b_ih, consts[0]).view({T, B, GH}));
    } else if (!in_loop)
      cpu::matmul(input.data_ptr<scalar_t>(), T * B, d.I, w_ih.data_ptr<scalar_t>(), GH, true,
                  ws.data_ptr<scalar_t>(), W, b_ih.defined() ? b_ih.data_ptr<scalar_t>() : nullptr);
    cpu::ForwardArgs<scalar_t> p;
    p.steps = T; p.batch = B; p.hidden = H; p.width = W; p.reverse = reverse;
    p.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
    p.ws = ws.data_ptr<scalar_t>();
    p.y = output.data_ptr<scalar_t>();
    p.h0 = hx.data_ptr<scalar_t>();
    p.c0 = cx.defined() ? cx.data_ptr<scalar_t>() : nullptr;
    p.w_hh = w_hh.data_ptr<scalar_t>();
    p.b_hh = b_hh.defined() ? b_hh.data_ptr<scalar_t>() : nullptr;
    p.h_n = h_n.data_ptr<scalar_t>();
    p.c_n = m.has_cell ? c_n.data_ptr<scalar_t>() : nullptr;
    p.hg = hg.data_ptr<scalar_t>();
    p.k = consts.data();
    p.cw = cw.defined() ? cw.data_ptr<scalar_t>() : nullptr;
    if (in_loop) {
      p.project = true;
      p.every_step = save;
      p.x = input.data_ptr<scalar_t>();
      p.w_ih = w_ih.data_ptr<scalar_t>();
      p.b_ih = b_ih.defined() ? b_ih.data_ptr<scalar_t>() : nullptr;
      p.input = d.I;
    }
    if (w_hr.defined()) {
      p.proj = P;
      p.w_hr = w_hr.data_ptr<scalar_t>();
      p.m = scratch.data_ptr<scalar_t>();
    }
    cpu::forward_loop(m.id, p);
  });
  if (!save || saved_width(m, H) == 0) ws = at::empty({0}, opt);
  return {output, h_n, c_n, ws};
}

// The vanishing-gradient regulariser of Pascanu, Mikolov and Bengio (2013) for the Elman
// cells, from what BPTT left behind: gx[s] = dLoss/da_s (after the clamp, when bptt_clip
// is on) at every step, and U[s] = gx[s] W_hh, which the time loop computes anyway (the
// recurrent part of dLoss/dh) and keeps when asked (u_out). For a step k whose successor
// s (k + 1, or k - 1 when reversed) lies within its sequence: u = U[s], the part of
// dLoss/dh_k that flows through s,
// and v = dLoss/dh_s = dy[s] + (the same product from s's own successor) + dh_n at the
// sequence's last step. ratio_k = |u| / |v| (0 where |v| = 0), omega = (1/B) sum
// (ratio - 1)^2, and, holding v and gx constant, d omega / dW_hh = (1/B) sum
// 2 (ratio - 1) / (|v| |u|) gx[s] (x) u: one product over all T*B rows and pointwise work.
// Adds penalty * d omega / dW_hh to dw_hh; returns (ratio [T, B] by step k, omega []).
std::pair<Tensor, Tensor> vanishing_penalty_cpu(const Tensor& gx, Tensor& U, const Tensor& dy,
                                                const Tensor& dhT, const Tensor& lengths,
                                                bool reverse, double penalty,
                                                Tensor& dw_hh) {
  // U [T, B, H] = gx W_hh by s, as the time loop left it (u_out); scaled in place below
  const int64_t T = gx.size(0), B = gx.size(1), H = gx.size(2);
  Tensor gn = at::empty_like(gx);   // coef / mv * gx, by s
  Tensor r = at::zeros({T, B}, gx.options());
  Tensor dy_c = dy.contiguous();
  double omega_sum = 0;  // sum over the pairs of (r - 1)^2
  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "pyrnn_vanishing_penalty", [&] {
    using S = scalar_t;
    S* u = U.data_ptr<S>();
    S* g = gn.data_ptr<S>();
    S* rr = r.data_ptr<S>();
    const S* x = gx.data_ptr<S>();
    const S* d = dy_c.data_ptr<S>();
    const S* dh = dhT.defined() ? dhT.data_ptr<S>() : nullptr;
    const int64_t* len = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
    const S coef_scale = static_cast<S>(penalty / static_cast<double>(B));
    // Two passes over the rows (s, b), each row independent of the others (so the split
    // between threads does not change a bit): the norms and coefficients first, as they
    // read U of the neighbouring step; then U and gx rows scaled in place and into gn.
    // u = U[s], v = dLoss/dh_s = dy[s] + U[succ(s)] (+ dh_n at the sequence's last step),
    // succ(s) = s + 1 (s - 1 when reversed). A row without a pair gets gn = 0.
    std::vector<S> u_scale(T * B, S(1)), v_scale(T * B, S(1)), coefs(T * B, S(0));
    std::vector<S> sq(T * B, S(0));  // (r - 1)^2 of the pairs, 0 elsewhere
    at::parallel_for(0, T * B, 16, [&](int64_t begin, int64_t end) {
      std::vector<S> v(H);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t s = row / B, b = row % B;
        const int64_t n = len ? len[b] : T;
        // pairs: s active and with a predecessor in its sequence
        if (!(s < n && (reverse ? s + 1 < n : s >= 1))) continue;
        const S* urow = u + row * H;
        const bool has_succ = reverse ? s >= 1 : s + 1 < n;
        const bool last = reverse ? s == 0 : s == n - 1;
        const S* drow = d + row * H;
        const S* usucc = has_succ ? u + ((reverse ? s - 1 : s + 1) * B + b) * H : nullptr;
        S mu = 0, mv = 0;
        for (int64_t j = 0; j < H; ++j) {
          S vj = drow[j];
          if (usucc) vj += usucc[j];
          if (last && dh) vj += dh[b * H + j];
          v[j] = vj;
          mu = std::max(mu, std::abs(urow[j]));
          mv = std::max(mv, std::abs(vj));
        }
        // Far from the loss the gradients are tiny (1e-20 and less in float32 after a
        // hundred steps of vanishing): their squares underflow and 1 / (|v| |u|)
        // overflows. So each row is divided by its largest |element| first (mu, mv), its
        // norm taken after that, and the scales enter only as the quotient mu / mv.
        const S su = mu > 0 ? mu : S(1), sv = mv > 0 ? mv : S(1);
        S nu2 = 0, nv2 = 0;
        for (int64_t j = 0; j < H; ++j) {
          const S un = urow[j] / su, vn = v[j] / sv;
          nu2 += un * un;
          nv2 += vn * vn;
        }
        const S nu = std::sqrt(nu2), nv = std::sqrt(nv2);
        const S ratio = mv > 0 ? (mu / sv) * (nu / nv) : S(0);
        rr[row] = ratio;
        sq[row] = (ratio - 1) * (ratio - 1);
        // 2 (r - 1) / (|v| |u|) gx (x) u = 2 (r - 1) / (nv nu) (gx / mv) (x) (u / mu)
        const S coef = mv > 0 && mu > 0 ? S(2) * (ratio - 1) / (nv * nu) * coef_scale : S(0);
        u_scale[row] = su;
        v_scale[row] = sv;
        coefs[row] = coef;
      }
    });
    at::parallel_for(0, T * B, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        S* urow = u + row * H;
        S* grow = g + row * H;
        const S* xrow = x + row * H;
        const S su = u_scale[row], sv = v_scale[row], coef = coefs[row];
        for (int64_t j = 0; j < H; ++j) {
          urow[j] /= su;
          grow[j] = xrow[j] / sv * coef;  // |gx| <= |v| elementwise: no overflow
        }
      }
    });
    for (const S q : sq) omega_sum += q;  // in the order of the rows
  });
  Tensor omega = at::scalar_tensor(omega_sum / static_cast<double>(B), gx.options());
  // dW_hh[G*H, H] += gn^T @ (U / mu) over all T*B rows
  dw_hh.add_(at::mm(gn.view({T * B, -1}).t(), U.view({T * B, -1})));
  Tensor ratio = at::zeros({T, B}, gx.options());  // by the step k whose gradient u is
  if (T > 1) {
    if (!reverse)
      ratio.narrow(0, 0, T - 1).copy_(r.narrow(0, 1, T - 1));
    else
      ratio.narrow(0, 1, T - 1).copy_(r.narrow(0, 0, T - 1));
  }
  return {ratio, omega};
}

BackwardResult backward_cpu(
    c10::string_view mode_s, const Tensor& grad_output_, const OptTensor& grad_h_n,
    const OptTensor& grad_c_n, const Tensor& input_, const Tensor& hx_, const OptTensor& cx_,
    const Tensor& w_ih_, const Tensor& w_hh_, const OptTensor& w_hr_, bool has_bias,
    bool input_grad, const OptTensor& lengths_, const Tensor& output_,
    const Tensor& workspace_, bool reverse, double bptt_clip, bool record,
    double vanishing_penalty, c10::ArrayRef<double> cell_params,
    const OptTensor& cell_weight_) {
  const CellInfo& m = parse_mode(std::string(mode_s));
  const std::array<double, kMaxCellParams> consts = cell_constants(m, cell_params);
  check_penalty_args(m, vanishing_penalty, std::nullopt, std::nullopt, input_, Dims{});
  const Dims d = check_backward_args(m, grad_output_, grad_h_n, grad_c_n, input_, hx_, cx_,
                                     w_ih_, w_hh_, w_hr_, lengths_, output_, workspace_,
                                     bptt_clip);
  check_cell_weight(m, cell_weight_, input_, d);
  const int64_t T = d.T, B = d.B, H = d.H, GH = d.G * d.H, W = saved_width(m, H), P = d.P;
  if (H == 0)
    return empty_backward(m, d, input_grad, record, input_.options(), w_hh_.options());

  const bool bf16 = bf16_weights(input_, w_hh_);  // as in forward_cpu
  const cpu::Bf16Products products(bf16);
  const Tensor input = input_.contiguous(), w_hh = weight_as_run(w_hh_, bf16);
  // read only for dX and a layer-normalised input projection
  const Tensor w_ih = input_grad || m.layer_norm ? weight_as_run(w_ih_, bf16) : w_ih_;
  const Tensor hx = hx_.contiguous(), dy = grad_output_.contiguous();
  const Tensor y = output_.contiguous(), ws = workspace_.contiguous();
  const Tensor cx = cx_ ? cx_->contiguous() : Tensor();
  const Tensor dhT = grad_h_n ? grad_h_n->contiguous() : Tensor();
  const Tensor dcT = grad_c_n ? grad_c_n->contiguous() : Tensor();
  const Tensor lengths = lengths_ ? lengths_->contiguous() : Tensor();
  const Tensor w_hr = w_hr_ ? weight_as_run(*w_hr_, bf16) : Tensor();
  const Tensor cw = cell_weight_ ? cell_weight_->contiguous() : Tensor();
  const auto opt = input.options();

  Tensor gx = at::empty({T, B, GH}, opt);
  Tensor dnorm = m.layer_norm ? at::empty({T, B, H}, opt) : Tensor();
  Tensor gh = m.split_grad ? at::empty({T, B, GH}, opt) : gx;
  Tensor hprev = at::empty({T, B, P}, opt);
  Tensor dh0 = at::empty({B, P}, opt);
  // projection: dLoss/dm scratch [B, H], dh_t of every step [T, B, P], m_t [T, B, H]
  Tensor dm, dhtot, mall;
  if (w_hr.defined()) {
    dm = at::empty({B, H}, opt);
    dhtot = at::empty({T, B, P}, opt);
    mall = at::empty({T, B, H}, opt);
  }
  Tensor dc0 = m.has_cell ? at::empty({B, H}, opt) : at::empty({0}, opt);
  Tensor norms = record ? at::zeros({2, T, B}, opt) : at::empty({0}, opt);
  Tensor u_rows = vanishing_penalty != 0.0 ? at::empty({T, B, H}, opt) : Tensor();

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pyrnn_backward", [&] {
    cpu::BackwardArgs<scalar_t> p;
    p.steps = T; p.batch = B; p.hidden = H; p.width = W; p.reverse = reverse;
    p.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
    p.ws = W ? const_cast<scalar_t*>(ws.data_ptr<scalar_t>()) : nullptr;
    p.y = const_cast<scalar_t*>(y.data_ptr<scalar_t>());
    p.h0 = hx.data_ptr<scalar_t>();
    p.c0 = cx.defined() ? cx.data_ptr<scalar_t>() : nullptr;
    p.w_hh = w_hh.data_ptr<scalar_t>();
    p.dy = dy.data_ptr<scalar_t>();
    p.dh_n = dhT.defined() ? dhT.data_ptr<scalar_t>() : nullptr;
    p.dc_n = dcT.defined() ? dcT.data_ptr<scalar_t>() : nullptr;
    p.gx = gx.data_ptr<scalar_t>();
    p.gh = gh.data_ptr<scalar_t>();
    p.hprev = hprev.data_ptr<scalar_t>();
    p.dh0 = dh0.data_ptr<scalar_t>();
    p.dc0 = m.has_cell ? dc0.data_ptr<scalar_t>() : nullptr;
    p.clip = bptt_clip;
    p.k = consts.data();
    p.norm_h = record ? norms.data_ptr<scalar_t>() : nullptr;
    p.norm_c = record && m.has_cell ? norms.data_ptr<scalar_t>() + T * B : nullptr;
    p.u_out = u_rows.defined() ? u_rows.data_ptr<scalar_t>() : nullptr;
    p.cw = cw.defined() ? cw.data_ptr<scalar_t>() : nullptr;
    p.dnorm = dnorm.defined() ? dnorm.data_ptr<scalar_t>() : nullptr;
    if (w_hr.defined()) {
      p.proj = P;
      p.w_hr = w_hr.data_ptr<scalar_t>();
      p.dm = dm.data_ptr<scalar_t>();
      p.dhtot = dhtot.data_ptr<scalar_t>();
      p.mall = mall.data_ptr<scalar_t>();
    }
    cpu::backward_loop(m.id, p);
  });

  // Everything that does not depend on the order of time: single products over T*B rows.
  // gin: dLoss/d(x @ W_ih^T), which is gx unless the input side is layer-normalised.
  Tensor gin = gx, dcw = at::empty({0}, opt);
  if (m.layer_norm) {
    Tensor proj = at::empty({T * B, GH}, opt);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pyrnn_backward_proj", [&] {
      cpu::matmul(input.data_ptr<scalar_t>(), T * B, d.I, w_ih.data_ptr<scalar_t>(), GH, true,
                  proj.data_ptr<scalar_t>(), GH, nullptr);
    });
    auto colsum = [](const Tensor& a) {
      const Tensor c = a.contiguous();
      Tensor out = at::empty({c.size(1)}, c.options());
      AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "pyrnn_backward_colsum", [&] {
        cpu::column_sums(c.data_ptr<scalar_t>(), c.size(0), c.size(1), out.data_ptr<scalar_t>());
      });
      return out;
    };
    std::tie(gin, dcw) = layer_norm_grads(gx.view({T * B, GH}), dnorm.view({T * B, H}),
                                          ws.view({T * B, W}), proj, cw, consts[0], colsum);
    gin = gin.contiguous();
  }
  Tensor dx = at::empty({0}, opt);
  if (input_grad) {  // dX[T*B, I] = gin[T*B, G*H] @ W_ih[G*H, I]
    dx = at::empty({T, B, d.I}, opt);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pyrnn_backward_dx", [&] {
      cpu::matmul(gin.data_ptr<scalar_t>(), T * B, GH, w_ih.data_ptr<scalar_t>(), d.I, false,
                  dx.data_ptr<scalar_t>(), d.I, nullptr);
    });
  }
  // dW_ih[G*H, I] = gin^T @ x and dW_hh[G*H, P] = gh^T @ h_prev, over all T*B rows; where
  // gin and gh are one matrix (no cell splits its gate gradients, no layer norm), as one
  // product [dW_ih | dW_hh] = gx^T @ [x | h_prev], which reads gx once.
  const bool one_dw = gin.is_same(gh);
  Tensor dw_ih, dw_hh;
  Tensor dw_both = one_dw ? at::empty({GH, d.I + P}, opt) : Tensor();
  if (!one_dw) {
    dw_ih = at::empty({GH, d.I}, opt);
    dw_hh = at::empty({GH, P}, opt);
  }
  Tensor dw_hr = w_hr.defined() ? at::empty({P, H}, opt) : at::empty({0}, opt);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pyrnn_backward_dw", [&] {
    if (one_dw) {
      cpu::matmul_tn(gh.data_ptr<scalar_t>(), GH, T * B, input.data_ptr<scalar_t>(), d.I,
                     hprev.data_ptr<scalar_t>(), P, dw_both.data_ptr<scalar_t>());
    } else {
      cpu::matmul_tn(gin.data_ptr<scalar_t>(), GH, T * B, input.data_ptr<scalar_t>(), d.I,
                     static_cast<scalar_t*>(nullptr), 0, dw_ih.data_ptr<scalar_t>());
      cpu::matmul_tn(gh.data_ptr<scalar_t>(), GH, T * B, hprev.data_ptr<scalar_t>(), P,
                     static_cast<scalar_t*>(nullptr), 0, dw_hh.data_ptr<scalar_t>());
    }
    if (w_hr.defined())  // dW_hr[P, H] = dh^T @ m
      cpu::matmul_tn(dhtot.data_ptr<scalar_t>(), P, T * B, mall.data_ptr<scalar_t>(), H,
                     static_cast<scalar_t*>(nullptr), 0, dw_hr.data_ptr<scalar_t>());
  });
  if (one_dw) {
    dw_ih = at::empty({GH, d.I}, opt);
    dw_hh = at::empty({GH, P}, opt);
    split_columns(dw_both, dw_ih, dw_hh);
  }
  // the bias gradients: column sums over the T*B rows, in an order fixed by T*B alone
  Tensor db_ih = has_bias ? at::empty({GH}, opt) : at::empty({0}, opt);
  Tensor db_hh = has_bias ? at::empty({GH}, opt) : at::empty({0}, opt);
  if (has_bias) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pyrnn_backward_db", [&] {
      cpu::column_sums(gx.data_ptr<scalar_t>(), T * B, GH, db_ih.data_ptr<scalar_t>());
      if (m.split_grad && !m.layer_norm)  // b_hh adds to LN(h W_hh^T), after gh
        cpu::column_sums(gh.data_ptr<scalar_t>(), T * B, GH, db_hh.data_ptr<scalar_t>());
      else
        std::memcpy(db_hh.data_ptr(), db_ih.data_ptr(), db_ih.nbytes());
    });
  }
  Tensor ratio = at::empty({0}, opt), omega = at::empty({0}, opt);
  if (vanishing_penalty != 0.0)
    std::tie(ratio, omega) = vanishing_penalty_cpu(gx, u_rows, dy, dhT, lengths, reverse,
                                                   vanishing_penalty, dw_hh);
  if (bf16) {  // the weights' gradients in their dtype
    dw_ih = dw_ih.to(at::kBFloat16);
    dw_hh = dw_hh.to(at::kBFloat16);
    if (w_hr.defined()) dw_hr = dw_hr.to(at::kBFloat16);
  }
  return {dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, norms, ratio, omega, dcw};
}

}  // namespace
}  // namespace pyrnn

TORCH_LIBRARY(pyrnn, m) {
  m.def(
      "forward(str mode, Tensor input, Tensor hx, Tensor? cx, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, Tensor? weight_hr, "
      "Tensor? lengths, bool reverse, "
      "bool save, float bptt_clip, Tensor? norm_out, float vanishing_penalty=0., "
      "Tensor? ratio_out=None, Tensor? omega_out=None, float[] cell_params=[], "
      "Tensor? cell_weight=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "backward(str mode, Tensor grad_output, Tensor? grad_h_n, Tensor? grad_c_n, "
      "Tensor input, Tensor hx, Tensor? cx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? weight_hr, bool has_bias, bool input_grad, Tensor? lengths, Tensor output, "
      "Tensor workspace, bool reverse, float bptt_clip, bool record, "
      "float vanishing_penalty=0., float[] cell_params=[], Tensor? cell_weight=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyrnn, CPU, m) {
  m.impl("forward", &pyrnn::forward_cpu);
  m.impl("backward", &pyrnn::backward_cpu);
}

namespace pyrnn {
void def_module_forward(pybind11::module_& module);  // autograd.cpp
}  // namespace pyrnn

namespace {
// bfloat16 products on the matrix units (AMX) through oneDNN's brgemm, which torch
// carries; registered when the library loads, where that brgemm runs on them
// (could_pack: the units are there and the library was built with them). The loops then
// offer the capability avx512_amx (cpu/loops.h). One brgemm call multiplies a run of up
// to 256 columns (cpu/gemm.h); its kernels are generated once per shape and cached by
// torch.
void units_gemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
                bool add, const uint16_t* A, const uint16_t* B, float* C) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add,
                              reinterpret_cast<const at::BFloat16*>(A),
                              reinterpret_cast<const at::BFloat16*>(B), C, /*is_vnni=*/true);
}
void units_release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }
// (false while torch.backends.mkldnn is switched off: the loops then run vdpbf16ps)
bool units_usable() { return at::native::cpublas::could_pack(at::kBFloat16); }
const pyrnn::cpu::MatrixGemm kUnits{units_gemm, units_release, units_usable};
const bool kUnitsRegistered = [] {
#if defined(__x86_64__)
  if (at::native::cpublas::could_pack(at::kBFloat16)) pyrnn::cpu::register_matrix_gemm(&kUnits);
#endif
  return true;
}();

bool has_cuda_backend() {
#ifdef PYRNN_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "pyrnn compiled ops (registered as torch.ops.pyrnn.*)";
  module.def("cells", [] {
    pybind11::list out;
    for (const pyrnn::CellInfo& c : pyrnn::cell_infos()) {
      pybind11::dict d;
      d["name"] = c.name;
      d["gates"] = c.gates;
      d["saved"] = c.saved;
      d["has_cell"] = c.has_cell;
      d["split_grad"] = c.split_grad;
      d["keeps_row"] = c.keeps_row;
      d["projection"] = c.projection;
      d["row_wise"] = c.row_wise;
      d["layer_norm"] = c.layer_norm;
      d["cell_weights"] = c.weights(1);
      d["elman"] = c.elman();
      pybind11::dict params;
      for (size_t i = 0; i < c.params.size(); ++i) params[c.params[i].c_str()] = c.defaults[i];
      d["params"] = params;
      d["workspace"] = c.keeps_row ? c.gates + c.saved + (c.has_cell ? 1 : 0) : 0;
      out.append(d);
    }
    return out;
  }, "the registry of cells, in its order: name, gates, saved values per unit, whether it "
     "has a cell state, a separate recurrent gradient, keeps its workspace row, takes a "
     "projection, is an Elman cell; its constants {name: default}; the workspace row's "
     "width in units of H (0: the output suffices)");
  pyrnn::def_module_forward(module);
  module.def("has_cuda", &has_cuda_backend, "whether the CUDA kernels were compiled in");
  module.def("blas", [] {
    const std::string bf16 = pyrnn::cpu::matrix_gemm()
                                 ? "bfloat16: the matrix units (oneDNN's brgemm); "
                                 : "bfloat16: pyrnn's kernel; ";
#ifdef PYRNN_NO_BLAS
    return "float32: pyrnn's kernel; " + bf16 + "float64: at::mm";
#else
    const int mode = pyrnn::cpu::blas_products_mode();
    const bool packed = pyrnn::cpu::packed_blas();
    std::string f32 = "float32: pyrnn's kernel";
    if (mode > 0)
      f32 += std::string(", the weight gradients on libtorch sgemm_") +
             (packed ? ", the input projections and dX on its cblas_sgemm_compute" : "");
    else if (mode < 0 && pyrnn::cpu::cpu_is_intel())
      f32 += std::string(", weight gradients of 2^24 flops or more on libtorch sgemm_") +
             (packed ? ", input projections and dX of 2^30 or more on its cblas_sgemm_compute"
                     : "");
    f32 += "; ";
    return f32 + bf16 + "float64: libtorch dgemm_";
#endif
  }, "which products the CPU time loops run (with the capability in use)");
  module.def("cpu_capability", [] { return std::string(pyrnn::cpu::cpu_capability()); },
             "the instruction set of the CPU loops in use (default, avx2, avx512)");
  module.def("compiled_capabilities", [] { return std::string(pyrnn::cpu::compiled_capabilities()); },
             "the instruction sets the CPU loops are compiled for, comma-separated");
  module.def("supported_capabilities",
             [] { return std::string(pyrnn::cpu::supported_capabilities()); },
             "those of the compiled instruction sets this CPU runs, best last");
  module.def("baseline_isa", [] { return std::string(pyrnn::cpu::baseline_isa()); },
             "the instruction set of the build's baseline (x86-64 unless PYRNN_MARCH)");
  module.def("cpu_capability_error", [] { return std::string(pyrnn::cpu::cpu_capability_error()); },
             "why PYRNN_CPU_CAPABILITY was not followed, or ''");
  module.def("set_cpu_capability", [](const std::string& name) {
    TORCH_CHECK(pyrnn::cpu::set_cpu_capability(name.c_str()),
                "set_cpu_capability: expected one of ", pyrnn::cpu::supported_capabilities(),
                " (the capabilities this CPU runs), got '", name, "'");
  }, "use the CPU loops compiled for this instruction set (for tests and benchmarks)");
  module.def("blas_products", [] { return pyrnn::cpu::blas_products_mode(); },
             "where the float32 products outside the time loops run: 1 libtorch's BLAS, 0 "
             "pyrnn's kernel, -1 the CPU's default (the BLAS on Intel CPUs from 2^24 flops)");
  module.def("set_blas_products", [](int64_t mode) {
    TORCH_CHECK(mode >= -1 && mode <= 1 && pyrnn::cpu::set_blas_products(int(mode)),
                "set_blas_products: expected 1 (the BLAS), 0 (pyrnn's kernel) or -1 (the "
                "CPU's default), got ", mode);
  }, "where the float32 products outside the time loops run (for tests and benchmarks)");
  module.def("gemm_rows", [] { return pyrnn::cpu::gemm_rows(); },
             "the rows of a register block of the float32 products in the AVX-512 copies");
  module.def("set_gemm_rows", [](int64_t rows) {
    TORCH_CHECK(pyrnn::cpu::set_gemm_rows(rows),
                "set_gemm_rows: expected 1 - 12 rows (0: the CPU's default), got ", rows);
  }, "the rows of those blocks (for tests and benchmarks; 0: the CPU's default)");
}
