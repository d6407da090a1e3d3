// The autograd kernel of pyrnn::forward: a C++ custom Function whose backward calls
// pyrnn::backward, so that neither direction of a differentiated layer runs Python.
//
// The differentiable arguments are the nine tensors input, hx, cx, weight_ih, weight_hh,
// bias_ih, bias_hh, weight_hr and cell_weight; the others (lengths, the stores the
// backward writes into, the scalars) travel in one Extras value, which autograd does not
// look into. With create_graph=True the backward's gradients must themselves be
// differentiable, which the fused kernel's are not: that case takes them from the
// reference formulation, pyrnn::reference_grads (defined in pyrnn/ops.py), whose
// composite implementation records its own graph.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "forward_op.h"

namespace pyrnn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The arguments of pyrnn::forward that autograd does not differentiate.
struct Extras {
  c10::DispatchKeySet keys;
  std::string mode;
  OptTensor lengths, norm_out, ratio_out, omega_out;
  bool reverse = false, save = false;
  double bptt_clip = 0.0, penalty = 0.0;
  std::vector<double> params;
};

constexpr int kInputs = 9;  // input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh,
                            // weight_hr, cell_weight: the differentiable arguments

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }
Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// pyrnn::forward's kernel below autograd, for the call's dispatch keys.
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_below_autograd(
    c10::DispatchKeySet keys, c10::string_view mode, const Tensor& input, const Tensor& hx,
    const OptTensor& cx, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
    const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& lengths, bool reverse,
    bool save, double bptt_clip, const OptTensor& norm_out, double vanishing_penalty,
    const OptTensor& ratio_out, const OptTensor& omega_out, c10::ArrayRef<double> cell_params,
    const OptTensor& cell_weight) {
  return forward_op().redispatch(keys & c10::after_autograd_keyset, mode, input, hx, cx, w_ih,
                                 w_hh, b_ih, b_hh, w_hr, lengths, reverse, save, bptt_clip,
                                 norm_out, vanishing_penalty, ratio_out, omega_out, cell_params,
                                 cell_weight);
}

struct Layer : torch::autograd::Function<Layer> {
  static variable_list forward(AutogradContext* ctx, const Extras& e, const Tensor& input,
                               const Tensor& hx, const OptTensor& cx, const Tensor& w_ih,
                               const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                               const OptTensor& w_hr, const OptTensor& cell_weight) {
    auto [out, h_n, c_n, ws] = forward_below_autograd(
        e.keys, e.mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, e.lengths, e.reverse,
        e.save, e.bptt_clip, e.norm_out, e.penalty, e.ratio_out, e.omega_out, e.params,
        cell_weight);
    ctx->mark_non_differentiable({ws});
    ctx->set_materialize_grads(false);
    // Every argument is kept (references, no copies): the fused backward needs neither
    // weight_ih when the input needs no gradient nor the biases, but double backward
    // recomputes the layer from all of them.
    ctx->save_for_backward({input, hx, or_undefined(cx), w_ih, w_hh, or_undefined(b_ih),
                            or_undefined(b_hh), or_undefined(w_hr), or_undefined(cell_weight),
                            out, ws, or_undefined(e.lengths)});
    ctx->saved_data["mode"] = e.mode;
    ctx->saved_data["cell"] = c_n.dim() == 2;  // a cell state [B, H]; else [0]
    ctx->saved_data["reverse"] = e.reverse;
    ctx->saved_data["save"] = e.save;
    ctx->saved_data["clip"] = e.bptt_clip;
    ctx->saved_data["penalty"] = e.penalty;
    ctx->saved_data["params"] = e.params;
    // Held, not saved: the backward writes into them, and the layers of a module write
    // into views of one store.
    ctx->saved_data["norm_out"] = or_undefined(e.norm_out);
    ctx->saved_data["ratio_out"] = or_undefined(e.ratio_out);
    ctx->saved_data["omega_out"] = or_undefined(e.omega_out);
    return {out, h_n, c_n, ws};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads);
};

// needs[k]: whether the k-th differentiable argument (in kInputs' order) needs a gradient.
std::array<bool, kInputs> needs_grads(AutogradContext* ctx, const variable_list& saved) {
  std::array<bool, kInputs> needs{};
  // Autograd numbers the edges by the defined tensors among the arguments, in order.
  size_t edge = 0;
  for (int k = 0; k < kInputs; ++k)
    if (saved[k].defined()) needs[k] = ctx->needs_input_grad(edge++);
  return needs;
}

variable_list reference_backward(AutogradContext* ctx, const variable_list& saved,
                                 const variable_list& grads,
                                 const std::array<bool, kInputs>& needs, bool has_cell) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      ctx->saved_data["penalty"].toDouble() == 0.0,
      "vanishing_penalty: the regulariser runs in the fused backward only, which cannot be "
      "differentiated again; set vanishing_penalty=0 for double backward (create_graph=True)");
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyrnn::reference_grads", "")
          .typed<std::vector<Tensor>(c10::string_view, const c10::List<OptTensor>&,
                                     const c10::List<OptTensor>&, const OptTensor&, bool,
                                     double, int64_t, bool, c10::ArrayRef<double>)>();
  c10::List<OptTensor> inputs;
  for (int k = 0; k < kInputs; ++k) inputs.push_back(opt(saved[k]));
  c10::List<OptTensor> outer{opt(grads[0]), opt(grads[1]),
                             has_cell ? opt(grads[2]) : OptTensor()};
  const Tensor norm_out = ctx->saved_data["norm_out"].toTensor();
  const std::vector<double> params = ctx->saved_data["params"].toDoubleVector();
  int64_t mask = 0;  // bit k: needs[k]
  for (int k = 0; k < kInputs; ++k) mask |= int64_t(needs[k]) << k;
  std::vector<Tensor> got =
      op.call(ctx->saved_data["mode"].toStringRef(), inputs, outer, opt(saved[11]),
              ctx->saved_data["reverse"].toBool(), ctx->saved_data["clip"].toDouble(),
              mask, norm_out.defined(), params);
  if (norm_out.defined()) {
    at::NoGradGuard no_grad;
    norm_out.copy_(got[kInputs]);
  }
  variable_list result{Tensor()};  // the Extras
  for (int k = 0; k < kInputs; ++k) result.push_back(needs[k] ? got[k] : Tensor());
  return result;
}

