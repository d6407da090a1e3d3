// Argument checks and mode helpers shared by the CPU ops (ops.cpp) and the CUDA ops
// (cuda_ops.cpp).
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "cells/registry.h"

namespace pyrnn {

// What the ops need to know of a cell, read from its type (the interface in
// cells/common.h), for every cell of the registry.
struct CellInfo {
  int id;  // index in AllCells
  const char* name;
  int gates, saved;
  bool has_cell, split_grad, keeps_row, projection, row_wise, layer_norm;
  std::vector<std::string> params;  // the constants' names, in order
  std::vector<double> defaults;     // and their default values
  // The Elman cells (one gate, no cell state, nothing but h from the step before): those
  // the vanishing-gradient regulariser is defined for.
  bool elman() const { return gates == 1 && !has_cell && !split_grad && saved == 0; }
  // The length of the cell's own weights (cell_weight) for H units: a layer-normalised
  // cell's gains of the input side and the recurrent side (G*H each) and the gain and
  // bias of its cell state's norm (H each); 0 for the others.
  int64_t weights(int64_t H) const { return layer_norm ? (2 * gates + 2) * H : 0; }
};

template <class Cell>
inline CellInfo info_of(int id) {
  CellInfo c{id, Cell::kName, Cell::kGates, Cell::kSaved, Cell::kHasCell, Cell::kSplitGrad,
             Cell::kKeepsRow, Cell::kProjection, Cell::kRowWise, Cell::kLayerNorm, {}, {}};
  const std::string spec = Cell::kParams;  // "name=default,name=default"
  size_t at = 0;
  while (at < spec.size()) {
    size_t end = spec.find(',', at);
    if (end == std::string::npos) end = spec.size();
    const std::string item = spec.substr(at, end - at);
    const size_t eq = item.find('=');
    c.params.push_back(item.substr(0, eq));
    c.defaults.push_back(std::stod(item.substr(eq + 1)));
    at = end + 1;
  }
  return c;
}

inline const std::vector<CellInfo>& cell_infos() {
  static const std::vector<CellInfo> infos = [] {
    std::vector<CellInfo> v;
    for_each_cell([&](auto cell) { v.push_back(info_of<decltype(cell)>(int(v.size()))); });
    return v;
  }();
  return infos;
}

inline std::string cell_names(bool elman_only = false) {
  std::string s;
  for (const CellInfo& c : cell_infos())
    if (!elman_only || c.elman()) s += std::string(s.empty() ? "'" : ", '") + c.name + "'";
  return s;
}

inline const CellInfo& parse_mode(const std::string& mode) {
  for (const CellInfo& c : cell_infos())
    if (mode == c.name) return c;
  TORCH_CHECK_VALUE(false, "mode: expected one of ", cell_names(), ", got '", mode, "'");
}

// The cell's constants from an op's cell_params: its defaults when empty, else one
// finite number >= 0 per constant.
inline std::array<double, kMaxCellParams> cell_constants(const CellInfo& c,
                                                         c10::ArrayRef<double> given) {
  std::array<double, kMaxCellParams> k{};
  TORCH_CHECK_VALUE(given.empty() || given.size() == c.params.size(), "cell_params: mode '",
                    c.name, "' takes ", c.params.size(), " constant(s), got ", given.size());
  for (size_t i = 0; i < c.params.size(); ++i) {
    k[i] = given.empty() ? c.defaults[i] : given[i];
    TORCH_CHECK_VALUE(std::isfinite(k[i]) && k[i] >= 0, c.params[i],
                      ": expected a finite number >= 0, got ", k[i]);
  }
  return k;
}

// Workspace row width W (see csrc/cpu/loops.h) that the forward saves for backward:
// the gates, the saved values and (with a cell state) c_t; 0 when the output suffices.
inline int64_t saved_width(const CellInfo& c, int64_t H) {
  return c.keeps_row ? (c.gates + c.saved + (c.has_cell ? 1 : 0)) * H : 0;
}

// The row width a forward needs while it runs: what it saves (save), or else the gates
// and the saved values, which the cell writes even when nothing is kept.
inline int64_t run_width(const CellInfo& c, int64_t H, bool save) {
  const int64_t kept = saved_width(c, H);
  return save && kept ? kept : (c.gates + c.saved) * H;
}

inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// A tensor on another device than input: RuntimeError, as ATen's RNN kernels raise.
inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), name, ": expected device ", input.device(),
              " (the device of input), got ", t.device());
}

