// Argument checks and mode helpers shared by the CPU ops (ops.cpp) and the CUDA ops
// (cuda_ops.cpp).
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>

#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"

namespace pyrnn {

enum class Mode { kRnnTanh, kRnnRelu, kLstm, kGru };

inline Mode parse_mode(const std::string& mode) {
  if (mode == "rnn_tanh") return Mode::kRnnTanh;
  if (mode == "rnn_relu") return Mode::kRnnRelu;
  if (mode == "lstm") return Mode::kLstm;
  if (mode == "gru") return Mode::kGru;
  TORCH_CHECK_VALUE(false, "mode: expected one of 'rnn_tanh', 'rnn_relu', 'lstm', 'gru', got '",
                    mode, "'");
}

inline int64_t gates_of(Mode m) { return m == Mode::kLstm ? 4 : m == Mode::kGru ? 3 : 1; }

// Workspace row width W (see csrc/cpu/loops.h) that the forward saves for backward.
inline int64_t saved_width(Mode m, int64_t H) {
  switch (m) {
    case Mode::kLstm: return 5 * H;  // i, f, g, o, c
    case Mode::kGru: return 4 * H;   // r, z, n, W_hn h + b_hn
    default: return 0;               // Elman: the output alone suffices
  }
}

// Calls f(Cell{}) with the cell type of mode m.
template <typename F>
inline void with_cell(Mode m, F&& f) {
  switch (m) {
    case Mode::kRnnTanh: f(RnnCell<Act::kTanh>{}); break;
    case Mode::kRnnRelu: f(RnnCell<Act::kRelu>{}); break;
    case Mode::kLstm: f(LstmCell{}); break;
    case Mode::kGru: f(GruCell{}); break;
  }
}

inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// A tensor on another device than input: RuntimeError, as ATen's RNN kernels raise.
inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), name, ": expected device ", input.device(),
              " (the device of input), got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), name, ": expected dtype ",
                   input.scalar_type(), " (the dtype of input), got ", t.scalar_type());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, name, ": expected shape ", shape_str(expected),
                    ", got ", shape_str(t.sizes()));
}

struct Dims {
  int64_t T, B, I, H, G, P;  // P: width of h (the projection size, or H without one)
};

// Checks every argument of a forward call and returns the dimensions. allow_half: also
// accept float16 and bfloat16 (the CUDA backend).
inline Dims check_forward_args(Mode m, const at::Tensor& input, const at::Tensor& hx,
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
  const int64_t G = gates_of(m);
  TORCH_CHECK_VALUE(w_hh.size(0) % G == 0, "weight_hh: expected ", G,
                    " * hidden_size rows, got ", w_hh.size(0));
  Dims d{input.size(0), input.size(1), input.size(2), w_hh.size(0) / G, G, w_hh.size(1)};
  // A hidden size of 0 is valid (torch.nn's cells accept it and return empty states).
  check_same(w_ih, "weight_ih", input);
  check_same(w_hh, "weight_hh", input);
  check_same(hx, "hx", input);
  if (w_hr) {
    TORCH_CHECK_VALUE(m == Mode::kLstm, "weight_hr: only mode 'lstm' takes a projection");
    check_same(*w_hr, "weight_hr", input);
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
  if (m == Mode::kLstm) {
    TORCH_CHECK_VALUE(cx.has_value(), "cx: expected a cell state for mode 'lstm', got None");
    check_same(*cx, "cx", input);
    check_shape(*cx, "cx", {d.B, d.H});
  } else {
    TORCH_CHECK_VALUE(!cx.has_value(), "cx: only mode 'lstm' takes a cell state");
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
inline void check_penalty_args(Mode m, double penalty,
                               const std::optional<at::Tensor>& ratio_out,
                               const std::optional<at::Tensor>& omega_out,
                               const at::Tensor& input, const Dims& d) {
  TORCH_CHECK_VALUE(std::isfinite(penalty), "vanishing_penalty: expected a finite number, got ",
                    penalty);
  TORCH_CHECK_VALUE(penalty == 0.0 || m == Mode::kRnnTanh || m == Mode::kRnnRelu,
                    "vanishing_penalty: the vanishing-gradient regulariser is defined for "
                    "the Elman cells (rnn_tanh, rnn_relu) only, got a nonzero penalty (",
                    penalty, ") for an LSTM or GRU");
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
    Mode m, const Dims& d, const at::TensorOptions& o) {
  const at::Tensor c_n = m == Mode::kLstm ? at::empty({d.B, 0}, o) : at::empty({0}, o);
  return {at::empty({d.T, d.B, d.P}, o), at::empty({d.B, d.P}, o), c_n, at::empty({0}, o)};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                  at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
empty_backward(Mode m, const Dims& d, bool input_grad, bool record, const at::TensorOptions& o) {
  const at::Tensor none = at::empty({0}, o);
  return {input_grad ? at::zeros({d.T, d.B, d.I}, o) : none, at::empty({d.B, d.P}, o),
          m == Mode::kLstm ? at::empty({d.B, 0}, o) : none, at::empty({0, d.I}, o),
          at::empty({0, d.P}, o), none, none, none,
          record ? at::zeros({2, d.T, d.B}, o) : none, none, none};
}

// Checks the arguments of a backward call (those of its forward, then what the forward
// returned and the incoming gradients) and returns the dimensions.
inline Dims check_backward_args(Mode m, const at::Tensor& grad_output,
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
