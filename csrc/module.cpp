// The modules' forward for a plain call, in C++: pyrnn._C.module_forward, which
// pyrnn.RNN, LSTM and GRU call first (pyrnn/modules.py, _Base.forward).
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
// dropout; no torch.func transform, forward AD, tracing or compiling).
//
// It exists for the fixed cost of a call: after an idle pause a call pays for every
// distinct piece of code it runs, and the Python forward's checks and bookkeeping were
// the largest such piece of a small layer's call (see README, "What a call costs").
#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "forward_op.h"

namespace pyrnn {
namespace {

namespace py = pybind11;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

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
      zeros_h = at::zeros({B, P}, x.options());
      zeros_c = !has_cell ? Tensor() : P == hidden_size ? zeros_h
                                                         : at::zeros({B, hidden_size},
                                                                     x.options());
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
             "csrc/module.cpp");
}

}  // namespace pyrnn