// input's device and dtype (another dtype: TypeError).
inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& input) {
  check_device(t, name, input);
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), name, ": expected dtype ",
                   input.scalar_type(), " (the dtype of input), got ", t.scalar_type());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, name, ": expected shape ", shape_str(expected),
                    ", got ", shape_str(t.sizes()));
}

// Whether a call on the CPU multiplies in bfloat16: a float32 input with bfloat16 weights
// (weight_ih, weight_hh and weight_hr all bfloat16; the products accumulate in float32).
inline bool bf16_weights(const at::Tensor& input, const at::Tensor& w_hh) {
  return input.is_cpu() && input.scalar_type() == at::kFloat &&
         w_hh.scalar_type() == at::kBFloat16;
}

// A weight: input's device, and input's dtype or (bf16_weights) bfloat16.
inline void check_weight(const at::Tensor& t, const char* name, const at::Tensor& input,
                         bool bf16) {
  if (!bf16) return check_same(t, name, input);
  check_device(t, name, input);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kBFloat16, name,
                   ": expected dtype BFloat16 (the dtype of weight_hh), got ", t.scalar_type());
}

struct Dims {
  int64_t T, B, I, H, G, P;  // P: width of h (the projection size, or H without one)
};

// Checks every argument of a forward call and returns the dimensions. allow_half: also
// accept float16 and bfloat16 (the CUDA backend). On the CPU, a float32 input may come
// with bfloat16 weights (bf16_weights).
inline Dims check_forward_args(const CellInfo& m, const at::Tensor& input, const at::Tensor& hx,
                               const std::optional<at::Tensor>& cx, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                               const std::optional<at::Tensor>& b_hh,
                               const std::optional<at::Tensor>& w_hr,
                               const std::optional<at::Tensor>& lengths,
                               bool allow_half = false) {
  const at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble ||
                       (allow_half && (dtype == at::kHalf || dtype == at::kBFloat16)),
                   "input: expected dtype ",
                   allow_half ? "float32, float64, float16 or bfloat16" : "float32 or float64",
                   ", got ", dtype);
  TORCH_CHECK_VALUE(input.dim() == 3, "input: expected a 3-D tensor [T, B, I], got ",
                    input.dim(), "-D of shape ", shape_str(input.sizes()));
  TORCH_CHECK_VALUE(input.size(0) > 0, "input: expected at least one time step, got T = 0");
  TORCH_CHECK_VALUE(w_hh.dim() == 2, "weight_hh: expected a 2-D tensor, got ", w_hh.dim(), "-D");
  const int64_t G = m.gates;
  TORCH_CHECK_VALUE(w_hh.size(0) % G == 0, "weight_hh: expected ", G,
                    " * hidden_size rows, got ", w_hh.size(0));
  Dims d{input.size(0), input.size(1), input.size(2), w_hh.size(0) / G, G, w_hh.size(1)};
  // A hidden size of 0 is valid (torch.nn's cells accept it and return empty states).
  const bool bf16 = bf16_weights(input, w_hh);
  check_weight(w_ih, "weight_ih", input, bf16);
  check_weight(w_hh, "weight_hh", input, bf16);
  check_same(hx, "hx", input);
  if (w_hr) {
    TORCH_CHECK_VALUE(m.projection, "weight_hr: mode '", m.name, "' takes no projection");
    check_weight(*w_hr, "weight_hr", input, bf16);
    check_shape(*w_hr, "weight_hr", {d.P, d.H});
  } else {
    check_shape(w_hh, "weight_hh", {G * d.H, d.H});
  }
  check_shape(w_ih, "weight_ih", {G * d.H, d.I});
  check_shape(hx, "hx", {d.B, d.P});
  TORCH_CHECK_VALUE(b_ih.has_value() == b_hh.has_value(),
                    "bias_ih, bias_hh: expected both or neither");
  if (b_ih) {
    check_same(*b_ih, "bias_ih", input);
    check_same(*b_hh, "bias_hh", input);
    check_shape(*b_ih, "bias_ih", {G * d.H});
    check_shape(*b_hh, "bias_hh", {G * d.H});
  }
  if (m.has_cell) {
    TORCH_CHECK_VALUE(cx.has_value(), "cx: expected a cell state for mode '", m.name,
                      "', got None");
    check_same(*cx, "cx", input);
    check_shape(*cx, "cx", {d.B, d.H});
  } else {
    TORCH_CHECK_VALUE(!cx.has_value(), "cx: mode '", m.name, "' takes no cell state");
  }
  if (lengths) {
    TORCH_CHECK_TYPE(lengths->scalar_type() == at::kLong, "lengths: expected dtype int64, got ",
                     lengths->scalar_type());
    TORCH_CHECK(lengths->device().is_cpu(), "lengths: expected a CPU tensor, got device ",
                lengths->device());
    check_shape(*lengths, "lengths", {d.B});
    if (d.B > 0) {
      const int64_t lo = lengths->min().item<int64_t>(), hi = lengths->max().item<int64_t>();
      TORCH_CHECK_VALUE(lo >= 0 && hi <= d.T, "lengths: expected values in [0, T = ", d.T,
                        "], got min ", lo, " and max ", hi);
    }
  }
  return d;
}

