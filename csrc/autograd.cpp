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
//
// Below it, the modules' forward of a plain call (module_forward), which calls the op
// through the dispatcher, and so through this kernel.
#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

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

// The handle of pyrnn::forward, typed by its schema (ops.cpp).
using ForwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    c10::string_view, const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    bool, bool, double, const OptTensor&, double, const OptTensor&, const OptTensor&,
    c10::ArrayRef<double>, const OptTensor&);

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyrnn::forward", "")
                             .typed<ForwardSignature>();
  return op;
}

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
                            Tensor(), ws, or_undefined(e.lengths)});
    // The output is held (an alias without history, which shares its version counter)
    // rather than saved: torch.nn's modules let it be changed in place before backward
    // (out += x), since their graphs keep the steps' states apart. Where it has been,
    // backward runs the forward again for the states (the same bits).
    ctx->saved_data["out"] = out.detach();
    ctx->saved_data["out_version"] = static_cast<int64_t>(out._version());
    ctx->saved_data["keys"] = static_cast<int64_t>(e.keys.raw_repr());
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
  const bool has_cell = ctx->saved_data["cell"].toBool();
  const std::array<bool, kInputs> needs = needs_grads(ctx, saved);
  if (at::GradMode::is_enabled()) return reference_backward(ctx, saved, grads, needs, has_cell);
  TORCH_CHECK(ctx->saved_data["save"].toBool(),
              "pyrnn: this forward ran with save=False, so it cannot be differentiated; call "
              "it with save=True");
  const Tensor norm_out = ctx->saved_data["norm_out"].toTensor();
  const double penalty = ctx->saved_data["penalty"].toDouble();
  const std::vector<double> params = ctx->saved_data["params"].toDoubleVector();
  Tensor out = ctx->saved_data["out"].toTensor();
  Tensor ws = saved[10];
  if (out._version() != ctx->saved_data["out_version"].toInt()) {  // changed in place
    const c10::DispatchKeySet keys(c10::DispatchKeySet::RAW,
                                   static_cast<uint64_t>(ctx->saved_data["keys"].toInt()));
    std::tie(out, std::ignore, std::ignore, ws) = forward_below_autograd(
        keys, ctx->saved_data["mode"].toStringRef(), saved[0], saved[1], opt(saved[2]),
        saved[3], saved[4], opt(saved[5]), opt(saved[6]), opt(saved[7]), opt(saved[11]),
        ctx->saved_data["reverse"].toBool(), true, ctx->saved_data["clip"].toDouble(),
        opt(norm_out), penalty, opt(ctx->saved_data["ratio_out"].toTensor()),
        opt(ctx->saved_data["omega_out"].toTensor()), params, opt(saved[8]));
  }
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyrnn::backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                            Tensor, Tensor, Tensor, Tensor>(
              c10::string_view, const Tensor&, const OptTensor&, const OptTensor&,
              const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
              const OptTensor&, bool, bool, const OptTensor&, const Tensor&, const Tensor&,
              bool, double, bool, double, c10::ArrayRef<double>, const OptTensor&)>();
  const bool has_bias = saved[5].defined();
  Tensor dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh, dw_hr, norms, ratio, omega, dcw;
  {
    at::AutoDispatchBelowAutograd below;  // nothing here is recorded
    std::tie(dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh, dw_hr, norms, ratio, omega, dcw) = op.call(
        ctx->saved_data["mode"].toStringRef(),
        grads[0].defined() ? grads[0] : at::zeros_like(out), opt(grads[1]),
        has_cell ? opt(grads[2]) : OptTensor(), saved[0], saved[1], opt(saved[2]), saved[3],
        saved[4], opt(saved[7]), has_bias, needs[0], opt(saved[11]), out, ws,
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

// The modules' forward for a plain call: pyrnn._C.module_forward, which pyrnn.RNN, LSTM
// and GRU call first (pyrnn/modules.py, _Base.forward).
//
// A plain call is one whose every argument is already what the layer loop needs: an
// input tensor of 2 or 3 dimensions and hidden states of the expected sizes, all of
// them (with every parameter) plain tensors of the parameters' dtype (float32 or
// float64) and device (CPU or CUDA), no autocast, and no __torch_function__ or
// __torch_dispatch__ mode (so no Python runs below this). For such a call this runs the
// module's layer loop (the states, pyrnn::forward per layer and direction through the
// dispatcher, the stacked final states) with the GIL released. For any other call it
// returns None before it has done anything, and the module's Python forward runs it with
// torch.nn's checks and messages: this path raises nothing of its own. The Python forward
// decides the rest before calling (no recording, gate statistics, regulariser or active
// dropout; no torch.func transform, forward AD, tracing or compiling; not LayerNormLSTM,
// whose cell weights this does not pass).
//
// It exists for the fixed cost of a call: after an idle pause a call pays for every
// distinct piece of code it runs, and the Python forward's checks and bookkeeping were
// the largest such piece of a small layer's call (see README, "What a call costs").

namespace pyrnn {
namespace {

namespace py = pybind11;

// The tensor that obj holds when it is a plain tensor (torch.Tensor or Parameter, not a
// subclass) of dtype and device; else nullptr.
const Tensor* plain_tensor(PyObject* obj, at::ScalarType dtype, at::Device device) {
  if (obj == nullptr || !THPVariable_CheckExact(obj)) return nullptr;
  const Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || t.scalar_type() != dtype || t.device() != device) return nullptr;
  return &t;
}

struct Weights {
  Tensor w_ih, w_hh;
  OptTensor b_ih, b_hh, w_hr;
};

py::object module_forward(const std::string& mode, py::handle input_obj, py::handle hx_obj,
                          py::dict params, py::list names, int64_t num_layers,
                          bool bidirectional, bool batch_first, int64_t input_size,
                          int64_t hidden_size, int64_t proj_size, bool bias, bool has_cell,
                          double bptt_clip, std::vector<double> cell_params) {
  const py::object no = py::none();
  if (at::impl::torch_function_mode_enabled() || c10::impl::TorchDispatchModeTLS::any_modes_set())
    return no;
  if (!THPVariable_CheckExact(input_obj.ptr())) return no;
  Tensor input = THPVariable_Unpack(input_obj.ptr());
  const at::ScalarType dtype = input.scalar_type();
  const at::Device device = input.device();
  if (dtype != at::kFloat && dtype != at::kDouble) return no;
  if (device.type() != at::kCPU && device.type() != at::kCUDA) return no;
  if (at::autocast::is_autocast_enabled(device.type())) return no;
  const int64_t dim = input.dim();
  if ((dim != 2 && dim != 3) || input.size(-1) != input_size || input.numel() == 0) return no;
  const bool batched = dim == 3;

  // The parameters, by torch.nn's names, as the registered ones (a name missing from
  // _parameters is a parametrization or the like: the Python forward handles it).
  const int64_t D = bidirectional ? 2 : 1, LD = num_layers * D;
  const int64_t per = static_cast<int64_t>(names.size()) / LD;
  std::vector<Weights> weights(LD);
  std::vector<const Tensor*> got(per);
  for (int64_t k = 0; k < LD; ++k) {
    for (int64_t j = 0; j < per; ++j) {
      got[j] = plain_tensor(PyDict_GetItem(params.ptr(), names[k * per + j].ptr()), dtype,
                            device);
      if (got[j] == nullptr) return no;
    }
    Weights& w = weights[k];
    w.w_ih = *got[0];
    w.w_hh = *got[1];
    if (bias) {
      w.b_ih = *got[2];
      w.b_hh = *got[3];
    }
    if (proj_size > 0) w.w_hr = *got[per - 1];
  }

  // [T, B, I] as the layers take it.
  Tensor x = batched ? input : input.unsqueeze(batch_first ? 0 : 1);
  if (batch_first) x = x.transpose(0, 1);
  const int64_t B = x.size(1);
  const int64_t P = proj_size > 0 ? proj_size : hidden_size;

  // The initial states: given ([L*D, B, P] and, with a cell state, [L*D, B, H]; 2-D
  // without a batch) or zeros.
  Tensor h0, c0;
  if (!hx_obj.is_none()) {
    PyObject* h_obj = hx_obj.ptr();
    PyObject* c_obj = nullptr;
    if (has_cell) {
      if (!PyTuple_CheckExact(h_obj) || PyTuple_GET_SIZE(h_obj) != 2) return no;
      c_obj = PyTuple_GET_ITEM(h_obj, 1);
      h_obj = PyTuple_GET_ITEM(h_obj, 0);
    }
    const Tensor* h = plain_tensor(h_obj, dtype, device);
    const Tensor* c = has_cell ? plain_tensor(c_obj, dtype, device) : nullptr;
    if (h == nullptr || (has_cell && c == nullptr)) return no;
    const std::vector<int64_t> want_h =
        batched ? std::vector<int64_t>{LD, B, P} : std::vector<int64_t>{LD, P};
    if (h->sizes() != c10::IntArrayRef(want_h)) return no;
    h0 = batched ? *h : h->unsqueeze(1);
    if (has_cell) {
      const std::vector<int64_t> want_c = batched ? std::vector<int64_t>{LD, B, hidden_size}
                                                  : std::vector<int64_t>{LD, hidden_size};
      if (c->sizes() != c10::IntArrayRef(want_c)) return no;
      c0 = batched ? *c : c->unsqueeze(1);
    }
  }

  Tensor output, h_n, c_n;
  try {
    py::gil_scoped_release no_gil;
    Tensor zeros_h, zeros_c;
    if (!h0.defined()) {  // one tensor of zeros for every layer (the op only reads it)
      // On the CPU a memset rather than at::zeros, whose fill is one more distinct piece
      // of code per call (an idle pause makes each cost; 0.96 - 0.97x the time of a call
      // at S4 after 5 ms, inference).
      auto zeros = [&](int64_t cols) {
        if (device.type() != at::kCPU) return at::zeros({B, cols}, x.options());
        Tensor t = at::empty({B, cols}, x.options());
        std::memset(t.data_ptr(), 0, t.nbytes());
        return t;
      };
      zeros_h = zeros(P);
      zeros_c = !has_cell ? Tensor() : P == hidden_size ? zeros_h : zeros(hidden_size);
    }
    const bool grad = at::GradMode::is_enabled();
    auto needs = [&](const Tensor& t) { return t.defined() && t.requires_grad(); };
    auto needs_opt = [&](const OptTensor& t) { return t.has_value() && t->requires_grad(); };
    std::vector<Tensor> hs, cs;
    Tensor layer_input = x;
    for (int64_t layer = 0; layer < num_layers; ++layer) {
      std::vector<Tensor> outs;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t k = layer * D + d;
        const Weights& w = weights[k];
        const Tensor hk = h0.defined() ? h0.select(0, k) : zeros_h;
        const Tensor ck = !has_cell ? Tensor() : c0.defined() ? c0.select(0, k) : zeros_c;
        // Keep the workspace when a gradient will be asked for (as pyrnn.ops.layer does).
        const bool save = grad && (needs(layer_input) || needs(hk) || needs(ck) ||
                                   needs(w.w_ih) || needs(w.w_hh) || needs_opt(w.b_ih) ||
                                   needs_opt(w.b_hh) || needs_opt(w.w_hr));
        auto result = forward_op().call(
            mode, layer_input, hk, has_cell ? OptTensor(ck) : OptTensor(), w.w_ih, w.w_hh,
            w.b_ih, w.b_hh, w.w_hr, OptTensor(), d == 1, save, bptt_clip, OptTensor(), 0.0,
            OptTensor(), OptTensor(), cell_params, OptTensor());
        outs.push_back(std::get<0>(result));
        hs.push_back(std::get<1>(result));
        if (has_cell) cs.push_back(std::get<2>(result));
      }
      layer_input = D == 1 ? outs[0] : at::cat(outs, 2);
    }
    output = layer_input;
    h_n = LD == 1 ? hs[0].unsqueeze(0) : at::stack(hs);
    if (has_cell) c_n = LD == 1 ? cs[0].unsqueeze(0) : at::stack(cs);
    if (!batched) {
      output = output.squeeze(1);
      h_n = h_n.squeeze(1);
      if (has_cell) c_n = c_n.squeeze(1);
    } else if (batch_first) {
      output = output.transpose(0, 1);
    }
  } catch (const c10::Error&) {
    // Nothing has changed: the Python forward runs the call again and raises torch.nn's
    // exception for it.
    return no;
  }
  py::object out = py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(output)));
  py::object h = py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(h_n)));
  if (!has_cell) return py::make_tuple(out, h);
  py::object c = py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(c_n)));
  return py::make_tuple(out, py::make_tuple(h, c));
}

}  // namespace

void def_module_forward(py::module_& module) {
  module.def("module_forward", &module_forward,
             "the forward of pyrnn.RNN, LSTM and GRU for a plain call, or None: see "
             "csrc/autograd.cpp");
}

}  // namespace pyrnn