variable_list Layer::backward(AutogradContext* ctx, variable_list grads) {
  const variable_list saved = ctx->get_saved_variables();
  const Tensor& out = saved[9];
  const bool has_cell = ctx->saved_data["cell"].toBool();
  const std::array<bool, kInputs> needs = needs_grads(ctx, saved);
  if (at::GradMode::is_enabled()) return reference_backward(ctx, saved, grads, needs, has_cell);
  TORCH_CHECK(ctx->saved_data["save"].toBool(),
              "pyrnn: this forward ran with save=False, so it cannot be differentiated; call "
              "it with save=True");
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyrnn::backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                            Tensor, Tensor, Tensor, Tensor>(
              c10::string_view, const Tensor&, const OptTensor&, const OptTensor&,
              const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
              const OptTensor&, bool, bool, const OptTensor&, const Tensor&, const Tensor&,
              bool, double, bool, double, c10::ArrayRef<double>, const OptTensor&)>();
  const Tensor norm_out = ctx->saved_data["norm_out"].toTensor();
  const double penalty = ctx->saved_data["penalty"].toDouble();
  const std::vector<double> params = ctx->saved_data["params"].toDoubleVector();
  const bool has_bias = saved[5].defined();
  Tensor dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh, dw_hr, norms, ratio, omega, dcw;
  {
    at::AutoDispatchBelowAutograd below;  // nothing here is recorded
    std::tie(dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh, dw_hr, norms, ratio, omega, dcw) = op.call(
        ctx->saved_data["mode"].toStringRef(),
        grads[0].defined() ? grads[0] : at::zeros_like(out), opt(grads[1]),
        has_cell ? opt(grads[2]) : OptTensor(), saved[0], saved[1], opt(saved[2]), saved[3],
        saved[4], opt(saved[7]), has_bias, needs[0], opt(saved[11]), out, saved[10],
        ctx->saved_data["reverse"].toBool(), ctx->saved_data["clip"].toDouble(),
        norm_out.defined(), penalty, params, opt(saved[8]));
    if (norm_out.defined()) norm_out.copy_(norms);
    if (penalty != 0.0) {
      const Tensor ratio_out = ctx->saved_data["ratio_out"].toTensor();
      const Tensor omega_out = ctx->saved_data["omega_out"].toTensor();
      if (ratio_out.defined()) ratio_out.copy_(ratio);
      if (omega_out.defined()) omega_out.copy_(omega.view(omega_out.sizes()));
    }
  }
  return {Tensor(), needs[0] ? dx : Tensor(), dh, has_cell ? dc : Tensor(), dw_ih, dw_hh,
          has_bias ? db_ih : Tensor(), has_bias ? db_hh : Tensor(),
          saved[7].defined() ? dw_hr : Tensor(), saved[8].defined() ? dcw : Tensor()};
}

// Forward-mode AD has no formula here (pyrnn.ops.layer takes the reference formulation
// when a tangent is present): a tangent that reaches the op is an error, never a result
// that silently drops it.
void check_no_tangent(const Tensor& t) {
  TORCH_CHECK_NOT_IMPLEMENTED(!t._fw_grad(/*level=*/0).defined(),
                              "Trying to use forward AD with pyrnn::forward that does not "
                              "support it because it has not been implemented yet.");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_autograd(
    c10::DispatchKeySet keys, c10::string_view mode, const Tensor& input, const Tensor& hx,
    const OptTensor& cx, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
    const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& lengths, bool reverse,
    bool save, double bptt_clip, const OptTensor& norm_out, double vanishing_penalty,
    const OptTensor& ratio_out, const OptTensor& omega_out, c10::ArrayRef<double> cell_params,
    const OptTensor& cell_weight) {
  bool requires_grad = false;
  for (const Tensor* t : {&input, &hx, &w_ih, &w_hh}) {
    check_no_tangent(*t);
    requires_grad = requires_grad || t->requires_grad();
  }
  for (const OptTensor* t : {&cx, &b_ih, &b_hh, &w_hr, &cell_weight})
    if (t->has_value()) {
      check_no_tangent(**t);
      requires_grad = requires_grad || (*t)->requires_grad();
    }
  if (!at::GradMode::is_enabled() || !requires_grad)  // nothing to record
    return forward_below_autograd(keys, mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr,
                                  lengths, reverse, save, bptt_clip, norm_out,
                                  vanishing_penalty, ratio_out, omega_out, cell_params,
                                  cell_weight);
  Extras e{keys, std::string(mode), lengths, norm_out, ratio_out, omega_out, reverse, save,
           bptt_clip, vanishing_penalty, cell_params.vec()};
  variable_list r = Layer::apply(e, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, cell_weight);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace
}  // namespace pyrnn

TORCH_LIBRARY_IMPL(pyrnn, Autograd, m) { m.impl("forward", &pyrnn::forward_autograd); }