// cell_weight: the cell's own weights, [m.weights(H)], for a layer-normalised cell; None
// for the others.
inline void check_cell_weight(const CellInfo& m, const std::optional<at::Tensor>& w,
                              const at::Tensor& input, const Dims& d) {
  if (!m.layer_norm) {
    TORCH_CHECK_VALUE(!w.has_value(), "cell_weight: mode '", m.name, "' takes none");
    return;
  }
  TORCH_CHECK_VALUE(w.has_value(), "cell_weight: mode '", m.name, "' needs its weights [",
                    2 * m.gates + 2, " * hidden_size], got None");
  check_same(*w, "cell_weight", input);
  check_shape(*w, "cell_weight", {m.weights(d.H)});
}

// bptt_clip: a number >= 0 (0 = off); NaN is rejected.
inline void check_clip(double bptt_clip) {
  TORCH_CHECK_VALUE(bptt_clip >= 0, "bptt_clip: expected a number >= 0 (0 = off), got ",
                    bptt_clip);
}

// norm_out, where given, receives the per-step gradient norms in backward: [2, T, B],
// floating point, on the input's device.
inline void check_norm_out(const std::optional<at::Tensor>& norm_out, const at::Tensor& input,
                           const Dims& d) {
  if (!norm_out) return;
  TORCH_CHECK_TYPE(norm_out->is_floating_point(),
                   "norm_out: expected a floating-point tensor, got ", norm_out->scalar_type());
  TORCH_CHECK(norm_out->device() == input.device(), "norm_out: expected device ",
              input.device(), " (the input's), got ", norm_out->device());
  check_shape(*norm_out, "norm_out", {2, d.T, d.B});
}

