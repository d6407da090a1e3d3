// CUDA implementations of the ops defined in ops.cpp (same schemas, same results, same
// buffer layouts): argument checks, allocation, the products outside the time loop
// (ATen) and the call of the time loop (cuda/loops.h, shared with the CPU emulator of
// the tests), whose per-step products run through ATen (cuBLAS) here. Everything runs on the
// current stream; nothing here synchronises with the device.
//
// Shapes (one layer, one direction): input [T, B, I], hx and cx [B, H],
// weight_ih [G*H, I], weight_hh [G*H, P], biases [G*H], workspace [T, B, W], and for an
// LSTM with a projection weight_hr [P, H] (P = H without one).
#ifdef PYRNN_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <type_traits>

#include "checks.h"
#include "layer_norm.h"
#include "cuda/loops.h"

namespace pyrnn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The CUDA type behind an ATen storage type (same size and bit layout).
template <typename S>
struct CudaType {
  using type = S;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename S>
using cuda_t = typename CudaType<S>::type;
static_assert(sizeof(at::Half) == sizeof(__half) && sizeof(at::BFloat16) == sizeof(__nv_bfloat16));

// Data pointer of t as the CUDA type of ATen type S, or nullptr if t is undefined.
template <typename S>
cuda_t<S>* ptr(const Tensor& t) {
  return t.defined() ? reinterpret_cast<cuda_t<S>*>(t.data_ptr<S>()) : nullptr;
}

// lengths stays a CPU tensor (its bounds are checked there, without touching the
// device); the kernels read a copy uploaded from pinned memory without blocking.
Tensor lengths_on(const OptTensor& lengths, const at::Device& device) {
  if (!lengths) return Tensor();
  return lengths->contiguous().pin_memory().to(device, at::kLong, /*non_blocking=*/true);
}

bool is_16bit(at::ScalarType s) { return s == at::kHalf || s == at::kBFloat16; }

// The ATen dtype of a CUDA storage type (the inverse of cuda_t).
template <typename E>
constexpr at::ScalarType scalar_type_of() {
  if constexpr (std::is_same_v<E, double>) return at::kDouble;
  else if constexpr (std::is_same_v<E, __half>) return at::kHalf;
  else if constexpr (std::is_same_v<E, __nv_bfloat16>) return at::kBFloat16;
  else return at::kFloat;
}

// The products of the time loop (cuda/loops.h), through ATen (cuBLAS, on the current
// stream), on views of the loop's buffers.
struct AtenProducts {
  at::Device device;
  template <typename E>
  void operator()(const cuda::Product<E>& g) const {
    if (g.M == 0 || g.N == 0) return;
    const auto o = at::TensorOptions().device(device).dtype(scalar_type_of<E>());
    const Tensor a = at::from_blob(const_cast<E*>(g.a), {g.M, g.K}, {g.lda, 1}, o);
    const Tensor b = g.b_transposed
                         ? at::from_blob(const_cast<E*>(g.b), {g.N, g.K}, {g.ldb, 1}, o).t()
                         : at::from_blob(const_cast<E*>(g.b), {g.K, g.N}, {g.ldb, 1}, o);
    Tensor c = at::from_blob(g.c, {g.M, g.N}, {g.ldc, 1}, o);
    if (g.accumulate) c.addmm_(a, b);
    else at::mm_out(c, a, b);
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_cuda(
    c10::string_view mode_s, const Tensor& input_, const Tensor& hx_, const OptTensor& cx_,
    const Tensor& w_ih_, const Tensor& w_hh_, const OptTensor& b_ih_, const OptTensor& b_hh_,
    const OptTensor& w_hr_, const OptTensor& lengths_, bool reverse, bool save,
    double bptt_clip, const OptTensor& norm_out, double vanishing_penalty,
    const OptTensor& ratio_out, const OptTensor& omega_out, c10::ArrayRef<double> cell_params,
    const OptTensor& cell_weight_) {
  (void)ratio_out;
  (void)omega_out;
  TORCH_CHECK_NOT_IMPLEMENTED(vanishing_penalty == 0.0,
                              "vanishing_penalty: the vanishing-gradient regulariser runs on "
                              "the CPU only; got ", vanishing_penalty, " for a CUDA input");
  const CellInfo& m = parse_mode(std::string(mode_s));
  const std::array<double, kMaxCellParams> consts = cell_constants(m, cell_params);
  const Dims d = check_forward_args(m, input_, hx_, cx_, w_ih_, w_hh_, b_ih_, b_hh_, w_hr_,
                                    lengths_, /*allow_half=*/true);
  check_cell_weight(m, cell_weight_, input_, d);
  check_norm_out(norm_out, input_, d);
  check_clip(bptt_clip);  // used by backward; rejected here, where the mistake is made
  if (d.H == 0) return empty_forward(m, d, input_.options());
  const c10::cuda::CUDAGuard guard(input_.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t T = d.T, B = d.B, H = d.H, GH = d.G * d.H, P = d.P;
  const Tensor input = input_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor w_hr = w_hr_ ? w_hr_->contiguous() : Tensor();
  const Tensor b_hh = b_hh_ ? b_hh_->contiguous() : Tensor();
  const Tensor lengths = lengths_on(lengths_, input.device());
  const Tensor cw = cell_weight_ ? cell_weight_->contiguous() : Tensor();
  const auto opt = input.options();

  const int64_t W = run_width(m, H, save);
  Tensor ws = at::empty({T, B, W}, opt);
  // Input projection for all T*B rows in one product: ws[..., :G*H] = x @ W_ih^T + b_ih
  // (a strided view when W > G*H).
  Tensor proj = ws.view({T * B, W}).narrow(1, 0, GH);
  const Tensor x2 = input.view({T * B, d.I});
  if (m.layer_norm)  // LN(x @ W_ih^T) * gamma_ih + b_ih
    proj.copy_(normalised_input(at::mm(x2, w_ih.t()), cw, b_ih_ ? *b_ih_ : Tensor(), consts[0]));
  else if (b_ih_) at::addmm_out(proj, *b_ih_, x2, w_ih.t());
  else at::mm_out(proj, x2, w_ih.t());
  Tensor output = at::empty({T, B, P}, opt);
  Tensor h_n = hx_.clone(at::MemoryFormat::Contiguous);  // running h state, then h_n
  Tensor c_n = m.has_cell ? cx_->clone(at::MemoryFormat::Contiguous) : at::empty({0}, opt);
  Tensor hg = at::empty({B, GH}, opt);
  Tensor scratch = w_hr.defined() ? at::empty({B, H + P}, opt) : Tensor();  // m_t, hnew

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "pyrnn_forward_cuda", [&] {
    using CT = cuda_t<scalar_t>;
    cuda::StepArgs<CT> p;
    p.steps = T; p.batch = B; p.hidden = H; p.width = W; p.reverse = reverse;
    p.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
    p.ws = ptr<scalar_t>(ws);
    p.y = ptr<scalar_t>(output);
    p.b_hh = ptr<scalar_t>(b_hh);
    p.w_hh = ptr<scalar_t>(w_hh);
    p.hg = ptr<scalar_t>(hg);
    p.h = ptr<scalar_t>(h_n);
    p.c = m.has_cell ? ptr<scalar_t>(c_n) : nullptr;
    if (w_hr.defined()) {
      p.proj = P;
      p.w_hr = ptr<scalar_t>(w_hr);
      p.m = ptr<scalar_t>(scratch);
      p.hnew = p.m + B * H;
    }
    for (size_t i = 0; i < consts.size(); ++i) p.k[i] = consts[i];
    p.cw = ptr<scalar_t>(cw);
    with_cell_at(m.id, [&](auto cell) {
      C10_CUDA_CHECK((cuda::forward_loop<decltype(cell), CT>(p, AtenProducts{input.device()}, stream)));
    });
  });
  if (!save || saved_width(m, H) == 0) ws = at::empty({0}, opt);
  return {output, h_n, c_n, ws};
}

BackwardResult backward_cuda(
    c10::string_view mode_s, const Tensor& grad_output_, const OptTensor& grad_h_n,
    const OptTensor& grad_c_n, const Tensor& input_, const Tensor& hx_, const OptTensor& cx_,
    const Tensor& w_ih_, const Tensor& w_hh_, const OptTensor& w_hr_, bool has_bias,
    bool input_grad, const OptTensor& lengths_, const Tensor& output_,
    const Tensor& workspace_, bool reverse, double bptt_clip, bool record,
    double vanishing_penalty, c10::ArrayRef<double> cell_params,
    const OptTensor& cell_weight_) {
  TORCH_CHECK_NOT_IMPLEMENTED(vanishing_penalty == 0.0,
                              "vanishing_penalty: the vanishing-gradient regulariser runs on "
                              "the CPU only; got ", vanishing_penalty, " for a CUDA input");
  const CellInfo& m = parse_mode(std::string(mode_s));
  const std::array<double, kMaxCellParams> consts = cell_constants(m, cell_params);
  const Dims d = check_backward_args(m, grad_output_, grad_h_n, grad_c_n, input_, hx_, cx_,
                                     w_ih_, w_hh_, w_hr_, lengths_, output_, workspace_,
                                     bptt_clip, /*allow_half=*/true);
  check_cell_weight(m, cell_weight_, input_, d);
  const int64_t T = d.T, B = d.B, H = d.H, GH = d.G * d.H, W = saved_width(m, H), P = d.P;
  if (H == 0) return empty_backward(m, d, input_grad, record, input_.options(), input_.options());

  const c10::cuda::CUDAGuard guard(input_.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor input = input_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor w_ih = input_grad ? w_ih_.contiguous() : w_ih_;  // read only for dX
  const Tensor w_hr = w_hr_ ? w_hr_->contiguous() : Tensor();
  const Tensor hx = hx_.contiguous(), dy = grad_output_.contiguous();
  const Tensor y = output_.contiguous(), ws = workspace_.contiguous();
  const Tensor cx = cx_ ? cx_->contiguous() : Tensor();
  const Tensor lengths = lengths_on(lengths_, input.device());
  const Tensor cw = cell_weight_ ? cell_weight_->contiguous() : Tensor();
  const auto opt = input.options();

  Tensor gx = at::empty({T, B, GH}, opt);
  Tensor dnorm = m.layer_norm ? at::empty({T, B, H}, opt) : Tensor();
  Tensor gh = m.split_grad ? at::empty({T, B, GH}, opt) : gx;
  Tensor hprev = at::empty({T, B, P}, opt);
  Tensor dh0 = at::empty({B, P}, opt);
  Tensor dc0 = m.has_cell ? at::empty({B, H}, opt) : at::empty({0}, opt);
  Tensor norms = record ? at::zeros({2, T, B}, opt) : at::empty({0}, opt);

  // The running dLoss/dh [B, P] and dLoss/dc [B, H] live in the arithmetic type: float
  // for float16/bfloat16, so that dh += gh_t @ W_hh accumulates over the steps without
  // rounding to 16 bits (that product then runs in float32, on gh_acc [B, G*H], the
  // kernel's float copy of gh_t, and a float32 copy of W_hh). For float32/float64 they
  // are dh0 and dc0 themselves.
  const bool f16 = is_16bit(input.scalar_type());
  const auto acc_opt = opt.dtype(f16 ? at::kFloat : input.scalar_type());
  Tensor dh = f16 ? at::empty({B, P}, acc_opt) : dh0;
  Tensor dc = !m.has_cell ? Tensor() : f16 ? at::empty({B, H}, acc_opt) : dc0;
  Tensor gh_acc = f16 ? at::empty({B, GH}, acc_opt) : Tensor();
  const Tensor w_hh_acc = f16 ? w_hh.to(at::kFloat) : Tensor();  // [G*H, P]
  const Tensor w_hr_acc = f16 && w_hr.defined() ? w_hr.to(at::kFloat) : Tensor();  // [P, H]
  // projection: dLoss/dm [B, H], dLoss/dh_t of every step [T, B, P] (in A), m_t [T, B, H]
  Tensor dm, dhtot, mall;
  if (w_hr.defined()) {
    dm = at::empty({B, H}, acc_opt);
    dhtot = at::empty({T, B, P}, acc_opt);
    mall = at::empty({T, B, H}, opt);
  }
  if (grad_h_n) dh.copy_(*grad_h_n);
  else dh.zero_();
  if (dc.defined()) {
    if (grad_c_n) dc.copy_(*grad_c_n);
    else dc.zero_();
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "pyrnn_backward_cuda", [&] {
    using CT = cuda_t<scalar_t>;
    using A = cuda::acc_t<CT>;
    cuda::StepArgs<CT> p;
    p.steps = T; p.batch = B; p.hidden = H; p.width = W; p.reverse = reverse;
    p.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
    p.ws = W ? ptr<scalar_t>(ws) : nullptr;
    p.y = ptr<scalar_t>(y);
    p.h0 = ptr<scalar_t>(hx);
    p.c0 = ptr<scalar_t>(cx);
    p.w_hh = ptr<scalar_t>(w_hh);
    p.dy = ptr<scalar_t>(dy);
    p.gx = ptr<scalar_t>(gx);
    p.gh = ptr<scalar_t>(gh);
    p.hprev = ptr<scalar_t>(hprev);
    p.dh = dh.data_ptr<A>();
    p.dc = dc.defined() ? dc.data_ptr<A>() : nullptr;
    p.gh_acc = gh_acc.defined() ? gh_acc.data_ptr<A>() : nullptr;
    p.w_hh_acc = w_hh_acc.defined() ? w_hh_acc.data_ptr<A>() : nullptr;
    p.clip = bptt_clip;
    p.norm_h = record ? ptr<scalar_t>(norms) : nullptr;
    p.norm_c = record && m.has_cell ? ptr<scalar_t>(norms) + T * B : nullptr;
    if (w_hr.defined()) {
      p.proj = P;
      p.w_hr = ptr<scalar_t>(w_hr);
      p.w_hr_acc = w_hr_acc.defined() ? w_hr_acc.data_ptr<A>() : nullptr;
      p.dm = dm.data_ptr<A>();
      p.dhtot = dhtot.data_ptr<A>();
      p.mall = ptr<scalar_t>(mall);
    }
    for (size_t i = 0; i < consts.size(); ++i) p.k[i] = consts[i];
    p.cw = ptr<scalar_t>(cw);
    p.dnorm = ptr<scalar_t>(dnorm);
    with_cell_at(m.id, [&](auto cell) {
      C10_CUDA_CHECK((cuda::backward_loop<decltype(cell), CT>(p, AtenProducts{input.device()}, stream)));
    });
  });
  if (f16) {
    dh0.copy_(dh);
    if (dc.defined()) dc0.copy_(dc);
  }

  // Everything that does not depend on the order of time: single products over T*B rows.
  const Tensor gx2 = gx.view({T * B, GH}), gh2 = gh.view({T * B, GH});
  // gin: dLoss/d(x @ W_ih^T), which is gx unless the input side is layer-normalised.
  Tensor gin = gx2, dcw = at::empty({0}, opt);
  if (m.layer_norm)
    std::tie(gin, dcw) = layer_norm_grads(
        gx2, dnorm.view({T * B, H}), ws.view({T * B, W}),
        at::mm(input.view({T * B, d.I}), w_ih_.t()), cw, consts[0],
        [](const Tensor& a) { return a.sum(0); });
  Tensor dx = input_grad ? at::mm(gin, w_ih).view({T, B, d.I}) : at::empty({0}, opt);
  Tensor dw_ih = at::mm(gin.t(), input.view({T * B, d.I}));
  Tensor dw_hh = at::mm(gh2.t(), hprev.view({T * B, P}));
  Tensor dw_hr = at::empty({0}, opt);
  if (w_hr.defined())  // dW_hr[P, H] = dhtot^T @ m, in A
    dw_hr = at::mm(dhtot.view({T * B, P}).t(), mall.view({T * B, H}).to(acc_opt.dtype()))
                .to(input.scalar_type());
  Tensor db_ih = has_bias ? gx2.sum(0) : at::empty({0}, opt);
  // b_hh adds to LN(h W_hh^T) in a layer-normalised cell, after gh
  Tensor db_hh = !has_bias ? at::empty({0}, opt) : m.layer_norm ? db_ih.clone() : gh2.sum(0);
  return {dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, norms, at::empty({0}, opt),
          at::empty({0}, opt), dcw};
}

}  // namespace
}  // namespace pyrnn

TORCH_LIBRARY_IMPL(pyrnn, CUDA, m) {
  m.impl("forward", &pyrnn::forward_cuda);
  m.impl("backward", &pyrnn::backward_cuda);
}

#endif  // PYRNN_WITH_CUDA