// The vanishing-gradient regulariser (vanishing_penalty) exists for the Elman cells; its
// outputs, when given, are a [T, B] ratio and a one-element omega. d.T == 0 skips the
// shape checks (the backward, which has no outputs to check).
inline void check_penalty_args(const CellInfo& m, double penalty,
                               const std::optional<at::Tensor>& ratio_out,
                               const std::optional<at::Tensor>& omega_out,
                               const at::Tensor& input, const Dims& d) {
  TORCH_CHECK_VALUE(std::isfinite(penalty), "vanishing_penalty: expected a finite number, got ",
                    penalty);
  TORCH_CHECK_VALUE(penalty == 0.0 || m.elman(),
                    "vanishing_penalty: the vanishing-gradient regulariser is defined for "
                    "the Elman cells (", cell_names(true), ") only, got a nonzero penalty (",
                    penalty, ") for mode '", m.name, "'");
  if (d.T == 0) return;
  if (ratio_out) {
    TORCH_CHECK_VALUE(ratio_out->device() == input.device() &&
                          ratio_out->scalar_type() == input.scalar_type(),
                      "ratio_out: expected the input's dtype and device, got ",
                      ratio_out->scalar_type(), " on ", ratio_out->device());
    check_shape(*ratio_out, "ratio_out", {d.T, d.B});
  }
  if (omega_out) {
    TORCH_CHECK_VALUE(omega_out->numel() == 1 && omega_out->device() == input.device() &&
                          omega_out->scalar_type() == input.scalar_type(),
                      "omega_out: expected one element of the input's dtype and device, got ",
                      omega_out->sizes(), " ", omega_out->scalar_type(), " on ",
                      omega_out->device());
  }
}

// The results of a call with no hidden units (H = 0, which torch.nn's cells accept):
// empty states and outputs, and a zero input gradient; there is nothing to run.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_forward(
    const CellInfo& m, const Dims& d, const at::TensorOptions& o) {
  const at::Tensor c_n = m.has_cell ? at::empty({d.B, 0}, o) : at::empty({0}, o);
  return {at::empty({d.T, d.B, d.P}, o), at::empty({d.B, d.P}, o), c_n, at::empty({0}, o)};
}

// What the backward ops return (ops.cpp lists them).
using BackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// w: the weights' options (their dtype may be bfloat16 where o's is float32).
inline BackwardResult empty_backward(const CellInfo& m, const Dims& d, bool input_grad,
                                     bool record, const at::TensorOptions& o,
                                     const at::TensorOptions& w) {
  const at::Tensor none = at::empty({0}, o);
  return {input_grad ? at::zeros({d.T, d.B, d.I}, o) : none, at::empty({d.B, d.P}, o),
          m.has_cell ? at::empty({d.B, 0}, o) : none, at::empty({0, d.I}, w),
          at::empty({0, d.P}, w), none, none, none,
          record ? at::zeros({2, d.T, d.B}, o) : none, none, none, none};
}

// Checks the arguments of a backward call (those of its forward, then what the forward
// returned and the incoming gradients) and returns the dimensions.
inline Dims check_backward_args(const CellInfo& m, const at::Tensor& grad_output,
                                const std::optional<at::Tensor>& grad_h_n,
                                const std::optional<at::Tensor>& grad_c_n,
                                const at::Tensor& input, const at::Tensor& hx,
                                const std::optional<at::Tensor>& cx, const at::Tensor& w_ih,
                                const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                                const std::optional<at::Tensor>& lengths,
                                const at::Tensor& output, const at::Tensor& workspace,
                                double bptt_clip, bool allow_half = false) {
  const Dims d = check_forward_args(m, input, hx, cx, w_ih, w_hh, std::nullopt, std::nullopt,
                                    w_hr, lengths, allow_half);
  const int64_t W = saved_width(m, d.H);
  check_same(grad_output, "grad_output", input);
  check_shape(grad_output, "grad_output", {d.T, d.B, d.P});
  check_same(output, "output", input);
  check_shape(output, "output", {d.T, d.B, d.P});
  check_shape(workspace, "workspace", W ? at::IntArrayRef{d.T, d.B, W} : at::IntArrayRef{0});
  check_same(workspace, "workspace", input);
  if (grad_h_n) {
    check_same(*grad_h_n, "grad_h_n", input);
    check_shape(*grad_h_n, "grad_h_n", {d.B, d.P});
  }
  if (grad_c_n) {
    check_same(*grad_c_n, "grad_c_n", input);
    check_shape(*grad_c_n, "grad_c_n", {d.B, d.H});
  }
  check_clip(bptt_clip);
  return d;
}

}  // namespace pyrnn
